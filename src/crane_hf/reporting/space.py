"""A Hugging Face Space folder running the same app as `crane-hf app` on a published model (`crane-hf push --space`).

The folder holds `app.py`, `requirements.txt`, `README.md` (the Space's metadata: sdk gradio, app_file app.py, the
model) and `crane_app/` with copies of `gradio_app.py` and `decision_figure.py`. The Space does not install crane_hf:
it loads the model with transformers' `pipeline(..., trust_remote_code=True)` from the model repository that
`crane-hf push` publishes (the model and pipeline code travel with it), so it needs only torch, transformers, gradio,
matplotlib, numpy and Pillow. It offers only its own model (no arbitrary remote code typed by visitors) and cannot
save thresholds (a Space's disk is not the model folder).
"""

from __future__ import annotations

import json
import os
import shutil

TESTED_GRADIO_VERSION = "6.31.0"
APP_FILES = ("gradio_app.py", "decision_figure.py")

APP_TEMPLATE = '''"""Hugging Face Space: Crane anomaly detection on {model_id} (written by crane-hf push --space).

Loads the model with transformers' pipeline and its remote code; CRANE_MODEL overrides the model (a Hub id or a
local folder).
"""

import os

from transformers import pipeline

from crane_app.gradio_app import AppModel, build_app, launch_options

MODEL_ID = os.environ.get("CRANE_MODEL", {model_id!r})
_models = {{}}


def open_model(spec):
    if spec != MODEL_ID:
        raise ValueError(f"this Space runs {{MODEL_ID}} only")
    if spec not in _models:
        detector = pipeline("zero-shot-anomaly-detection", model=spec, trust_remote_code=True)
        _models[spec] = AppModel.from_pipeline(spec, detector)
    return _models[spec]


app = build_app(
    open_model,
    [MODEL_ID],
    title={title!r},
    description="Upload or drop an image: score, verdict and heatmap; move the thresholds without running the "
    "model again. Model: " + MODEL_ID,
    allow_custom_models=False,
)

if __name__ == "__main__":
    app.launch(**launch_options())
'''

REQUIREMENTS = """torch>=2.4
transformers>=5.0,<6
huggingface_hub>=1.0
safetensors>=0.4
numpy>=1.24
pillow>=10.0
matplotlib>=3.8
gradio>={gradio_version}
"""

README_TEMPLATE = """---
title: {title_yaml}
emoji: 🔍
colorFrom: red
colorTo: yellow
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: mit
models:
- {model_id}
tags:
- anomaly-detection
- zero-shot-anomaly-detection
---

# {title}

Crane zero-shot anomaly detection on [{model_id}](https://huggingface.co/{model_id}): upload or drop an image to see
its anomaly score, the verdict at the model's image threshold, the heatmap with its colour bar and the pixels above
the pixel threshold. Both thresholds move live, without running the model again.

Written by `crane-hf push --space`; run it locally with `pip install -r requirements.txt && python app.py`.
"""


def gradio_version() -> str:
    """The installed Gradio's version, else the version this Space template was tested with."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradio")
    except PackageNotFoundError:
        return TESTED_GRADIO_VERSION


def write_space_folder(folder: str, model_id: str, title: str | None = None) -> None:
    """Write the Space's files into `folder` (an existing, empty folder; the caller writes it atomically).

    Args:
        folder: where to write.
        model_id: the model the Space runs: a Hub id (as published by `crane-hf push --repo-id`).
        title: the Space's title (default: from the model id).
    """
    title = title or f"{model_id.split('/')[-1]} anomaly detection"
    if "\n" in title or "\n" in model_id:
        raise ValueError("the Space title and model id must be single lines.")
    version = gradio_version()
    package = os.path.join(folder, "crane_app")
    os.makedirs(package)
    source = os.path.dirname(os.path.abspath(__file__))
    for name in APP_FILES:
        shutil.copyfile(os.path.join(source, name), os.path.join(package, name))
    with open(os.path.join(package, "__init__.py"), "w", encoding="utf-8") as stream:
        stream.write('"""The crane-hf app, copied from crane_hf.reporting by crane-hf push --space."""\n')
    files = {
        "app.py": APP_TEMPLATE.format(model_id=model_id, title=title),
        "requirements.txt": REQUIREMENTS.format(gradio_version=version),
        "README.md": README_TEMPLATE.format(
            model_id=model_id, title=title, title_yaml=json.dumps(title), gradio_version=version
        ),
    }
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as stream:
            stream.write(text)
