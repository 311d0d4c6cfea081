"""A pool of binary-classification scores that supports exact rank statistics with bounded memory.

Negative scores are kept as a list of chunks, each sorted once when it is added (no global concatenation, no
re-sorting). Positive scores, which are few in anomaly detection (a few percent of the pixels), are kept unsorted
with, at the pixel level, the area of the ground-truth region each positive pixel belongs to. Every metric in this
package is computed from `PositiveRanks` (per distinct positive value: how many negatives lie below it and how many
equal it) plus order statistics of the negatives, so nothing ever needs all scores in one sorted array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Negative chunks are searched in slices of this many scores, so that temporaries stay small (32 MiB of int64).
SEARCH_SLICE = 1 << 22

# Integer types with the same width as each supported float type, for the order-preserving bit trick.
_ORDERED_INT = {np.dtype(np.float32): np.dtype(np.int32), np.dtype(np.float64): np.dtype(np.int64)}


@dataclass
class PositiveRanks:
    """Where the positives stand among the negatives.

    values: [U] the distinct positive scores, ascending. counts: [U] positives per value.
    negatives_below: [U] number of negatives strictly below each value. negatives_equal: [U] negatives equal to it.
    inverse: [P] index into `values` of each positive, in pool order. areas: [P] region area of each positive
    (pixel level) or None.
    """

    values: np.ndarray
    counts: np.ndarray
    negatives_below: np.ndarray
    negatives_equal: np.ndarray
    inverse: np.ndarray
    areas: np.ndarray | None
    num_positives: int
    num_negatives: int
    num_regions: int

    @property
    def positives_at_or_above(self) -> np.ndarray:
        """[U] number of positives with a score >= each value (true positives at that threshold)."""
        return self.num_positives - (np.cumsum(self.counts) - self.counts)

    @property
    def negatives_at_or_above(self) -> np.ndarray:
        """[U] number of negatives with a score >= each value (false positives at that threshold)."""
        return self.num_negatives - self.negatives_below


def _add_run_lengths(histogram: np.ndarray, sorted_indices: np.ndarray) -> None:
    """histogram[i] += number of occurrences of i in `sorted_indices` (non-decreasing), in O(len) time."""
    if len(sorted_indices) == 0:
        return
    starts = np.flatnonzero(sorted_indices[1:] != sorted_indices[:-1]) + 1
    boundaries = np.concatenate(([0], starts, [len(sorted_indices)]))
    histogram[sorted_indices[boundaries[:-1]]] += np.diff(boundaries)


def _to_ordered_int(value: float, dtype: np.dtype) -> int:
    """Map a finite float of `dtype` to an integer with the same order (IEEE sign-magnitude to two's complement)."""
    int_dtype = _ORDERED_INT[dtype]
    bits = int(np.asarray(value, dtype=dtype).view(int_dtype))
    magnitude_mask = (1 << (8 * int_dtype.itemsize - 1)) - 1
    return bits if bits >= 0 else bits ^ magnitude_mask


def _from_ordered_int(key: int, dtype: np.dtype) -> float:
    """Inverse of `_to_ordered_int`."""
    int_dtype = _ORDERED_INT[dtype]
    magnitude_mask = (1 << (8 * int_dtype.itemsize - 1)) - 1
    bits = key if key >= 0 else key ^ magnitude_mask
    return np.asarray(bits, dtype=int_dtype).view(dtype)[()] + dtype.type(0)  # + 0 turns -0.0 into 0.0


class ScorePool:
    """Negative scores (sorted chunks) and positive scores (with optional region areas) of one binary problem.

    Args:
        dtype: storage dtype of the scores (float32 or float64); scores are cast to it when added.
    """

    def __init__(self, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in _ORDERED_INT:
            raise ValueError(f"score storage dtype must be float32 or float64, got {self.dtype}.")
        self.negative_chunks: list[np.ndarray] = []
        self.positive_chunks: list[np.ndarray] = []
        self.positive_area_chunks: list[np.ndarray] = []
        self.num_regions = 0

    @property
    def num_negatives(self) -> int:
        return sum(len(chunk) for chunk in self.negative_chunks)

    @property
    def num_positives(self) -> int:
        return sum(len(chunk) for chunk in self.positive_chunks)

    def add(
        self,
        negatives: np.ndarray,
        positives: np.ndarray,
        positive_areas: np.ndarray | None = None,
        num_regions: int = 0,
    ) -> None:
        """Add negative scores [n] and positive scores [p] (with their region areas [p] and the number of regions)."""
        sorted_negatives = np.sort(np.asarray(negatives, dtype=self.dtype).ravel())
        if len(sorted_negatives):
            self.negative_chunks.append(sorted_negatives)
        if len(positives):
            self.positive_chunks.append(np.asarray(positives, dtype=self.dtype).ravel())
            if positive_areas is not None:
                self.positive_area_chunks.append(np.asarray(positive_areas, dtype=np.int64).ravel())
        self.num_regions += int(num_regions)

    def merge(self, other: ScorePool) -> None:
        """Append the scores of `other` (same dtype) to this pool; the chunks are shared, not copied."""
        if other.dtype != self.dtype:
            raise ValueError(f"cannot merge score pools stored as {other.dtype} and {self.dtype}.")
        self.negative_chunks.extend(other.negative_chunks)
        self.positive_chunks.extend(other.positive_chunks)
        self.positive_area_chunks.extend(other.positive_area_chunks)
        self.num_regions += other.num_regions

    def state_dict(self) -> dict[str, Any]:
        """The pool's contents as plain numpy arrays and ints (picklable, for gathering across processes)."""
        return {
            "dtype": self.dtype.name,
            "negative_chunks": list(self.negative_chunks),
            "positive_chunks": list(self.positive_chunks),
            "positive_area_chunks": list(self.positive_area_chunks),
            "num_regions": self.num_regions,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], name: str) -> ScorePool:
        """Rebuild a pool from `state_dict()` output, checking it (`name` says which pool in error messages)."""
        expected = {"dtype", "negative_chunks", "positive_chunks", "positive_area_chunks", "num_regions"}
        if not isinstance(state, dict) or set(state) != expected:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state[{name!r}] must be a dict with keys {sorted(expected)}, got {found}.")
        pool = cls(state["dtype"])
        for key in ("negative_chunks", "positive_chunks", "positive_area_chunks"):
            for chunk in state[key]:
                if not isinstance(chunk, np.ndarray) or chunk.ndim != 1:
                    raise ValueError(f"state[{name!r}][{key!r}] must hold 1-D numpy arrays.")
        for chunk in state["negative_chunks"]:
            if chunk.dtype != pool.dtype or (len(chunk) > 1 and not (chunk[1:] >= chunk[:-1]).all()):
                raise ValueError(f"state[{name!r}]['negative_chunks'] must hold sorted {pool.dtype} arrays.")
        for chunk in state["positive_chunks"]:
            if chunk.dtype != pool.dtype:
                raise ValueError(f"state[{name!r}]['positive_chunks'] must hold {pool.dtype} arrays.")
        areas = state["positive_area_chunks"]
        if areas and [len(c) for c in areas] != [len(c) for c in state["positive_chunks"]]:
            raise ValueError(f"state[{name!r}]: positive_area_chunks must match positive_chunks in length.")
        if any(c.dtype != np.int64 or (len(c) and c.min() < 1) for c in areas):
            raise ValueError(f"state[{name!r}]['positive_area_chunks'] must hold int64 areas >= 1.")
        if not isinstance(state["num_regions"], int) or state["num_regions"] < 0:
            raise ValueError(f"state[{name!r}]['num_regions'] must be a non-negative int.")
        pool.negative_chunks = list(state["negative_chunks"])
        pool.positive_chunks = list(state["positive_chunks"])
        pool.positive_area_chunks = list(areas)
        pool.num_regions = state["num_regions"]
        return pool

    def value_range(self) -> tuple[float, float]:
        """(min, max) over all scores, negatives and positives, as Python floats of stored values."""
        lows = [chunk[0] for chunk in self.negative_chunks] + [chunk.min() for chunk in self.positive_chunks]
        highs = [chunk[-1] for chunk in self.negative_chunks] + [chunk.max() for chunk in self.positive_chunks]
        return float(min(lows)), float(max(highs))

    def ranked_positives(self) -> PositiveRanks:
        """Rank every distinct positive value among all negatives (one searchsorted pass over the negatives)."""
        positives = np.concatenate(self.positive_chunks) if self.positive_chunks else np.empty(0, self.dtype)
        values, inverse, counts = np.unique(positives, return_inverse=True, return_counts=True)
        at_most = np.zeros(len(values) + 1, dtype=np.int64)  # at_most[i]: negatives whose insertion index is i
        equal = np.zeros(len(values), dtype=np.int64)
        for chunk in self.negative_chunks:
            for start in range(0, len(chunk), SEARCH_SLICE):
                part = chunk[start : start + SEARCH_SLICE]
                index = np.searchsorted(values, part, side="left")  # non-decreasing because `part` is sorted
                _add_run_lengths(at_most, index)
                if len(values):
                    is_equal = values[np.minimum(index, len(values) - 1)] == part
                    _add_run_lengths(equal, index[is_equal])
        # A negative v is <= values[k] exactly when its left insertion index is <= k.
        negatives_at_most = np.cumsum(at_most)[: len(values)]
        areas = None
        if self.positive_area_chunks:
            areas = np.concatenate(self.positive_area_chunks)
        return PositiveRanks(
            values=values,
            counts=counts.astype(np.int64),
            negatives_below=negatives_at_most - equal,
            negatives_equal=equal,
            inverse=inverse.ravel(),
            areas=areas,
            num_positives=len(positives),
            num_negatives=self.num_negatives,
            num_regions=self.num_regions,
        )

    def count_negatives_below(self, thresholds: np.ndarray | float, inclusive: bool = False) -> np.ndarray:
        """Number of negatives < each threshold (<= with `inclusive`); thresholds compared in the storage dtype."""
        thresholds = np.asarray(thresholds, dtype=self.dtype)
        total = np.zeros(thresholds.shape, dtype=np.int64)
        for chunk in self.negative_chunks:
            total += np.searchsorted(chunk, thresholds, side="right" if inclusive else "left")
        return total

    def kth_smallest_negative(self, k: int) -> float:
        """The k-th smallest negative score (0-based), found by bisection on the float bit patterns.

        Each step counts, with one searchsorted per chunk, the negatives <= a candidate value: at most 32 (float32)
        or 64 (float64) steps, whatever the number of scores.
        """
        num_negatives = self.num_negatives
        if not 0 <= k < num_negatives:
            raise IndexError(f"k={k} is out of range for {num_negatives} negatives.")
        low = _to_ordered_int(min(chunk[0] for chunk in self.negative_chunks), self.dtype)
        high = _to_ordered_int(max(chunk[-1] for chunk in self.negative_chunks), self.dtype)
        while low < high:
            middle = (low + high) // 2
            if int(self.count_negatives_below(_from_ordered_int(middle, self.dtype), inclusive=True)) > k:
                high = middle
            else:
                low = middle + 1
        return _from_ordered_int(low, self.dtype)
