"""Area under the per-region-overlap (PRO) curve, in the two definitions found in the literature.

PRO at a threshold t is the mean, over all ground-truth regions of all images, of the fraction of the region's
pixels predicted anomalous; FPR is the fraction of all normal pixels predicted anomalous.

- `aupro_official`: MVTec-AD's definition, computed exactly. Every distinct score is a threshold (pixels with score
  >= t are anomalous); the curve runs from (0, 0) to (1, 1) through (FPR(t), PRO(t)), is integrated with the
  trapezoid rule up to `max_fpr` (linear interpolation at `max_fpr`) and divided by `max_fpr`.
- `aupro_legacy`: the computation of the official Crane code (as AnomalyCLIP's): 200 thresholds
  `np.arange(min, max, (max - min) / 200)` over all map values, pixels with score > t anomalous (t compared in the
  maps' dtype, as torch compares a float32 tensor with a Python float), FPR kept where < `max_fpr`, those FPRs
  min-max rescaled to [0, 1], trapezoid area (`sklearn.metrics.auc`).

Both are evaluated without a loop over thresholds or regions. Region sums are grouped by region area, so that
every sum runs in a fixed order (ascending area) whatever the order in which images arrived: merged accumulators
give bit-identical results.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import auc

from .score_pool import PositiveRanks, ScorePool
from .undefined_metric import undefined_metric

LEGACY_NUM_STEPS = 200


def _area_groups(ranks: PositiveRanks) -> tuple[np.ndarray, np.ndarray]:
    """Distinct region areas [A] (ascending, float64) and each positive pixel's index into them [P]."""
    area_values, area_index = np.unique(ranks.areas, return_inverse=True)
    return area_values.astype(np.float64), area_index.ravel()


def _mean_region_overlap(pixels_per_area: np.ndarray, area_values: np.ndarray, num_regions: int) -> np.ndarray:
    """PRO from counts of detected pixels per area group: [A] or [A, T] -> scalar or [T]."""
    shape = (-1,) + (1,) * (pixels_per_area.ndim - 1)
    return (pixels_per_area / area_values.reshape(shape)).sum(axis=0) / num_regions


def aupro_official(pool: ScorePool, ranks: PositiveRanks, max_fpr: float) -> float:
    """MVTec-AD AUPRO (exact): normalized area under the PRO-vs-FPR curve up to `max_fpr`.

    Each negative pixel n widens the curve by 1/N in FPR, along a segment from PRO(> s_n) to PRO(>= s_n); so the
    area over the negatives above a cut value t* is sum_n (PRO(> s_n) + PRO(>= s_n)) / (2N), which regrouped by
    positive pixel p (weight 1 / (area of its region * number of regions)) is
    sum_p weight_p * (2 #{negatives in (t*, s_p)} + #{negatives equal to s_p}) / (2N).
    t* is the negative at which FPR passes `max_fpr`; its segment is cut there by linear interpolation.
    """
    num_negatives, num_regions = ranks.num_negatives, ranks.num_regions
    area_values, area_index = _area_groups(ranks)
    first_beyond = math.floor(max_fpr * num_negatives) + 1  # rank (from the top) of the negative crossing max_fpr
    if first_beyond <= num_negatives:
        cut = pool.kth_smallest_negative(num_negatives - first_beyond)
        negatives_at_most_cut = int(pool.count_negatives_below(cut, inclusive=True))
        negatives_below_cut = int(pool.count_negatives_below(cut))
        above_cut = ranks.inverse >= np.searchsorted(ranks.values, cut, side="right")
    else:  # max_fpr reaches 1: the whole curve
        cut, negatives_at_most_cut, negatives_below_cut = None, 0, 0
        above_cut = np.ones(len(ranks.inverse), dtype=bool)

    half_widths = 2 * (ranks.negatives_below - negatives_at_most_cut) + ranks.negatives_equal  # [U]
    per_area = np.zeros(len(area_values), dtype=np.int64)
    np.add.at(per_area, area_index[above_cut], half_widths[ranks.inverse[above_cut]])
    area = _mean_region_overlap(per_area, area_values, num_regions) / (2 * num_negatives)

    if cut is not None:
        fpr_start = (num_negatives - negatives_at_most_cut) / num_negatives
        fpr_end = (num_negatives - negatives_below_cut) / num_negatives
        at_or_above_cut = ranks.inverse >= np.searchsorted(ranks.values, cut, side="left")
        pro_start = _mean_region_overlap(
            np.bincount(area_index[above_cut], minlength=len(area_values)), area_values, num_regions
        )
        pro_end = _mean_region_overlap(
            np.bincount(area_index[at_or_above_cut], minlength=len(area_values)), area_values, num_regions
        )
        pro_at_max = pro_start + (pro_end - pro_start) * (max_fpr - fpr_start) / (fpr_end - fpr_start)
        area += 0.5 * (pro_start + pro_at_max) * (max_fpr - fpr_start)
    return float(area / max_fpr)


def legacy_thresholds(pool: ScorePool) -> tuple[np.ndarray | None, str]:
    """The official Crane code's threshold grid over all map values (float64), or None and the reason it is empty."""
    low, high = pool.value_range()
    step = (high - low) / LEGACY_NUM_STEPS
    if low == high:
        return None, "all map values are equal, so the 200-threshold grid is empty"
    if not math.isfinite(step) or step == 0:
        return None, f"the map value range [{low!r}, {high!r}] cannot be split into 200 float64 steps"
    return np.arange(low, high, step), ""


def aupro_legacy(pool: ScorePool, ranks: PositiveRanks, max_fpr: float) -> float | None:
    """AUPRO as the official Crane code computes it (200 score thresholds, rescaled FPR); None if undefined."""
    name = "pixel_aupro (legacy)"
    thresholds, reason = legacy_thresholds(pool)
    if thresholds is None:
        return undefined_metric(name, reason)
    compared = thresholds.astype(pool.dtype)  # `maps > t` with t rounded to the maps' dtype, as in torch
    fprs = (ranks.num_negatives - pool.count_negatives_below(compared, inclusive=True)) / ranks.num_negatives

    area_values, area_index = _area_groups(ranks)
    num_thresholds = len(compared)
    # Number of thresholds each positive pixel exceeds (score > t), via its distinct value.
    exceeded = np.searchsorted(compared, ranks.values, side="left")[ranks.inverse]
    bins = num_thresholds + 1
    histogram = np.bincount(area_index * bins + exceeded, minlength=len(area_values) * bins)
    histogram = histogram.reshape(len(area_values), bins)
    exceeding_at_least = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]  # [A, k]: pixels exceeding >= k thresholds
    pros = _mean_region_overlap(exceeding_at_least[:, 1:], area_values, ranks.num_regions)  # [T]: score > t_j

    kept = fprs < max_fpr
    fprs, pros = fprs[kept], pros[kept]
    if len(fprs) < 2 or fprs.max() == fprs.min():
        return undefined_metric(
            name, f"fewer than two distinct FPR values below max_fpr={max_fpr} among the 200 thresholds"
        )
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return float(auc(fprs, pros))
