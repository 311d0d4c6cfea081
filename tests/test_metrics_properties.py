"""Property-based tests of crane_hf.metrics: any sizes, dtypes and value ranges.

Every metric but the legacy AUPRO depends on the data only through the order of the scores, so it is invariant to
strictly increasing transforms. The legacy AUPRO is not: its 200 thresholds are evenly spaced between the minimum
and maximum score, so a non-linear transform moves the thresholds relative to the data (see
test_metrics.py::test_legacy_aupro_is_not_invariant_to_monotone_transforms_but_official_is).
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from crane_hf.metrics import AnomalyMetricAccumulator, MetricUndefinedWarning, compute_metrics

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8]
ORDER_ONLY_METRICS = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max"]


def values_of(dtype) -> st.SearchStrategy:
    """Finite values of `dtype`; int64 within +-2**53, the integers float64 holds exactly."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return st.floats(width=8 * dtype.itemsize, allow_nan=False, allow_infinity=False)
    info = np.iinfo(dtype)
    return st.integers(max(info.min, -(2**53)), min(info.max, 2**53))


@st.composite
def anomaly_data(draw):
    """labels [N], scores [N], masks [N,H,W], maps [N,H,W] of random sizes and dtypes."""
    num_images, height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    score_dtype, map_dtype = draw(st.sampled_from(DTYPES)), draw(st.sampled_from(DTYPES))
    labels = draw(hnp.arrays(np.bool_, num_images))
    scores = draw(hnp.arrays(score_dtype, num_images, elements=values_of(score_dtype)))
    masks = draw(hnp.arrays(np.bool_, (num_images, height, width)))
    maps = draw(hnp.arrays(map_dtype, (num_images, height, width), elements=values_of(map_dtype)))
    return labels, scores, masks, maps


def quietly(function, *args, **kwargs):
    """Call with every warning an error except MetricUndefinedWarning (undefined metrics are expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", MetricUndefinedWarning)
        return function(*args, **kwargs)


def increasing_relabel(values: np.ndarray) -> np.ndarray:
    """A strictly increasing transform: each value replaced by 3 * (its rank among the distinct values) - 7.5."""
    ranks = np.unique(values.astype(np.float64), return_inverse=True)[1].reshape(values.shape)
    return (3.0 * ranks - 7.5).astype(np.float32)


def map_dtype_of(maps: np.ndarray):
    return np.result_type(maps.dtype, np.float32)


@settings(max_examples=150, deadline=None)
@given(anomaly_data(), st.sampled_from(["official", "legacy"]), st.sampled_from([0.3, 0.01, 1.0]))
def test_metrics_are_finite_and_in_the_unit_interval(data, variant, max_fpr):
    results = quietly(compute_metrics, *data, aupro_variant=variant, max_fpr=max_fpr)
    assert set(results) == {*ORDER_ONLY_METRICS, "pixel_aupro"}
    for name, value in results.items():
        assert value is None or (isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0), name


@settings(max_examples=150, deadline=None)
@given(anomaly_data())
def test_order_based_metrics_are_invariant_to_increasing_transforms(data):
    labels, scores, masks, maps = data
    before = quietly(compute_metrics, labels, scores, masks, maps)
    after = quietly(compute_metrics, labels, increasing_relabel(scores), masks, increasing_relabel(maps))
    for name in [*ORDER_ONLY_METRICS, "pixel_aupro"]:  # the official (MVTec-AD) AUPRO is order-based too
        assert before[name] == after[name], name


@settings(max_examples=100, deadline=None)
@given(anomaly_data(), st.data())
def test_streaming_and_merging_equal_one_shot(data, draw):
    labels, scores, masks, maps = data
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(labels)), max_size=4)))
    bounds = [0, *cuts, len(labels)]
    shards = []
    streamed = AnomalyMetricAccumulator(map_dtype=map_dtype_of(maps))
    for start, stop in itertools.pairwise(bounds):
        batch = (labels[start:stop], scores[start:stop])
        pixels = {"masks": masks[start:stop], "maps": maps[start:stop]}
        quietly(streamed.update, *batch, **pixels)
        shard = AnomalyMetricAccumulator(map_dtype=map_dtype_of(maps))
        quietly(shard.update, *batch, **pixels)
        shards.append(shard.state_dict())
    order = draw.draw(st.permutations(range(len(shards))))
    merged = AnomalyMetricAccumulator.from_state_dict(shards[order[0]])
    for index in order[1:]:
        merged.merge(shards[index])
    for variant in ("official", "legacy"):
        expected = quietly(compute_metrics, *data, aupro_variant=variant)
        assert quietly(streamed.compute, aupro_variant=variant) == expected
        assert quietly(merged.compute, aupro_variant=variant) == expected
