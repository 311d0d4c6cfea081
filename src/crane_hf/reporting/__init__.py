"""Seeing the results: decision figures, the HTML report of a run, and the Gradio app.

- `decision_figure`: image | anomaly map with colour bar | decision, with name, verdict, score and thresholds.
- `run_report` (with the template `report.html.j2`): `report.html` for `crane-hf predict --report` and
  `crane-hf evaluate --report`.
- `charts`: score histogram, ROC and precision-recall curves with the F1-max point.
- `gradio_app`: the app of `crane-hf app` (`commands/app.py`); `space`: its Hugging Face Space folder
  (`crane-hf push --space`), which copies `gradio_app.py` and `decision_figure.py` from this folder as they are.

This wing imports no other part of crane_hf (numpy, Pillow, matplotlib, jinja2, scikit-learn and gradio only), and
nothing in the model folder (`models/crane/`) imports it: the commands and the evaluation call it.
"""
