"""Anomaly-detection datasets as `datasets.Dataset` objects, meta.json writers and a synthetic defect dataset.

Columns of every dataset: `image` and `mask` (`datasets.Image`, file paths decoded lazily; `mask` is None for
normal images), `label` (0 normal, 1 anomalous), `class_name`, `defect_type`, `image_path` (relative to the root).

- `load_meta_json`: the meta.json index of Crane, AnomalyCLIP and AdaCLIP;
- `load_mvtec`, `load_visa`, `load_class_folders`: MVTec-AD, VisA and the generic `<class>/{train,test}/<defect>`
  layout; `load_anomaly_dataset` / `load_data_source` detect the layout;
- `write_dataset_meta` (and `python -m crane_hf.data.meta_writers`): meta.json for MPDD, BTAD, KSDD, DAGM,
  DTD-Synthetic, HeadCT, BrainMRI, Br35H, ISIC, CVC-ColonDB, CVC-ClinicDB and TN3K from their public layouts;
- `generate_synthetic_dataset` (and `python -m crane_hf.data.synthetic`): textures with pasted defects.
"""

from __future__ import annotations

import importlib
from typing import Any

from .file_accounting import UnusedFileWarning
from .layouts import load_class_folders, load_mvtec, load_visa, scan_class_folders
from .mask_checks import SuspiciousMaskWarning
from .meta_json import load_meta_json, read_meta_json, write_meta_json
from .records import (
    AnomalyRecord,
    DatasetLayoutError,
    InvalidRecordWarning,
    LossyMaskWarning,
    UnknownSelectionError,
    records_to_dataset,
    validate_records,
)
from .sources import DataSource, detect_layout, load_anomaly_dataset, load_data_source, parse_sources

# The two command-line modules are imported on first use, so that `python -m crane_hf.data.<module>` runs them
# before the package has imported them.
_LAZY = {
    "WRITERS": "meta_writers",
    "dataset_records": "meta_writers",
    "write_dataset_meta": "meta_writers",
    "DEFECTS": "synthetic",
    "SOURCES": "synthetic",
    "generate_synthetic_dataset": "synthetic",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFECTS",
    "SOURCES",
    "WRITERS",
    "AnomalyRecord",
    "DataSource",
    "DatasetLayoutError",
    "InvalidRecordWarning",
    "LossyMaskWarning",
    "SuspiciousMaskWarning",
    "UnknownSelectionError",
    "UnusedFileWarning",
    "dataset_records",
    "detect_layout",
    "generate_synthetic_dataset",
    "load_anomaly_dataset",
    "load_class_folders",
    "load_data_source",
    "load_meta_json",
    "load_mvtec",
    "load_visa",
    "parse_sources",
    "read_meta_json",
    "records_to_dataset",
    "scan_class_folders",
    "validate_records",
    "write_dataset_meta",
    "write_meta_json",
]
