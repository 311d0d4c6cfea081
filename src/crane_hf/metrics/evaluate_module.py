"""Location of the `evaluate` metric module shipped with the package."""

from __future__ import annotations

from pathlib import Path

EVALUATE_MODULE_NAME = "crane_anomaly_metrics"


def evaluate_module_path() -> str:
    """Folder of the `evaluate` module, for `evaluate.load(evaluate_module_path())` (works offline)."""
    return str(Path(__file__).resolve().parent / EVALUATE_MODULE_NAME)
