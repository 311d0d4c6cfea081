"""Packaging for crane-hf: Crane and Crane+ zero-shot anomaly detection for Hugging Face transformers."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# `crane-hf export` and its runners: torch.onnx's exporter (onnx, onnxscript), ONNX Runtime, OpenVINO. The test extra
# installs them too, so that the export tests run wherever the tests run (they skip, naming the extra, without them).
EXPORT = ["onnx>=1.18", "onnxscript>=0.5", "onnxruntime>=1.23", "openvino>=2026.0"]

setup(
    name="crane-hf",
    version="0.1.0",
    description=(
        "Crane and Crane+ zero-shot anomaly detection (CLIP with E-Attn, DINOv2 D-Attn, learned prompts) "
        "as a Hugging Face transformers model, pipeline and CLI."
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src"),
    include_package_data=True,
    package_data={
        "crane_hf": [
            "models/crane/resources/*/*",
            "presets/*.safetensors",
            "metrics/crane_anomaly_metrics/*",
            "reporting/*.j2",
        ]
    },
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-learn>=1.3",
        # bicubic resize (the official transform) rounds some uint8 pixels one level differently in Pillow 13
        # (docs/architecture.md, "Preprocessing conversions"); <13 is what the tests and parity ran with
        "pillow>=10.0,<13",
        "tqdm>=4.60",
        "matplotlib>=3.8",  # decision figures and report charts of predict, evaluate, demo (Agg canvas, no display)
        "jinja2>=3.1",  # report.html (torch requires it already)
    ],
    extras_require={
        "synthetic": ["scikit-image>=0.22"],  # the synthetic defect dataset and the offline demo
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "scikit-image>=0.22",
            "ruff>=0.5",
            "tensorboard>=2.14",
            *EXPORT,
            "gradio>=5.0,<7",  # the app's tests
            "selenium>=4.10",  # report and app tests in headless Chromium (Debian's chromium and chromium-driver)
        ],
        "tensorboard": ["tensorboard>=2.14"],
        "export": EXPORT,
        "app": ["gradio>=5.0,<7"],  # crane-hf app
    },
    entry_points={"console_scripts": ["crane-hf=crane_hf.commands.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
