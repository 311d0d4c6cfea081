"""Exact, fast anomaly-detection metrics: image AUROC/AP/F1-max, pixel AUROC/AP/F1-max/AUPRO.

Usable on its own (numpy, scipy, scikit-learn): nothing here imports the model.

- `compute_metrics(labels, scores, masks=None, maps=None, aupro_variant="official", max_fpr=0.3)`: one shot.
- `AnomalyMetricAccumulator`: `update()` per batch, `compute()`, `state_dict()` / `merge()` across processes.
- `evaluate_module_path()`: the folder to give `evaluate.load`.
"""

from .accumulator import AUPRO_VARIANTS, AnomalyMetricAccumulator
from .compute import compute_metrics
from .evaluate_module import evaluate_module_path
from .undefined_metric import MetricUndefinedWarning

__all__ = [
    "AUPRO_VARIANTS",
    "AnomalyMetricAccumulator",
    "MetricUndefinedWarning",
    "compute_metrics",
    "evaluate_module_path",
]
