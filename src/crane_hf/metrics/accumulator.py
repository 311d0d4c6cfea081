"""Streaming, mergeable accumulator of anomaly-detection results giving exact image and pixel metrics.

Memory: the normal pixels' scores are kept once, sorted per update, in the map storage dtype (float32 by default:
4 bytes a pixel, 1.9 GB for MVTec-AD's 463 M test pixels at 518 x 518); anomalous pixels add 12 bytes each
(score and region area). Nothing else grows with the data.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .aupro import aupro_legacy, aupro_official
from .ground_truth_regions import positive_pixel_region_areas
from .input_validation import validate_image_inputs, validate_pixel_inputs
from .ranking_metrics import auroc, average_precision, f1_max
from .score_pool import PositiveRanks, ScorePool
from .undefined_metric import undefined_metric

AUPRO_VARIANTS = ("official", "legacy")
STATE_FORMAT_VERSION = 1

# Pixels per internal slice of an update: bounds the temporaries (labels, copies) for very large updates.
_PIXELS_PER_SLICE = 1 << 24


def check_metric_options(aupro_variant: str, max_fpr: float) -> None:
    """Raise a clear error for an unknown AUPRO variant or a max_fpr outside (0, 1]."""
    if aupro_variant not in AUPRO_VARIANTS:
        raise ValueError(f"aupro_variant must be one of {AUPRO_VARIANTS}, got {aupro_variant!r}.")
    if isinstance(max_fpr, bool) or not isinstance(max_fpr, (int, float)) or not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be a number in (0, 1], got {max_fpr!r}.")


class AnomalyMetricAccumulator:
    """Collects labels/scores (and masks/maps) batch by batch; `compute()` equals `compute_metrics` on all of them.

    Args:
        map_dtype: storage dtype of the anomaly maps, float32 (default, 4 bytes a pixel) or float64. Maps of a
            wider dtype are rounded to it (with a single warning), which can only turn nearly equal scores into ties.
            Image scores are always kept as float64.

    Example:
        >>> accumulator = AnomalyMetricAccumulator()
        >>> for batch in loader:  # doctest: +SKIP
        ...     accumulator.update(batch["labels"], scores, masks=batch["masks"], maps=maps)
        >>> accumulator.compute(aupro_variant="official")  # doctest: +SKIP
    """

    def __init__(self, map_dtype: Any = np.float32) -> None:
        self.map_dtype = np.dtype(map_dtype)
        if self.map_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"map_dtype must be float32 or float64, got {self.map_dtype}.")
        self.reset()

    def reset(self) -> None:
        """Forget everything added so far."""
        self._images = ScorePool(np.float64)
        self._pixels = ScorePool(self.map_dtype)
        self._num_images = 0
        self._has_pixels: bool | None = None  # unknown until the first non-empty update
        self._pixel_ranks: PositiveRanks | None = None  # cached between compute() calls, dropped on new data
        self._warned_rounding = False

    @property
    def num_images(self) -> int:
        return self._num_images

    def _check_pixel_consistency(self, has_pixels: bool) -> None:
        if self._has_pixels is not None and self._has_pixels != has_pixels:
            previous = "with" if self._has_pixels else "without"
            raise ValueError(
                f"earlier updates were {previous} masks/maps; give masks and maps in every update or in none."
            )

    def update(self, labels: Any, scores: Any, masks: Any = None, maps: Any = None) -> None:
        """Add a batch: labels [B] in {0, 1}, scores [B]; optionally masks [B,H,W] binary and maps [B,H,W] float.

        Numpy arrays, torch tensors (any device) or nested lists. H and W may differ between batches.
        """
        labels_array, scores_array = validate_image_inputs(labels, scores)
        has_pixels = masks is not None or maps is not None
        if has_pixels:
            masks_array, maps_array = validate_pixel_inputs(masks, maps, len(labels_array))
        if len(labels_array) == 0:
            return
        self._check_pixel_consistency(has_pixels)
        self._images.add(scores_array[~labels_array], scores_array[labels_array])
        if has_pixels:
            self._warn_if_rounded(maps_array.dtype)
            height, width = maps_array.shape[1:]
            images_per_slice = max(1, _PIXELS_PER_SLICE // max(1, height * width))
            for start in range(0, len(maps_array), images_per_slice):
                self._add_pixels(
                    masks_array[start : start + images_per_slice], maps_array[start : start + images_per_slice]
                )
        self._num_images += len(labels_array)
        self._has_pixels = has_pixels
        self._pixel_ranks = None

    def _warn_if_rounded(self, dtype: np.dtype) -> None:
        if not self._warned_rounding and not np.can_cast(dtype, self.map_dtype, casting="safe"):
            self._warned_rounding = True
            warnings.warn(
                f"maps of dtype {dtype} are stored as {self.map_dtype}; pass "
                "AnomalyMetricAccumulator(map_dtype=np.float64) to keep them exactly.",
                UserWarning,
                stacklevel=3,
            )

    def _add_pixels(self, masks: np.ndarray, maps: np.ndarray) -> None:
        maps = maps.astype(self.map_dtype, copy=False)
        areas, num_regions = positive_pixel_region_areas(masks)
        self._pixels.add(maps[~masks], maps[masks], areas, num_regions)

    def compute(self, aupro_variant: str = "official", max_fpr: float = 0.3) -> dict[str, float | None]:
        """Image AUROC/AP/F1-max and, when masks/maps were given, pixel AUROC/AP/F1-max/AUPRO.

        Undefined metrics (for example a single class present) are None, with a `MetricUndefinedWarning`.
        """
        check_metric_options(aupro_variant, max_fpr)
        if self._num_images == 0:
            raise ValueError("no data: call update() with at least one image before compute().")
        image_ranks = _ranks_if_defined(self._images, "image", ["image_auroc", "image_ap", "image_f1_max"])
        results = _ranking_metrics("image", image_ranks)
        if self._has_pixels:
            names = ["pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"]
            if self._pixel_ranks is None:  # the one pass over all normal pixels; reused by the next compute()
                self._pixel_ranks = _ranks_if_defined(self._pixels, "pixel", names)
            pixel_ranks = self._pixel_ranks
            results.update(_ranking_metrics("pixel", pixel_ranks))
            results["pixel_aupro"] = None
            if pixel_ranks is not None:
                aupro = aupro_official if aupro_variant == "official" else aupro_legacy
                results["pixel_aupro"] = aupro(self._pixels, pixel_ranks, max_fpr)
        # Every metric lies in [0, 1]; sums of rounded terms could only leave it by an ulp.
        return {name: None if value is None else min(max(value, 0.0), 1.0) for name, value in results.items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything accumulated, as numpy arrays and plain Python values (picklable, for gather_object)."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "map_dtype": self.map_dtype.name,
            "num_images": self._num_images,
            "has_pixels": self._has_pixels,
            "images": self._images.state_dict(),
            "pixels": self._pixels.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AnomalyMetricAccumulator:
        """Rebuild an accumulator from `state_dict()` output (for example one gathered from another process)."""
        expected = {"format_version", "map_dtype", "num_images", "has_pixels", "images", "pixels"}
        if not isinstance(state, dict) or set(state) != expected:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"an accumulator state must be a dict with keys {sorted(expected)}, got {found}.")
        if state["format_version"] != STATE_FORMAT_VERSION:
            raise ValueError(
                f"unsupported accumulator state format_version {state['format_version']!r} "
                f"(this version reads {STATE_FORMAT_VERSION})."
            )
        accumulator = cls(map_dtype=state["map_dtype"])
        accumulator._images = ScorePool.from_state_dict(state["images"], "images")
        accumulator._pixels = ScorePool.from_state_dict(state["pixels"], "pixels")
        if accumulator._images.dtype != np.float64 or accumulator._pixels.dtype != accumulator.map_dtype:
            raise ValueError("accumulator state: image scores must be float64 and pixel scores stored as map_dtype.")
        if state["has_pixels"] not in (None, True, False):
            raise ValueError(f"accumulator state: has_pixels must be None, True or False: {state['has_pixels']!r}.")
        if not isinstance(state["num_images"], int) or state["num_images"] < 0:
            raise ValueError(f"accumulator state: num_images must be an int >= 0, got {state['num_images']!r}.")
        accumulator._num_images = state["num_images"]
        accumulator._has_pixels = state["has_pixels"]
        return accumulator

    def merge(self, other: AnomalyMetricAccumulator | dict[str, Any]) -> AnomalyMetricAccumulator:
        """Add the data of another accumulator (or of its `state_dict()`) to this one; returns self.

        Merging the accumulators of several shards gives exactly (bit for bit) the metrics of one accumulator that
        saw all the data, in any order.
        """
        if isinstance(other, dict):
            other = AnomalyMetricAccumulator.from_state_dict(other)
        if not isinstance(other, AnomalyMetricAccumulator):
            raise TypeError(f"merge() takes an AnomalyMetricAccumulator or a state dict, not {type(other).__name__}.")
        if other.map_dtype != self.map_dtype:
            raise ValueError(f"cannot merge accumulators with map_dtype {other.map_dtype} and {self.map_dtype}.")
        if other._has_pixels is not None:
            self._check_pixel_consistency(other._has_pixels)
            self._has_pixels = other._has_pixels
        self._images.merge(other._images)
        self._pixels.merge(other._pixels)
        self._num_images += other._num_images
        self._pixel_ranks = None
        return self


def _ranks_if_defined(pool: ScorePool, level: str, names: list[str]) -> PositiveRanks | None:
    """The pool's `PositiveRanks`, or None (with a warning naming `names`) when only one class is present."""
    if pool.num_negatives == 0 or pool.num_positives == 0:
        source, unit = ("labels", "images") if level == "image" else ("masks", "pixels")
        kind = "anomalous" if pool.num_negatives == 0 else "normal"
        undefined_metric(", ".join(names), f"only one class is present (all {unit} in {source} are {kind})")
        return None
    return pool.ranked_positives()


def _ranking_metrics(level: str, ranks: PositiveRanks | None) -> dict[str, float | None]:
    """AUROC, AP and F1-max keyed `<level>_auroc`, `<level>_ap`, `<level>_f1_max` (None without ranks)."""
    names = [f"{level}_auroc", f"{level}_ap", f"{level}_f1_max"]
    if ranks is None:
        return dict.fromkeys(names)
    return dict(zip(names, (auroc(ranks), average_precision(ranks), f1_max(ranks))))
