"""crane_hf: Crane and Crane+ zero-shot anomaly detection as a Hugging Face transformers model.

Importing the package registers Crane with transformers: `CraneConfig` (model type "crane"),
`CraneForAnomalyDetection` (`AutoModel`), `CraneImageProcessor` (`AutoImageProcessor`) and the task
"zero-shot-anomaly-detection" with transformers' pipeline registry, and marks the classes for
`register_for_auto_class`, so that saved folders carry their code (`auto_map`) and load with
`trust_remote_code=True` where crane_hf is not installed. The registration runs as soon as transformers is imported
(at once where it already is; `registration.py`), and the public names below are imported on first use, so that
`import crane_hf` alone stays light (the command line's help starts without torch).

The package, one wing per concern (docs/architecture.md is the map):

- `models/crane/`: the model folder, exactly the code that remote code ships;
- `model_loading.py`: what a user types as a model (preset, folder, Hub id) into a model and processor;
- `presets/`: the paper's official prompts, bundled;
- `data/`, `metrics/`, `training/`, `evaluation/`: datasets, metrics, prompt training, evaluation runs;
- `commands/`: the `crane-hf` command line; `io/`: atomic outputs and the image files a user names;
- the module paths of crane_hf 0.1.0 (`crane_hf.modeling_crane`, `crane_hf.train`, ...) still import, with a
  `DeprecationWarning` (`_deprecated.py`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._deprecated import install as _install_old_module_paths
from .registration import PIPELINE_TASK, register_when_transformers_is_imported

__version__ = "0.1.0"

_PUBLIC = {
    "CraneAnomalyDetectionOutput": ".models.crane",
    "CraneConfig": ".models.crane",
    "CraneForAnomalyDetection": ".models.crane",
    "CraneImageProcessor": ".models.crane",
    "CranePreTrainedModel": ".models.crane",
    "ZeroShotAnomalyDetectionPipeline": ".models.crane",
    "load_detector": ".model_loading",
}

if TYPE_CHECKING:
    from .model_loading import load_detector
    from .models.crane import (
        CraneAnomalyDetectionOutput,
        CraneConfig,
        CraneForAnomalyDetection,
        CraneImageProcessor,
        CranePreTrainedModel,
        ZeroShotAnomalyDetectionPipeline,
    )


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


register_when_transformers_is_imported()
_install_old_module_paths()  # crane_hf.modeling_crane, crane_hf.train, ...: deprecated, see _deprecated.py

__all__ = [
    "PIPELINE_TASK",
    "CraneAnomalyDetectionOutput",
    "CraneConfig",
    "CraneForAnomalyDetection",
    "CraneImageProcessor",
    "CranePreTrainedModel",
    "ZeroShotAnomalyDetectionPipeline",
    "load_detector",
]
