"""Thresholds mean what they promise: valid values only, one exact comparison, calibration rates that hold under the
comparison `predict` and the pipeline make, the effective thresholds written, never a NaN threshold."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
from transformers import pipeline

from crane_hf import CraneForAnomalyDetection
from crane_hf.commands.cli import main
from crane_hf.models.crane.thresholds import ValueHistogram, at_or_above, check_threshold, lowest_threshold

from .tiny_models import write_test_images


@pytest.mark.parametrize("value", [True, False, None, [0.5], "0.5", {"v": 1}, math.nan, math.inf, -0.1, 1.5])
def test_threshold_values_are_refused_by_type_and_range(value):
    with pytest.raises(ValueError, match=r"pixel_threshold must be a number in \[0, 1\]"):
        check_threshold(value, "pixel_threshold")


def test_threshold_values_that_are_numbers_in_the_unit_interval_pass():
    assert check_threshold(0, "t") == 0.0 and check_threshold(1, "t") == 1.0
    assert check_threshold(np.float32(0.25), "t") == 0.25


def test_the_comparison_does_not_round_the_threshold_to_float32():
    value = np.array([0.05], dtype=np.float32)  # 0.05000000074505806
    threshold = 0.0500000008  # above the value, but float32(threshold) == value
    assert float(value[0]) < threshold
    assert (value >= threshold).all()  # numpy rounds a Python float to float32 against a float32 array: wrong
    assert not at_or_above(value, threshold).any()
    assert at_or_above(np.float32(0.3), 0.3) is True and at_or_above(0.2999, 0.3) is False


def _brute_force_lowest(values: np.ndarray, fpr: float) -> float:
    """The lowest value v of `values` with count(values >= v) <= floor(fpr * n), or None if there is none."""
    allowed = math.floor(round(fpr * values.size, 9))
    for candidate in sorted(set(values.tolist())):
        if np.count_nonzero(values.astype(np.float64) >= candidate) <= allowed:
            return candidate
    return None


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.1, 0.29, 0.5])
def test_lowest_threshold_is_a_value_and_holds_exactly(fpr):
    rng = np.random.default_rng(3)
    values = rng.beta(2, 5, size=300).astype(np.float32)
    values[:20] = values[20]  # ties
    threshold, rate = lowest_threshold(values, fpr)
    flagged = int(np.count_nonzero(values.astype(np.float64) >= threshold))
    assert flagged / values.size == rate <= fpr
    assert (values >= np.float32(threshold)).sum() == flagged  # float32 comparison: the same decisions
    expected = _brute_force_lowest(values, fpr)
    if expected is None:  # nothing can be flagged: just above the largest value, a float32 number
        assert threshold > values.max() and np.float32(threshold) == threshold
        assert threshold == float(np.nextafter(values.max(), np.float32(np.inf)))
    else:
        assert threshold == expected


def test_decimal_rates_are_read_as_typed():
    values = np.arange(100, dtype=np.float32) / 100
    assert lowest_threshold(values, 0.29)[1] == 0.29  # 29 of 100 flagged, not 28 (0.29 * 100 = 28.999... in binary)


def test_saturated_scores_cannot_meet_the_target_and_say_so():
    threshold, rate = lowest_threshold(np.ones(4, dtype=np.float32), 0.1)
    assert (threshold, rate) == (1.0, 1.0)


@pytest.mark.parametrize("bad", [[np.nan, 0.1], [np.inf], [-0.5], [1.5]])
def test_non_finite_or_out_of_range_values_are_refused(bad):
    with pytest.raises(ValueError):
        lowest_threshold(np.array(bad, dtype=np.float32), 0.1)
    histogram = ValueHistogram()
    with pytest.raises(ValueError):
        histogram.update(np.array(bad, dtype=np.float32))


@pytest.mark.parametrize("fpr", [0.0, 0.001, 0.01, 0.05, 0.3])
def test_the_streaming_histogram_guarantees_the_rate_exactly(fpr):
    rng = np.random.default_rng(7)
    parts = [rng.beta(2, 8, size=20_000).astype(np.float32) for _ in range(5)]
    parts.append(np.full(500, 0.25, dtype=np.float32))  # a big tie
    parts.append(np.array([0.0, -0.0, 0.75], dtype=np.float32))
    histogram = ValueHistogram()
    for part in parts:
        histogram.update(part)
    values = np.concatenate(parts)
    threshold, rate = histogram.threshold(fpr)
    flagged = int(np.count_nonzero(values.astype(np.float64) >= threshold))
    assert rate == flagged / values.size and rate <= fpr
    assert int((values >= np.float32(threshold)).sum()) == flagged
    assert threshold in set(values.tolist()) or threshold == 1.0 or threshold > values.max()
    exact, _ = lowest_threshold(values, fpr)  # the lowest threshold among the values, brute force
    assert exact <= threshold
    bits = lambda v: int(np.float32(v).view(np.uint32)) >> ValueHistogram.DROPPED_BITS  # noqa: E731
    # at most one bin (2^-13 relative) above: no value of a lower bin than the exact one's would do
    in_between = values[(values.astype(np.float64) >= exact) & (values.astype(np.float64) < threshold)]
    assert all(bits(v) == bits(exact) for v in in_between)


def test_a_saturated_histogram_returns_one_with_its_rate():
    histogram = ValueHistogram()
    histogram.update(np.array([1.0, 1.0, 0.2, 0.3], dtype=np.float32))
    assert histogram.threshold(0.1) == (1.0, 0.5)


def test_histogram_takes_float32_only():
    with pytest.raises(TypeError, match="float32"):
        ValueHistogram().update(np.zeros(3))


# ------------------------------------------------------------------ end to end: calibrate, then predict


@pytest.fixture
def calibrated(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    write_test_images(tmp_path / "normal", count=6, size=(37, 53), seed=11)
    return model_dir, tmp_path / "normal"


def test_calibrate_zero_rates_hold_under_predict_on_its_own_images(calibrated, tmp_path):
    model_dir, normal = calibrated
    argv = ["calibrate", str(model_dir), str(normal), "--fpr", "0", "--pixel-fpr", "0", "--quiet", "--batch-size", "4"]
    assert main(argv) == 0
    record = json.loads((model_dir / "calibration.json").read_text())
    assert record["pixel"]["fpr_on_calibration_set"] == 0.0 and record["image"]["fpr_on_calibration_set"] == 0.0
    config = json.loads((model_dir / "config.json").read_text())
    assert np.float32(config["pixel_threshold"]) == config["pixel_threshold"]  # a float32 number: any dtype agrees
    out = tmp_path / "out"
    assert (
        main(["predict", str(normal), "--model", str(model_dir), "--output", str(out), "--quiet", "--save-maps"]) == 0
    )
    predictions = json.loads((out / "predictions.json").read_text())
    assert [row["anomalous_pixel_fraction"] for row in predictions["predictions"]] == [0.0] * 6
    assert not any(row["is_anomalous"] for row in predictions["predictions"])
    for path in sorted((out / "maps").iterdir()):
        anomaly_map = np.load(path)
        assert not (anomaly_map >= config["pixel_threshold"]).any()  # numpy's own float32 comparison too


def test_calibrated_rates_are_the_rates_the_pipeline_gives(calibrated):
    model_dir, normal = calibrated
    assert main(["calibrate", str(model_dir), str(normal), "--fpr", "0.34", "--pixel-fpr", "0.05", "--quiet"]) == 0
    record = json.loads((model_dir / "calibration.json").read_text())
    model = CraneForAnomalyDetection.from_pretrained(model_dir)
    detector = pipeline("zero-shot-anomaly-detection", model=str(model_dir), batch_size=1)
    results = detector(sorted(str(p) for p in normal.iterdir()))
    pixels = np.concatenate([r["anomaly_map"].ravel() for r in results])
    scores = np.array([r["score"] for r in results], dtype=np.float32)
    assert np.count_nonzero(at_or_above(pixels, model.config.pixel_threshold)) / pixels.size == pytest.approx(
        record["pixel"]["fpr_on_calibration_set"], abs=0
    )
    assert record["pixel"]["fpr_on_calibration_set"] <= 0.05
    assert sum(r["is_anomalous"] for r in results) == 2  # floor(0.34 * 6) = 2 images flagged
    assert model.config.image_threshold == lowest_threshold(scores, 0.34)[0]


def test_predict_writes_the_thresholds_it_used(tiny_model_dir, tmp_path):
    write_test_images(tmp_path / "imgs", count=2, seed=5)
    out = tmp_path / "out"
    argv = ["predict", str(tmp_path / "imgs"), "--model", tiny_model_dir, "--output", str(out), "--quiet"]
    assert main([*argv, "--pixel-threshold", "0.123", "--threshold", "0.2", "--save-maps"]) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["pixel_threshold"] == 0.123 and summary["image_threshold"] == 0.2
    for row, path in zip(summary["predictions"], sorted((out / "maps").iterdir())):
        anomaly_map = np.load(path)
        expected = np.count_nonzero(anomaly_map.astype(np.float64) >= 0.123) / anomaly_map.size
        assert row["anomalous_pixel_fraction"] == expected
        assert row["max_pixel_score"] == float(anomaly_map.max())
        assert row["is_anomalous"] == (row["score"] >= 0.2)


def test_a_pixel_threshold_equal_to_the_shown_maximum_flags_that_pixel(tiny_model_dir, tmp_path):
    """The table shows max_pixel_score and anomalous_pixel_fraction at full precision: a threshold typed as the
    shown maximum flags the maximal pixels, and the fraction shown is not rounded to 0."""
    write_test_images(tmp_path / "imgs", count=1, seed=7)
    first, second = tmp_path / "first", tmp_path / "second"
    argv = ["predict", str(tmp_path / "imgs"), "--model", tiny_model_dir, "--quiet", "--no-overlays", "--save-maps"]
    assert main([*argv, "--output", str(first)]) == 0
    shown = json.loads((first / "predictions.json").read_text())["predictions"][0]["max_pixel_score"]
    anomaly_map = np.load(next((first / "maps").iterdir()))
    assert shown == float(anomaly_map.max())
    assert main([*argv, "--output", str(second), "--pixel-threshold", repr(shown)]) == 0
    row = json.loads((second / "predictions.json").read_text())["predictions"][0]
    expected = np.count_nonzero(anomaly_map >= anomaly_map.max()) / anomaly_map.size
    assert row["anomalous_pixel_fraction"] == expected > 0
    with open(second / "predictions.csv", newline="") as stream:
        csv_row = next(csv.DictReader(stream))
    assert float(csv_row["max_pixel_score"]) == shown and float(csv_row["anomalous_pixel_fraction"]) == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [("image_threshold", True), ("pixel_threshold", None), ("pixel_threshold", [0.5]), ("image_threshold", "NaN")],
)
def test_thresholds_in_a_model_folder_are_validated_by_type(tiny_model_dir, tmp_path, capsys, field, value):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config[field] = float("nan") if value == "NaN" else value
    (model_dir / "config.json").write_text(json.dumps(config))  # json writes NaN as the bare literal NaN
    write_test_images(tmp_path / "imgs", count=1)
    argv = ["predict", str(tmp_path / "imgs"), "--model", str(model_dir), "--output", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{model_dir}/config.json: {field} must be a number in [0, 1]" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_pipeline_refuses_a_boolean_threshold(tiny_model_dir):
    detector = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir)
    with pytest.raises(ValueError, match="threshold must be a number"):
        detector(np.zeros((8, 8, 3), dtype=np.uint8), threshold=True)
    with pytest.raises(ValueError, match="pixel_threshold must be a number"):
        detector.model.config.pixel_threshold = None
    assert detector.model.config.pixel_threshold == 0.5


# ------------------------------------------------------------------ thresholds hold for one computation


def _predict(images, model_dir, out, *options):
    return main(["predict", str(images), "--model", str(model_dir), "--output", str(out), "--quiet", *options])


def test_thresholds_are_refused_under_another_computation_than_they_were_calibrated_with(calibrated, tmp_path, capsys):
    model_dir, normal = calibrated
    before = json.loads((model_dir / "config.json").read_text())
    assert before["eattn_map_source"] == "last_layer" and before["image_threshold"] == 0.5
    assert main(["calibrate", str(model_dir), str(normal), "--eattn-maps", "per_layer", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert (
        "computation changes with its new thresholds" in out and "eattn_map_source 'last_layer' -> 'per_layer'" in out
    )
    config = json.loads((model_dir / "config.json").read_text())
    record = json.loads((model_dir / "calibration.json").read_text())
    assert config["eattn_map_source"] == "per_layer"
    assert config["threshold_computation"] == {  # the computation, and no reference memory (zero-shot scores)
        **CraneForAnomalyDetection.from_pretrained(model_dir).config.inference_computation,
        "few_shot_memory": None,
        "dtype": "float32",
    }
    assert config["threshold_computation"]["eattn_map_source"] == "per_layer"
    assert record["previous"]["computation"]["eattn_map_source"] == "last_layer"
    assert record["previous"]["threshold_computation"] is None  # the default thresholds: for any computation
    assert record["computation_changed"] == {"eattn_map_source": {"from": "last_layer", "to": "per_layer"}}

    # Decisions under another computation: refused before any work, naming the field, for every way of asking.
    flip = ["--no-soft-mean"] if config["soft_mean"] else ["--soft-mean"]
    for options, field in (
        (["--eattn-maps", "last_layer"], "eattn_map_source 'per_layer' -> 'last_layer'"),
        (flip, f"soft_mean {config['soft_mean']} -> {not config['soft_mean']}"),
    ):
        out = tmp_path / "refused"
        assert _predict(normal, model_dir, out, *options) == 2
        err = capsys.readouterr().err
        assert field in err and "--threshold" in err and "Recalibrate" in err and "Traceback" not in err
        assert not out.exists()
    images = sorted(str(path) for path in normal.iterdir())
    detector = pipeline(
        "zero-shot-anomaly-detection", model=str(model_dir), model_kwargs={"eattn_map_source": "last_layer"}
    )
    with pytest.raises(ValueError, match=r"image_threshold was calibrated .*eattn_map_source 'per_layer' -> 'last_la"):
        detector(images[0])
    assert detector(images[0], threshold=0.3)["is_anomalous"] == (detector(images[0], threshold=0.3)["score"] >= 0.3)
    with pytest.raises(ValueError, match="pixel_threshold was calibrated"):  # the overlay's contour
        detector(images[0], threshold=0.3, return_overlay=True)
    assert "overlay" in detector(images[0], threshold=0.3, pixel_threshold=0.4, return_overlay=True)
    import crane_hf

    with pytest.raises(ValueError, match="eattn_map_source"):
        crane_hf.load_detector(str(model_dir), device="cpu", eattn_map_source="last_layer")(images[0])

    # Given explicitly, or under the calibrated computation (also given again explicitly): decisions are made.
    assert (
        _predict(
            normal,
            model_dir,
            tmp_path / "explicit",
            "--eattn-maps",
            "last_layer",
            "--threshold",
            "0.3",
            "--pixel-threshold",
            "0.4",
        )
        == 0
    )
    assert _predict(normal, model_dir, tmp_path / "same", "--eattn-maps", "per_layer") == 0
    assert _predict(normal, model_dir, tmp_path / "saved") == 0

    # Calibrating back: "previous" keeps the computation the replaced thresholds were for.
    previous_thresholds = (config["image_threshold"], config["pixel_threshold"])
    assert main(["calibrate", str(model_dir), str(normal), "--eattn-maps", "last_layer", "--quiet"]) == 0
    record = json.loads((model_dir / "calibration.json").read_text())
    assert (record["previous"]["image_threshold"], record["previous"]["pixel_threshold"]) == previous_thresholds
    assert record["previous"]["threshold_computation"] == config["threshold_computation"]
    assert record["previous"]["computation"]["eattn_map_source"] == "per_layer"


def test_a_folder_without_the_record_holds_its_thresholds_for_its_own_computation(tiny_model_dir, tmp_path, capsys):
    write_test_images(tmp_path / "imgs", count=2, seed=5)
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config.get("threshold_computation") is None
    # The default thresholds (0.5: the more probable class) hold under any computation.
    assert _predict(tmp_path / "imgs", model_dir, tmp_path / "default", "--no-soft-mean") == 0
    # A folder calibrated before the record existed: its thresholds are for the computation its config selects.
    (model_dir / "config.json").write_text(json.dumps({**config, "image_threshold": 0.3, "pixel_threshold": 0.4}))
    loaded = CraneForAnomalyDetection.from_pretrained(model_dir)
    assert loaded.config.threshold_computation == loaded.config.inference_computation
    assert _predict(tmp_path / "imgs", model_dir, tmp_path / "own") == 0
    flipped = "--soft-mean" if not config["soft_mean"] else "--no-soft-mean"
    assert _predict(tmp_path / "imgs", model_dir, tmp_path / "other", flipped) == 2
    assert "soft_mean" in capsys.readouterr().err


def test_which_changes_make_thresholds_stale():
    from .tiny_models import tiny_config

    crane = tiny_config("crane", image_threshold=0.3, pixel_threshold=0.4)
    assert crane.threshold_computation == crane.inference_computation
    # Crane has no D-Attn: dattn_input changes no number, the thresholds still hold.
    assert crane.with_overrides(dattn_input="layer_input").stale_threshold_fields() == {}
    assert crane.with_overrides(soft_mean=False).stale_threshold_fields() == {"soft_mean": (True, False)}
    crane_plus = tiny_config("crane+", image_threshold=0.3, pixel_threshold=0.4)
    assert crane_plus.with_overrides(dattn_input="layer_input").stale_threshold_fields() == {
        "dattn_input": ("after_attention", "layer_input")
    }
    # The image score does not depend on the smoothing: only the pixel threshold goes stale.
    smoother = crane.with_overrides(smoothing_sigma=2.0)
    smoother.check_thresholds(image=True, pixel=False)
    with pytest.raises(ValueError, match=r"pixel_threshold was calibrated .*smoothing_sigma 4.0 -> 2.0"):
        smoother.check_thresholds(image=False, pixel=True)
    with pytest.raises(ValueError, match=r"smoothing_sigma 4\.0 -> 8\.0"):  # a pipeline call's sigma counts too
        crane.check_thresholds(image=False, pixel=True, smoothing_sigma=8.0)
    # Both thresholds given with the change: they are taken as given for the new computation.
    given = crane.with_overrides(soft_mean=False, image_threshold=0.2, pixel_threshold=0.6)
    assert given.stale_threshold_fields() == {} and given.threshold_computation["soft_mean"] is False
    # Changes after loading (attributes) are seen too.
    crane.eattn_map_source = "per_layer"
    with pytest.raises(ValueError, match="eattn_map_source 'last_layer' -> 'per_layer'"):
        crane.check_thresholds()


def test_thresholds_hold_for_the_dtype_they_were_calibrated_in(calibrated, tmp_path, capsys):
    """Reduced precision moves scores past neighbouring calibrated ones: thresholds calibrated in float32 do not
    decide bfloat16 scores (refused before any work, naming dtype), and thresholds calibrated in bfloat16 do."""
    model_dir, normal = calibrated
    assert main(["calibrate", str(model_dir), str(normal), "--fpr", "0", "--pixel-fpr", "0", "--quiet"]) == 0
    assert json.loads((model_dir / "config.json").read_text())["threshold_computation"]["dtype"] == "float32"
    capsys.readouterr()
    assert _predict(normal, model_dir, tmp_path / "refused", "--dtype", "bfloat16") == 2
    err = capsys.readouterr().err
    assert "dtype 'float32' -> 'bfloat16'" in err and "with that --dtype" in err and "Traceback" not in err, err
    assert not (tmp_path / "refused").exists()
    assert _predict(normal, model_dir, tmp_path / "float32") == 0
    argv = ["calibrate", str(model_dir), str(normal), "--fpr", "0", "--pixel-fpr", "0", "--quiet"]
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    assert json.loads((model_dir / "config.json").read_text())["threshold_computation"]["dtype"] == "bfloat16"
    assert _predict(normal, model_dir, tmp_path / "bfloat16", "--dtype", "bfloat16") == 0
    assert _predict(normal, model_dir, tmp_path / "float32-again") == 2  # now the float32 run is refused
