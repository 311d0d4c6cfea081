"""The optional packages of exporting and of running an exported folder (all in the `export` extra).

Checked before the work starts, so that a missing one is named with the install command instead of failing deep
inside an exporter.
"""

from __future__ import annotations

import importlib.util

INSTALL = "pip install 'crane-hf[export]'"
# What each step needs, as pip names the packages.
REQUIREMENTS = {
    "onnx": ("onnx", "onnxscript"),  # torch.onnx's exporter
    "onnx-check": ("onnx",),  # reading an ONNX file's external-data locations before a runtime opens it
    "onnxruntime": ("onnxruntime",),
    "openvino": ("openvino",),
}
_MODULES = {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def missing_packages(step: str) -> list[str]:
    """The pip packages of `step` (a key of `REQUIREMENTS`) that cannot be imported here."""
    return [name for name in REQUIREMENTS[step] if importlib.util.find_spec(_MODULES[name]) is None]


def require(step: str, purpose: str) -> None:
    """Raise `ImportError` naming the missing packages of `step` and the install command."""
    missing = missing_packages(step)
    if missing:
        raise ImportError(
            f"{purpose} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{INSTALL}"
        )


__all__ = ["INSTALL", "REQUIREMENTS", "missing_packages", "require"]
