"""Deploy without the model code: export Crane / Crane+ to ONNX or OpenVINO, and run the exported folder.

- `export_model` (`exporting.py`): the graph from pixel values to image scores and anomaly maps, text features as
  constants, dynamic batch size, verified against the eager model before the folder is written;
- `CraneExportGraph` (`graph.py`): the module that is traced;
- `ExportedCraneModel`, `load_exported_detector` (`runner.py`): ONNX Runtime / OpenVINO behind the pipeline;
- the exported folder, its `crane_export.json` and the checks of a stranger's folder (`folder.py`);
- the optional packages each step needs (`packages.py`).

`crane-hf export` is `crane_hf/commands/export.py`; `crane-hf predict --model exported/` (and every `--model`)
loads an exported folder through `crane_hf.model_loading`.

The exporters and runtimes are optional: `pip install 'crane-hf[export]'` (onnx, onnxscript, onnxruntime, openvino).
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so that `crane-hf --help` and `crane-hf export --help` load no torch.
_LAZY = {
    "EXPORT_FILE": "folder",
    "FORMATS": "folder",
    "is_exported_folder": "folder",
    "read_export_metadata": "folder",
    "ExportParityError": "exporting",
    "export_model": "exporting",
    "CraneExportGraph": "graph",
    "ExportedCraneModel": "runner",
    "load_exported_detector": "runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
