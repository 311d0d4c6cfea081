"""Decision thresholds: what a valid one is, the one comparison every command makes, and how calibration finds one.

- `check_threshold`: a threshold is a real number in [0, 1]; `true`, `null`, strings, lists and NaN are refused
  with the field (and the file) named, never converted.
- `at_or_above`: the comparison of the pipeline, `crane-hf predict`, `evaluate`'s overlays and `calibrate`:
  `value >= threshold`, evaluated exactly (float32 scores and maps are widened to float64, which is exact, and
  compared with the threshold as written). NumPy alone would round a Python float threshold to float32 when it
  meets a float32 map, so 0.05 and float32(0.05) would give different decisions.
- `lowest_threshold`: the smallest threshold that flags at most a fraction `fpr` of some values, chosen among the
  values themselves (so it is a float32 number for float32 scores, and any comparison, float32 or float64, gives
  the same decisions).
- `ValueHistogram`: the same for more values than fit in memory (every pixel of every calibration map): counts and
  the smallest value of each bin of float32 bit patterns, constant memory (12.5 MB), with the same exact
  guarantee on the rate; the threshold is the smallest value of a bin, at most one bin (2^-13 relative) above the
  exact one.

Only numpy is imported: the pipeline module, which published model folders carry, uses this module.
"""

from __future__ import annotations

import math
import numbers
from decimal import Decimal

import numpy as np

THRESHOLD_FIELDS = ("image_threshold", "pixel_threshold")


def check_threshold(value: object, name: str, source: str | None = None) -> float:
    """`value` as a float if it is a real number in [0, 1]; else `ValueError` naming `name` (and `source`).

    Booleans, None, strings, lists and non-finite numbers are refused (JSON's `true` would otherwise read as 1.0).
    """
    where = f"{source}: " if source else ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}{name} must be a number in [0, 1], got {value!r} ({type(value).__name__}).")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{where}{name} must be a number in [0, 1], got {number!r}.")
    return number


def at_or_above(values: np.ndarray | float, threshold: float) -> np.ndarray | bool:
    """`values >= threshold`, exactly (values widened to float64; no rounding of the threshold to float32).

    Returns a bool array of the values' shape, or a bool for a scalar.
    """
    if np.isscalar(values):
        return bool(float(values) >= float(threshold))
    return np.asarray(values, dtype=np.float64) >= float(threshold)


def allowed_count(fpr: float, total: int) -> int:
    """How many of `total` values may be flagged at a rate of at most `fpr` (decimal `fpr` as typed: 0.29 of 100
    allows 29, not the 28 that binary floating point would give)."""
    if isinstance(fpr, (bool, np.bool_)) or not isinstance(fpr, numbers.Real) or not 0.0 <= float(fpr) < 1.0:
        raise ValueError(f"fpr={fpr!r} must be a number in [0, 1).")
    return math.floor(Decimal(repr(float(fpr))) * total)


def _above_float32(value: float) -> float:
    """The smallest float32 number greater than `value`."""
    candidate = np.float32(value)
    while float(candidate) <= value:
        candidate = np.nextafter(candidate, np.float32(np.inf))
    return float(candidate)


def _check_values(values: np.ndarray, what: str) -> None:
    if values.size and not np.isfinite(values).all():
        raise ValueError(f"{what} contain NaN or infinite values; nothing can be calibrated on them.")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(f"{what} must lie in [0, 1], got [{values.min()}, {values.max()}].")


def lowest_threshold(values: np.ndarray, fpr: float) -> tuple[float, float]:
    """The lowest t among `values` (or just above the largest) with mean(at_or_above(values, t)) <= fpr.

    Args:
        values: scores in [0, 1] (any shape; float32 scores give a float32-representable t).
        fpr: target rate in [0, 1).

    Returns:
        (t, the rate achieved on `values`). Thresholds live in [0, 1]: if even t = 1 flags more than `fpr` of the
        values (saturated scores), 1.0 is returned with its rate, which is then above `fpr`.

    Raises:
        ValueError: no values, NaN or infinite values, values outside [0, 1], `fpr` outside [0, 1).
    """
    values = np.asarray(values).ravel()
    allowed = allowed_count(fpr, values.size)
    if values.size == 0:
        raise ValueError("No values to calibrate on.")
    _check_values(values, "scores")
    ordered = np.sort(values.astype(np.float64))
    distinct = np.unique(ordered)
    flagged = ordered.size - np.searchsorted(ordered, distinct, side="left")  # count(values >= each distinct value)
    meeting = np.flatnonzero(flagged <= allowed)
    threshold = float(distinct[meeting[0]]) if meeting.size else _above_float32(float(ordered[-1]))
    threshold = min(threshold, 1.0)
    return threshold, float(np.count_nonzero(at_or_above(ordered, threshold)) / ordered.size)


class ValueHistogram:
    """Counts of float32 values in [0, 1] per bin of their bit patterns, and each bin's smallest value.

    For non-negative float32 numbers the bit pattern grows with the value, so the bins (patterns sharing their high
    22 bits: 2^-13 relative width) are ordered. Memory is constant: about 1.04 million bins, 12.5 MB.
    """

    DROPPED_BITS = 10

    def __init__(self) -> None:
        bins = int(np.float32(1.0).view(np.uint32) >> self.DROPPED_BITS) + 1
        self.counts = np.zeros(bins, dtype=np.int64)
        self.minimum = np.full(bins, np.inf, dtype=np.float32)
        self.total = 0
        self.maximum = -np.inf

    def update(self, values: np.ndarray) -> None:
        """Add float32 values in [0, 1] (any shape); `ValueError` for NaN, infinities or values outside."""
        values = np.asarray(values)
        if values.dtype != np.float32:
            raise TypeError(f"ValueHistogram takes float32 values, got {values.dtype}.")
        values = values.ravel() + np.float32(0.0)  # -0.0 becomes 0.0, whose bit pattern is the smallest
        _check_values(values, "values")
        if not values.size:
            return
        bins = values.view(np.uint32) >> self.DROPPED_BITS
        self.counts += np.bincount(bins, minlength=self.counts.size)
        np.minimum.at(self.minimum, bins, values)
        self.total += values.size
        self.maximum = max(self.maximum, float(values.max()))

    def threshold(self, fpr: float) -> tuple[float, float]:
        """A threshold t with mean(at_or_above(values, t)) <= fpr over every value added, and that rate (exact).

        t is the smallest value of the lowest bin meeting the target (a value seen), or the smallest float32 above
        the largest value when none does; it lies at most one bin above the lowest such threshold among the values.
        If even t = 1 flags more than `fpr`, 1.0 is returned with its (higher) rate.
        """
        allowed = allowed_count(fpr, self.total)
        if not self.total:
            raise ValueError("No values to calibrate on.")
        at_or_after = np.cumsum(self.counts[::-1])[::-1]  # values in this bin or a higher one
        meeting = np.flatnonzero((at_or_after <= allowed) & (self.counts > 0))
        if meeting.size:
            return float(self.minimum[meeting[0]]), float(at_or_after[meeting[0]] / self.total)
        threshold = _above_float32(self.maximum)
        if threshold <= 1.0:
            return threshold, 0.0
        return 1.0, float(self.counts[-1] / self.total)  # the last bin holds exactly the values equal to 1.0


__all__ = ["THRESHOLD_FIELDS", "ValueHistogram", "allowed_count", "at_or_above", "check_threshold", "lowest_threshold"]
