"""crane_hf.metrics against scikit-learn and straightforward reference implementations written here."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from crane_hf.metrics import AnomalyMetricAccumulator, MetricUndefinedWarning, compute_metrics, evaluate_module_path

SRC = Path(__file__).resolve().parents[1] / "src"


def make_data(seed: int, num_images: int = 8, size: int = 12, ties: bool = False, shift: float = 0.0):
    """Labels [N], scores [N], masks [N,S,S] (rectangles and loose, often diagonal, pixels), maps [N,S,S] float32."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_images, size, size), dtype=bool)
    for index in range(1, num_images, 2):  # every other image is anomalous, the others are normal
        for _ in range(rng.integers(1, 3)):
            top, left = rng.integers(0, size - 3, 2)
            height, width = rng.integers(1, 4, 2)
            masks[index, top : top + height, left : left + width] = True
        masks[index] |= rng.random((size, size)) < 0.06
    maps = rng.random(masks.shape) + 0.35 * masks + shift
    scores = rng.random(num_images) + 0.3 * masks.any(axis=(1, 2)) + shift
    if ties:
        maps, scores = np.round(maps * 6) / 6, np.round(scores * 4) / 4
    return masks.any(axis=(1, 2)), scores, masks, maps.astype(np.float32)


def reference_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Brute force: F1 of `scores >= t` for every distinct score t."""
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        true_positives = np.sum(predicted & labels)
        best = max(best, 2 * true_positives / (predicted.sum() + labels.sum()))
    return best


def reference_aupro_mvtec(masks: np.ndarray, maps: np.ndarray, max_fpr: float) -> float:
    """MVTec-AD AUPRO with plain loops: every distinct score a threshold, trapezoid cut at max_fpr."""
    regions = []
    for image, mask in enumerate(masks):
        labeled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image, labeled == k) for k in range(1, count + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in sorted(set(maps.ravel().tolist()), reverse=True):
        predicted = maps >= threshold
        fprs.append((predicted & normal).sum() / normal.sum())
        pros.append(np.mean([predicted[image][region].mean() for image, region in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            x1, y1 = max_fpr, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def reference_aupro_legacy(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """The official Crane code's procedure, loop by loop: 200 thresholds, `maps > t` in torch, rescaled FPR."""
    amaps = torch.from_numpy(maps)
    low, high = amaps.min().item(), amaps.max().item()
    regions = [
        (image, region.coords)
        for image, mask in enumerate(masks)
        for region in measure.regionprops(measure.label(mask))
    ]
    normal = ~masks
    fprs, pros = [], []
    for threshold in np.arange(low, high, (high - low) / 200):
        binary = (amaps > threshold).numpy()
        pros.append(
            np.mean([binary[image][coords[:, 0], coords[:, 1]].sum() / len(coords) for image, coords in regions])
        )
        fprs.append(np.logical_and(binary, normal).sum() / normal.sum())
    fprs, pros = np.array(fprs), np.array(pros)
    kept = fprs < max_fpr
    fprs = (fprs[kept] - fprs[kept].min()) / (fprs[kept].max() - fprs[kept].min())
    return auc(fprs, pros[kept])


def assert_results_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert first[key] == second[key], (key, first[key], second[key])


# ---------------------------------------------------------------- agreement with scikit-learn and references


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_ap_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.6
    scores = rng.integers(0, 12, 300) if ties else rng.normal(size=300) + labels
    results = compute_metrics(labels, scores)
    assert results["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert results["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_ap_match_sklearn_on_flattened_pixels(seed, ties):
    _, _, masks, maps = make_data(seed, num_images=10, size=16, ties=ties, shift=-0.5)
    labels, scores = masks.any(axis=(1, 2)), maps.max(axis=(1, 2))
    results = compute_metrics(labels, scores, masks, maps)
    assert results["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert results["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)


@pytest.mark.parametrize("ties", [False, True])
def test_f1_max_matches_brute_force_and_precision_recall_curve(ties):
    labels, scores, masks, maps = make_data(3, num_images=40, size=10, ties=ties)
    results = compute_metrics(labels, scores, masks, maps)
    for key, truth, predicted in (
        ("image_f1_max", labels, scores),
        ("pixel_f1_max", masks.ravel(), maps.ravel()),
    ):
        assert results[key] == pytest.approx(reference_f1_max(truth, predicted), abs=1e-12)
        precision, recall, _ = precision_recall_curve(truth, predicted)
        with np.errstate(invalid="ignore"):
            f1 = 2 * precision * recall / (precision + recall)
        assert results[key] == pytest.approx(np.nanmax(f1), abs=1e-12)


@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
@pytest.mark.parametrize(("seed", "ties"), [(0, False), (1, False), (2, True), (3, True)])
def test_official_aupro_matches_reference(seed, ties, max_fpr):
    labels, scores, masks, maps = make_data(seed, ties=ties, shift=-0.4 * seed)
    results = compute_metrics(labels, scores, masks, maps, aupro_variant="official", max_fpr=max_fpr)
    assert results["pixel_aupro"] == pytest.approx(reference_aupro_mvtec(masks, maps, max_fpr), abs=1e-12)


@pytest.mark.filterwarnings("ignore::crane_hf.metrics.MetricUndefinedWarning")  # a single, anomalous image
def test_official_aupro_counts_diagonal_pixels_as_one_region():
    # One diagonal pair (one 8-connected region) and one lone pixel; only the lone pixel is detected at FPR 0.
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 4, 4] = True
    maps = np.zeros((1, 5, 5), dtype=np.float32)
    maps[0, 4, 4] = 2.0
    maps[0, 0, 0] = maps[0, 1, 1] = 1.0
    results = compute_metrics([1], [1.0], masks, maps, max_fpr=0.5)
    # PRO jumps to 1/2 (lone pixel), then to 1 (pair) before any normal pixel: the whole curve sits at 1.
    assert results["pixel_aupro"] == pytest.approx(1.0)
    maps[0, 1, 1] = 0.0  # half the pair now scores with the normal pixels (ties at 0)
    expected = reference_aupro_mvtec(masks, maps, 0.5)
    assert compute_metrics([1], [1.0], masks, maps, max_fpr=0.5)["pixel_aupro"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("seed", "ties"), [(0, False), (1, False), (2, True), (4, False)])
def test_legacy_aupro_matches_reference(seed, ties):
    labels, scores, masks, maps = make_data(seed, ties=ties, shift=0.2 * seed)
    results = compute_metrics(labels, scores, masks, maps, aupro_variant="legacy")
    assert results["pixel_aupro"] == pytest.approx(reference_aupro_legacy(masks, maps), abs=1e-12)


def test_legacy_compares_thresholds_in_the_maps_dtype():
    # Map values equal to float32(t_k) for thresholds t_k = k / 200 that float32 rounds up: torch (and we) compare
    # `v > float32(t_k)` (False), a float64 comparison would say `v > t_k` (True).
    thresholds = np.arange(0.0, 1.0, 1.0 / 200)
    rounded_up = thresholds.astype(np.float32)[thresholds.astype(np.float32) > thresholds]
    rng = np.random.default_rng(0)
    maps = rng.choice(rounded_up, size=(6, 10, 10)).astype(np.float32)
    maps[:, 0, 0], maps[:, 0, 1] = 0.0, 1.0
    masks = rng.random(maps.shape) < 0.1
    masks[:, 0, :2] = False
    masks[0] = False
    labels, scores = masks.any(axis=(1, 2)), maps.mean(axis=(1, 2))
    ours = compute_metrics(labels, scores, masks, maps, aupro_variant="legacy")["pixel_aupro"]
    assert ours == pytest.approx(reference_aupro_legacy(masks, maps), abs=1e-12)
    # The float64 comparison (NumPy 2 comparing a float32 array with a float64 threshold) gives another value.
    as_float64 = compute_metrics(labels, scores, masks, maps.astype(np.float64), aupro_variant="legacy")
    assert as_float64["pixel_aupro"] != pytest.approx(ours, abs=1e-6)


def test_legacy_aupro_is_not_invariant_to_monotone_transforms_but_official_is():
    labels, scores, masks, maps = make_data(5, num_images=8, size=16)
    cubed = (maps.astype(np.float64) ** 3).astype(np.float64)  # strictly increasing, exact in float64
    for variant, invariant in (("official", True), ("legacy", False)):
        before = compute_metrics(labels, scores, masks, maps.astype(np.float64), aupro_variant=variant)
        after = compute_metrics(labels, scores, masks, cubed, aupro_variant=variant)
        assert (before["pixel_aupro"] == after["pixel_aupro"]) == invariant
        assert before["pixel_auroc"] == after["pixel_auroc"]


# ---------------------------------------------------------------- streaming and merging


def feed(accumulator: AnomalyMetricAccumulator, data, boundaries) -> AnomalyMetricAccumulator:
    labels, scores, masks, maps = data
    for start, stop in itertools.pairwise(boundaries):
        accumulator.update(labels[start:stop], scores[start:stop], masks=masks[start:stop], maps=maps[start:stop])
    return accumulator


@pytest.mark.parametrize("variant", ["official", "legacy"])
@pytest.mark.parametrize(
    "boundaries", [[0, 12], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [0, 5, 6, 12], [0, 3, 6, 9, 12]]
)
def test_streaming_equals_one_shot(boundaries, variant):
    data = make_data(7, num_images=12, size=10, ties=True)
    one_shot = compute_metrics(*data, aupro_variant=variant)
    streamed = feed(AnomalyMetricAccumulator(), data, boundaries).compute(aupro_variant=variant)
    assert_results_equal(streamed, one_shot)


def test_compute_between_updates_sees_all_data():
    data = make_data(13, num_images=10, size=8)
    accumulator = feed(AnomalyMetricAccumulator(), data, [0, 5])
    partial = accumulator.compute()
    assert_results_equal(partial, compute_metrics(*(array[:5] for array in data)))
    feed(accumulator, data, [5, 10])
    for variant in ("official", "legacy"):
        assert_results_equal(accumulator.compute(aupro_variant=variant), compute_metrics(*data, aupro_variant=variant))


def test_merged_accumulators_equal_one_accumulator_in_any_order():
    data = make_data(8, num_images=12, size=10)
    single = feed(AnomalyMetricAccumulator(), data, [0, 4, 8, 12])
    shards = [feed(AnomalyMetricAccumulator(), data, bounds) for bounds in ([0, 2, 4], [4, 5, 8], [8, 12])]
    states = [pickle.loads(pickle.dumps(shard.state_dict())) for shard in shards]  # as gather_object ships them
    merged = AnomalyMetricAccumulator.from_state_dict(states[2])
    merged.merge(shards[0]).merge(states[1]).merge(AnomalyMetricAccumulator())  # an empty shard changes nothing
    assert merged.num_images == 12
    for variant in ("official", "legacy"):
        assert_results_equal(merged.compute(aupro_variant=variant), single.compute(aupro_variant=variant))


def test_float64_maps_keep_full_precision_with_map_dtype_float64():
    labels, scores, masks, maps = make_data(9)
    maps = maps.astype(np.float64) + np.random.default_rng(0).random(maps.shape) * 1e-9
    one_shot = compute_metrics(labels, scores, masks, maps)
    assert one_shot["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    streamed = feed(AnomalyMetricAccumulator(map_dtype=np.float64), (labels, scores, masks, maps), [0, 3, 8])
    assert_results_equal(streamed.compute(), one_shot)
    with pytest.warns(UserWarning, match="stored as float32"):
        AnomalyMetricAccumulator().update(labels, scores, masks=masks, maps=maps)


def test_torch_tensors_give_the_same_results_as_numpy():
    labels, scores, masks, maps = make_data(10)
    expected = compute_metrics(labels, scores, masks, maps)
    tensors = [torch.from_numpy(np.asarray(array)) for array in (labels, scores, masks, maps)]
    assert_results_equal(compute_metrics(*tensors), expected)
    bfloat16 = torch.from_numpy(maps).bfloat16()
    assert_results_equal(
        compute_metrics(labels, scores, masks, bfloat16), compute_metrics(labels, scores, masks, bfloat16.float())
    )


# ---------------------------------------------------------------- undefined metrics and errors


def test_single_class_metrics_are_none_with_a_warning():
    _, scores, masks, maps = make_data(11)
    with pytest.warns(MetricUndefinedWarning, match="only one class"):
        results = compute_metrics(np.ones(len(scores)), scores, masks, maps)
    assert results["image_auroc"] is None and results["image_ap"] is None and results["image_f1_max"] is None
    assert results["pixel_auroc"] is not None
    with pytest.warns(MetricUndefinedWarning, match="all pixels in masks are normal"):
        results = compute_metrics([0, 1], [0.1, 0.9], np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
    assert [results[k] for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")] == [None] * 4


def test_constant_maps_legacy_aupro_is_none_official_is_the_diagonal():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, 1:3, 1:3] = True
    maps = np.full((2, 4, 4), 0.5, dtype=np.float32)
    with pytest.warns(MetricUndefinedWarning, match="all map values are equal"):
        assert compute_metrics([0, 1], [0.0, 1.0], masks, maps, aupro_variant="legacy")["pixel_aupro"] is None
    # One threshold: the curve goes straight from (0, 0) to (1, 1), so the normalized area up to 0.3 is 0.15.
    assert compute_metrics([0, 1], [0.0, 1.0], masks, maps)["pixel_aupro"] == pytest.approx(0.15, abs=1e-12)
    assert reference_aupro_mvtec(masks, maps, 0.3) == pytest.approx(0.15, abs=1e-12)


@pytest.mark.parametrize(("low", "high"), [(-1.7e308, 1.7e308), (0.0, 5e-324)])
def test_legacy_aupro_is_none_when_the_value_range_cannot_be_split(low, high):
    maps = np.array([[[low, high], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = np.array([[[1, 0], [0, 1]], [[0, 0], [0, 0]]])
    with pytest.warns(MetricUndefinedWarning, match="cannot be split into 200 float64 steps"):
        results = compute_metrics([1, 0], [1.0, 0.0], masks, maps, aupro_variant="legacy")
    assert results["pixel_aupro"] is None and results["pixel_auroc"] is not None


GOOD = {"labels": [0, 1, 1], "scores": [0.1, 0.5, 0.7], "masks": np.zeros((3, 4, 4)), "maps": np.zeros((3, 4, 4))}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"labels": [0, 2, 1]}, "labels must be binary"),
        ({"scores": [0.1, float("nan"), 0.3]}, "scores contains NaN"),
        ({"scores": [0.1, float("inf"), 0.3]}, "scores contains infinite"),
        ({"scores": [0.1, 0.2]}, "same length"),
        ({"scores": ["a", "b", "c"]}, "scores must hold real numbers"),
        ({"labels": [[0, 1, 1]]}, "labels must be a 1-D array"),
        ({"masks": np.full((3, 4, 4), 0.5)}, "masks must be binary"),
        ({"maps": np.full((3, 4, 4), np.nan)}, "maps contains NaN"),
        ({"maps": np.zeros((3, 1, 4, 4))}, r"maps must be a 3-D array \[N,H,W\] \(squeeze"),
        ({"maps": np.zeros((3, 4, 5))}, "masks and maps must have the same shape"),
        ({"masks": np.zeros((2, 4, 4)), "maps": np.zeros((2, 4, 4))}, "one \\[H,W\\] map per image"),
        ({"maps": None}, "masks was given without maps"),
        ({"aupro_variant": "mvtec"}, "aupro_variant must be one of"),
        ({"max_fpr": 0.0}, r"max_fpr must be a number in \(0, 1\]"),
        ({"max_fpr": 1.5}, r"max_fpr must be a number in \(0, 1\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        compute_metrics(**{**GOOD, **changes})


def test_accumulator_errors():
    accumulator = AnomalyMetricAccumulator()
    with pytest.raises(ValueError, match="no data"):
        accumulator.compute()
    accumulator.update([0, 1], [0.2, 0.4])
    with pytest.raises(ValueError, match="earlier updates were without masks/maps"):
        accumulator.update([0], [0.1], masks=np.zeros((1, 2, 2)), maps=np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="map_dtype must be float32 or float64"):
        AnomalyMetricAccumulator(map_dtype=np.float16)
    with pytest.raises(ValueError, match="cannot merge accumulators with map_dtype"):
        accumulator.merge(AnomalyMetricAccumulator(map_dtype=np.float64))
    with pytest.raises(TypeError, match="merge\\(\\) takes"):
        accumulator.merge([1, 2])
    state = accumulator.state_dict()
    with pytest.raises(ValueError, match="must be a dict with keys"):
        AnomalyMetricAccumulator.from_state_dict({**state, "extra": 1})
    state["images"]["negative_chunks"] = [np.array([0.3, 0.1])]
    with pytest.raises(ValueError, match="must hold sorted float64 arrays"):
        AnomalyMetricAccumulator.from_state_dict(state)


# ---------------------------------------------------------------- evaluate module


def test_evaluate_load_works_offline_and_matches_compute_metrics(tmp_path):
    labels, scores, masks, maps = make_data(12, num_images=6, size=8)
    np.savez(tmp_path / "data.npz", labels=labels, scores=scores, masks=masks, maps=maps)
    script = """
import json, sys, numpy as np, evaluate
from crane_hf.metrics import evaluate_module_path
data = np.load(sys.argv[1])
metric = evaluate.load(evaluate_module_path(), cache_dir=sys.argv[2])
metric.add_batch(labels=data["labels"][:4], scores=data["scores"][:4], masks=data["masks"][:4], maps=data["maps"][:4])
results = metric.compute(labels=data["labels"][4:], scores=data["scores"][4:], masks=data["masks"][4:],
                         maps=data["maps"][4:], aupro_variant="legacy")
image = evaluate.load(evaluate_module_path(), "image", cache_dir=sys.argv[2])
print(json.dumps([results, image.compute(labels=data["labels"], scores=data["scores"])]))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    completed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data.npz"), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    pixel_results, image_results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert_results_equal(pixel_results, compute_metrics(labels, scores, masks, maps, aupro_variant="legacy"))
    assert_results_equal(image_results, compute_metrics(labels, scores))
    assert Path(evaluate_module_path(), "crane_anomaly_metrics.py").is_file()
