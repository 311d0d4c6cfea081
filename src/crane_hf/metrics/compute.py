"""One-shot evaluation: `compute_metrics(labels, scores, masks, maps)`."""

from __future__ import annotations

from typing import Any

import numpy as np

from .accumulator import AnomalyMetricAccumulator, check_metric_options
from .input_validation import to_numpy


def compute_metrics(
    labels: Any,
    scores: Any,
    masks: Any = None,
    maps: Any = None,
    aupro_variant: str = "official",
    max_fpr: float = 0.3,
) -> dict[str, float | None]:
    """Exact image-level and (with masks and maps) pixel-level anomaly-detection metrics.

    Args:
        labels: [N] image labels in {0, 1} (1 = anomalous). scores: [N] image anomaly scores.
        masks: [N,H,W] binary ground-truth masks. maps: [N,H,W] anomaly maps (for example the smoothed maps).
            Numpy arrays, torch tensors or nested lists; give both or neither.
        aupro_variant: "official" (MVTec-AD definition, exact) or "legacy" (the official Crane code's 200-threshold
            computation, used for the paper's numbers).
        max_fpr: the FPR limit of AUPRO, in (0, 1].

    Returns:
        {"image_auroc", "image_ap", "image_f1_max"} and, with masks/maps, {"pixel_auroc", "pixel_ap",
        "pixel_f1_max", "pixel_aupro"}: floats, or None (with a `MetricUndefinedWarning`) when undefined.

    Maps are evaluated in float32, or in float64 when their dtype needs it (float64, int32, int64): the same
    values as an `AnomalyMetricAccumulator(map_dtype=...)` of that dtype fed the same data in any batches.
    """
    check_metric_options(aupro_variant, max_fpr)
    map_dtype = np.float32
    if maps is not None:
        maps = to_numpy(maps, "maps")
        if maps.dtype.kind in "biuf":
            map_dtype = np.result_type(maps.dtype, np.float32)
    accumulator = AnomalyMetricAccumulator(map_dtype=map_dtype)
    accumulator.update(labels, scores, masks=masks, maps=maps)
    return accumulator.compute(aupro_variant=aupro_variant, max_fpr=max_fpr)
