"""Seeing the results: decision figures, the HTML report of a run, and the Gradio app (`crane-hf app`).

- `decision_figure`: image | anomaly map with colour bar | decision, with name, verdict, score and thresholds.
- `run_report`: `report.html` for `crane-hf predict --report` and `crane-hf evaluate --report`.
- `charts`: score histogram, ROC and precision-recall curves with the F1-max point.
- `gradio_app`, `app_command`, `space`: the app, its command and its Hugging Face Space folder.

Nothing here is imported by the model, processor or pipeline modules that `save_pretrained` ships as remote code.
"""
