"""Deploy without the model code: export Crane / Crane+ to ONNX or OpenVINO, and run the exported folder.

- `export_model` (`exporting.py`): the graph from pixel values to image scores and anomaly maps, text features as
  constants, dynamic batch size, verified against the eager model before the folder is written;
- `CraneExportGraph` (`graph.py`): the module that is traced;
- `ExportedCraneModel`, `load_exported_detector` (`runner.py`): ONNX Runtime / OpenVINO behind the pipeline;
- `crane-hf export` (`command.py`).

The exporters and runtimes are optional: `pip install 'crane-hf[export]'` (onnx, onnxscript, onnxruntime, openvino).
"""

from .exporting import (
    EXPORT_FILE,
    FORMATS,
    ExportParityError,
    export_model,
    is_exported_folder,
    read_export_metadata,
)
from .graph import CraneExportGraph
from .runner import ExportedCraneModel, load_exported_detector

__all__ = [
    "EXPORT_FILE",
    "FORMATS",
    "CraneExportGraph",
    "ExportParityError",
    "ExportedCraneModel",
    "export_model",
    "is_exported_folder",
    "load_exported_detector",
    "read_export_metadata",
]
