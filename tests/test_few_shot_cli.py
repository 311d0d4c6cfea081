"""Few-shot through the command line: predict --reference, calibrate with a memory, evaluate --shots --seeds, and
one clear line for bad inputs before any work."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

from crane_hf import CraneForAnomalyDetection, CraneImageProcessor
from crane_hf.commands.cli import main
from crane_hf.data import generate_synthetic_dataset, load_anomaly_dataset
from crane_hf.evaluation.few_shot import draw_references, normal_train_rows
from crane_hf.metrics import compute_metrics
from crane_hf.models.crane.gaussian_smoothing import gaussian_smooth
from crane_hf.models.crane.reference_memory import MEMORY_FILE_NAME, ReferenceMemory, file_fingerprint

from .tiny_models import save_tiny_model_folder, tiny_model, write_test_images


def error_lines(stderr: str) -> list[str]:
    """stderr without blank lines and transformers' weight-loading progress bar."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("Loading weights")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("few_shot_cli")
    model_dir = save_tiny_model_folder(work / "model", "crane+")
    good = write_test_images(work / "good", count=3, seed=1)
    parts = write_test_images(work / "parts", count=4, seed=2)
    return work, model_dir, good, parts


def test_predict_with_reference_folder_writes_fused_and_branch_scores(setup, capsys):
    from transformers import pipeline

    work, model_dir, good, _ = setup
    output = work / "predicted"
    argv = ["predict", str(work / "parts"), "--model", model_dir, "--output", str(output), "--quiet"]
    assert main([*argv, "--reference", str(work / "good"), "--no-overlays"]) == 0
    with open(output / "predictions.csv", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    expected = pipeline("zero-shot-anomaly-detection", model=model_dir, reference_images=sorted(good))
    for row in rows:
        result = expected(row["path"])
        assert float(row["score"]) == pytest.approx(result["score"], abs=1e-6)
        assert float(row["few_shot_score"]) == pytest.approx(result["few_shot_score"], abs=1e-6)
        assert float(row["zero_shot_score"]) == pytest.approx(result["zero_shot_score"], abs=1e-6)
    summary = json.loads((output / "predictions.json").read_text())
    assert summary["reference_memory"]["images"] == 3
    assert summary["reference_memory"]["fingerprints"] == [file_fingerprint(path) for path in sorted(good)]


def test_predict_with_a_saved_memory_file_equals_the_folder(setup):
    work, model_dir, good, _ = setup
    from transformers import pipeline

    memory = pipeline("zero-shot-anomaly-detection", model=model_dir).build_reference_memory(sorted(good))
    memory.save(work / "memory.safetensors")
    outputs = []
    for name, reference in (("from_file", str(work / "memory.safetensors")), ("from_folder", str(work / "good"))):
        argv = ["predict", str(work / "parts"), "--model", model_dir, "--output", str(work / name), "--quiet"]
        assert main([*argv, "--reference", reference, "--no-overlays"]) == 0
        outputs.append((work / name / "predictions.csv").read_text())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("empty", "--reference {work}/empty: folder holds no image files"),
        ("broken", "--reference {work}/broken/bad.png: "),
        ("other.safetensors", "--reference {work}/other.safetensors was built with other backbone weights"),
        ("notmemory.safetensors", "--reference {work}/notmemory.safetensors: not a crane-hf reference memory"),
        ("missing.safetensors", "--reference {work}/missing.safetensors: no such file"),
    ],
)
def test_bad_references_are_refused_in_one_line_before_any_work(setup, capsys, reference, message):
    work, model_dir, _, _ = setup
    os.makedirs(work / "empty", exist_ok=True)
    os.makedirs(work / "broken", exist_ok=True)
    (work / "broken" / "bad.png").write_bytes(b"not a png")
    tiny_model("crane+", seed=7).build_reference_memory(torch.randn(1, 3, 56, 56), ["a"]).save(
        work / "other.safetensors"
    )
    (work / "notmemory.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    output = work / f"refused_{reference}"
    argv = ["predict", str(work / "parts"), "--model", model_dir, "--output", str(output), "--quiet"]
    assert main([*argv, "--reference", str(work / reference)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: " + message.format(work=work)), err
    assert not output.exists()


def test_calibrate_with_reference_saves_the_memory_and_fused_thresholds(setup, tmp_path, capsys):
    from transformers import pipeline

    _, _, good, parts = setup
    folder = save_tiny_model_folder(tmp_path / "model", "crane+")
    # The calibration images include a reference image: it is left out (its memory finds it perfectly normal).
    assert main(["calibrate", folder, *parts, good[0], "--reference", *good[:2], "--quiet", "--fpr", "0.25"]) == 0
    assert f"note: left out {good[0]} (a reference image" in capsys.readouterr().err
    record = json.loads((tmp_path / "model" / "calibration.json").read_text())
    assert record["normal_images"] == len(parts)
    assert record["reference_images_left_out"] == [good[0]]
    assert (tmp_path / "model" / MEMORY_FILE_NAME).is_file()
    memory = ReferenceMemory.load(tmp_path / "model" / MEMORY_FILE_NAME)
    assert memory.fingerprints == [file_fingerprint(path) for path in good[:2]]
    # The folder now scores few-shot by default, and its threshold is the fused scores' threshold.
    detector = pipeline("zero-shot-anomaly-detection", model=folder)
    scores = np.array([detector(path)["score"] for path in parts], dtype=np.float32)
    assert "few_shot_score" in detector(parts[0])
    threshold = json.loads((tmp_path / "model" / "config.json").read_text())["image_threshold"]
    assert threshold in scores.tolist() and np.mean(scores >= threshold) <= 0.25


def test_calibrate_on_reference_images_only_says_they_were_all_left_out(setup, tmp_path, capsys):
    _, _, good, _ = setup
    folder = save_tiny_model_folder(tmp_path / "model", "crane+")
    before = (tmp_path / "model" / "config.json").read_bytes()
    capsys.readouterr()
    copy = tmp_path / "copy_of_good_0.png"  # the same image under another name is a reference image too
    shutil.copyfile(good[0], copy)
    assert main(["calibrate", folder, *good[:2], str(copy), "--reference", *good[:2], "--quiet"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert err[0].startswith("error: all 3 normal images given to calibrate are reference images"), err
    assert "left out" in err[0] and "that are not its reference images" in err[0], err
    assert (tmp_path / "model" / "config.json").read_bytes() == before
    assert not (tmp_path / "model" / MEMORY_FILE_NAME).exists()


def test_predict_refuses_inputs_that_are_reference_images_before_any_work(setup, tmp_path, capsys):
    """An input that is a reference image (the same file, or a copy under another name) matches itself in the
    memory and would pass as normal: predict refuses the run before scoring, naming the files."""
    work, model_dir, good, parts = setup
    copy = tmp_path / "renamed.png"
    shutil.copyfile(good[1], copy)
    memory_file = tmp_path / "memory.safetensors"
    from transformers import pipeline

    pipeline("zero-shot-anomaly-detection", model=model_dir).build_reference_memory(sorted(good)).save(memory_file)
    for reference, inputs, named in (
        ([str(work / "good")], [*parts, good[0]], [good[0]]),  # by path
        ([str(work / "good")], [*parts, str(copy)], [str(copy)]),  # by content
        ([str(memory_file)], [*parts, str(copy), good[2]], [str(copy), good[2]]),  # a saved memory: by content
    ):
        output = tmp_path / "refused"
        argv = ["predict", *inputs, "--model", model_dir, "--output", str(output), "--quiet", "--no-overlays"]
        assert main([*argv, "--reference", *reference]) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith(f"error: {len(named)} of the inputs are reference images"), err
        assert all(name in err[0] for name in named) and not any(part in err[0] for part in parts), err
        assert not output.exists() and not any(tmp_path.glob(".refused*"))
    # the image column of a dataset (bytes embedded in a Parquet file): by content
    import datasets

    embedded = [*parts, good[1]]
    table = datasets.Dataset.from_dict({"image": embedded, "image_path": embedded})
    table.cast_column("image", datasets.Image()).map(lambda row: row).to_parquet(str(tmp_path / "images.parquet"))
    capsys.readouterr()
    output = tmp_path / "refused_dataset"
    argv = ["predict", "--dataset", str(tmp_path / "images.parquet"), "--model", model_dir, "--output", str(output)]
    assert main([*argv, "--quiet", "--no-overlays", "--reference", str(work / "good")]) == 2
    err = error_lines(capsys.readouterr().err)
    err = [line for line in err if not line.startswith("Generating train split")]  # datasets' progress bar
    assert len(err) == 1 and err[0].startswith("error: 1 of the inputs are reference images") and good[1] in err[0]
    assert not output.exists()
    # a model folder that holds a memory is refused the same way
    folder = save_tiny_model_folder(tmp_path / "model", "crane+")
    assert main(["calibrate", folder, *parts, "--reference", *good[:2], "--quiet"]) == 0
    capsys.readouterr()
    output = tmp_path / "refused_folder_memory"
    assert main(["predict", *parts, str(copy), "--model", folder, "--output", str(output), "--quiet"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(copy) in err[0], err
    assert main(["predict", *parts, "--model", folder, "--output", str(output), "--quiet"]) == 0


def test_thresholds_hold_only_for_the_memory_they_were_calibrated_with(setup, tmp_path, capsys):
    """Zero-shot thresholds are not decisions on fused scores, nor one memory's thresholds on another's: predict
    and the pipeline refuse them before any work, naming few_shot_memory; given explicitly, they are used."""
    from transformers import pipeline

    _, _, good, parts = setup
    folder = save_tiny_model_folder(tmp_path / "model", "crane+")
    assert main(["calibrate", folder, *parts, "--quiet", "--fpr", "0.25"]) == 0  # zero-shot thresholds
    assert (
        json.loads((tmp_path / "model" / "config.json").read_text())["threshold_computation"]["few_shot_memory"]
        is None
    )
    capsys.readouterr()
    argv = ["predict", *parts, "--model", folder, "--quiet", "--no-overlays"]
    out = tmp_path / "refused"
    assert main([*argv, "--output", str(out), "--reference", *good]) == 2
    err = capsys.readouterr().err
    assert "few_shot_memory None -> 'sha256:" in err and "--reference" in err and "Traceback" not in err, err
    assert not out.exists()
    with pytest.raises(ValueError, match="few_shot_memory None"):
        pipeline("zero-shot-anomaly-detection", model=folder)(parts[0], reference_images=good)
    assert (
        main(
            [
                *argv,
                "--output",
                str(tmp_path / "explicit"),
                "--reference",
                *good,
                "--threshold",
                "0.4",
                "--pixel-threshold",
                "0.5",
            ]
        )
        == 0
    )
    assert main([*argv, "--output", str(tmp_path / "zero-shot")]) == 0  # the calibrated computation: decided

    # Calibrated with a memory: the folder's own memory decides; another memory, or none, is refused.
    assert main(["calibrate", folder, *parts, "--reference", *good[:2], "--quiet", "--fpr", "0.25"]) == 0
    identity = ReferenceMemory.load(tmp_path / "model" / MEMORY_FILE_NAME).identity
    record = json.loads((tmp_path / "model" / "config.json").read_text())["threshold_computation"]
    assert record["few_shot_memory"] == identity
    capsys.readouterr()
    assert main([*argv, "--output", str(tmp_path / "own-memory")]) == 0
    assert main([*argv, "--output", str(tmp_path / "same-memory"), "--reference", *reversed(good[:2])]) == 0
    assert main([*argv, "--output", str(tmp_path / "other"), "--reference", *good]) == 2
    assert f"few_shot_memory '{identity}' -> 'sha256:" in capsys.readouterr().err
    detector = pipeline("zero-shot-anomaly-detection", model=folder)
    assert detector(parts[0])["is_anomalous"] == (detector(parts[0])["score"] >= detector.model.config.image_threshold)
    with pytest.raises(ValueError, match="few_shot_memory"):
        detector(parts[0], reference_images=good)


@pytest.fixture(scope="module")
def shots_setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("few_shot_eval")
    model_dir = save_tiny_model_folder(work / "model", "crane+")
    data = generate_synthetic_dataset(
        str(work / "data"),
        classes=["brick", "coins"],
        defects=["spot"],
        image_size=64,
        train_good=4,
        test_good=2,
        test_defective=2,
    )
    return work, model_dir, data


def _expected_few_shot(model_dir: str, data: str, shots: int, seed: int) -> dict[str, dict[str, float]]:
    """Fused metrics computed image by image: each class's memory of the drawn train images, then compute_metrics."""
    model = CraneForAnomalyDetection.from_pretrained(model_dir)
    processor = CraneImageProcessor.from_pretrained(model_dir)
    train, test = load_anomaly_dataset(data, "train"), load_anomaly_dataset(data, "test")
    draws = draw_references(normal_train_rows(train), ["brick", "coins"], shots, seed)
    expected = {}
    for name, rows in draws.items():
        pixels = processor([train[row]["image"] for row in rows])["pixel_values"]
        memory = model.build_reference_memory(pixels, [str(row) for row in rows])
        items = []
        for row in (r for r in test if r["class_name"] == name):
            inputs = processor([row["image"]], masks=[row["mask"]])
            with torch.no_grad():
                out = model(inputs["pixel_values"], reference_memory=memory)
            smoothed = gaussian_smooth(out.fused_maps, 4.0)[0].numpy()
            items.append((row["label"], float(out.fused_scores[0]), inputs["masks"][0].numpy().astype(bool), smoothed))
        labels, scores, masks, maps = zip(*items)
        expected[name] = compute_metrics(np.array(labels), np.array(scores), np.stack(masks), np.stack(maps))
    return expected


def test_evaluate_shots_averages_the_seeds_with_their_spread(shots_setup):
    work, model_dir, data = shots_setup
    output = work / "eval"
    argv = ["evaluate", "--model", model_dir, "--data", data, "--output", str(output), "--quiet"]
    assert main([*argv, "--shots", "2", "--seeds", "2"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    few_shot = report["few_shot"]
    assert few_shot["shots"] == 2 and few_shot["seeds"] == [0, 1]
    per_seed = [_expected_few_shot(model_dir, data, 2, seed) for seed in (0, 1)]
    for name in ("brick", "coins"):
        for key in ("image_auroc", "pixel_auroc", "pixel_f1_max"):
            values = [per_seed[seed][name][key] for seed in (0, 1)]
            for seed in (0, 1):
                assert few_shot["per_seed"][str(seed)]["fused"][name][key] == pytest.approx(values[seed], abs=1e-6)
            assert few_shot["metrics"]["fused"]["mean"][name][key] == pytest.approx(np.mean(values), abs=1e-6)
            assert few_shot["metrics"]["fused"]["std"][name][key] == pytest.approx(np.std(values), abs=1e-6)
            assert report["metrics"][name][key] == pytest.approx(np.mean(values), abs=1e-6)
        for seed in (0, 1):
            paths = few_shot["reference_images"][str(seed)][name]
            assert len(paths) == 2 and all(f"{name}/train/good/" in path for path in paths)
    assert " ± " in (output / "metrics.md").read_text()


@pytest.mark.parametrize("re_encode", [False, True])
def test_evaluate_shots_leaves_a_classs_reference_images_out_of_its_test_images(
    tmp_path, monkeypatch, capsys, re_encode
):
    """A test image that is one of the drawn reference images (here: copies of every normal train image of brick,
    under other names, among its test images; byte copies, or re-encoded: the same pixels in other bytes) would be
    compared with itself: it is left out of that seed's scored images, and one line says how many were."""
    from PIL import Image

    from crane_hf.evaluation import few_shot
    from crane_hf.training.data_loading import image_file

    model_dir = save_tiny_model_folder(tmp_path / "model", "crane+")
    data = generate_synthetic_dataset(
        str(tmp_path / "data"), classes=["brick", "coins"], defects=["spot"], image_size=64, train_good=4,
        test_good=2, test_defective=2,
    )  # fmt: skip
    copies = {}
    for path in sorted((tmp_path / "data" / "brick" / "train" / "good").iterdir()):
        copy = tmp_path / "data" / "brick" / "test" / "good" / f"copy_{path.name}"
        if re_encode:
            Image.open(path).save(copy, compress_level=1)
            assert copy.read_bytes() != path.read_bytes()
        else:
            shutil.copyfile(path, copy)
        copies[os.path.realpath(path)] = str(copy)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    meta["test"]["brick"] += [
        {"img_path": f"brick/test/good/{os.path.basename(copy)}", "mask_path": "", "cls_name": "brick",
         "specie_name": "good", "anomaly": 0}
        for copy in copies.values()
    ]  # fmt: skip
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    scored: list[set[str]] = []
    original = few_shot.score_with_memories

    def spy(model, processor, dataset, rows, *args, **kwargs):
        scored.append({os.path.realpath(image_file(dataset[row])) for row in rows})
        return original(model, processor, dataset, rows, *args, **kwargs)

    monkeypatch.setattr(few_shot, "score_with_memories", spy)
    every_test_image = {os.path.realpath(p) for p in (tmp_path / "data").glob("*/test/*/*.png")}
    output = tmp_path / "eval"
    argv = ["evaluate", "--model", model_dir, "--data", data, "--output", str(output), "--quiet"]
    assert main([*argv, "--shots", "2", "--seeds", "2"]) == 0
    captured = capsys.readouterr()
    report = json.loads((output / "metrics.json").read_text())["few_shot"]
    assert len(scored) == 2
    for seed in (0, 1):
        drawn = report["reference_images"][str(seed)]["brick"]
        left_out = {os.path.realpath(copies[os.path.realpath(path)]) for path in drawn}
        assert len(left_out) == 2
        assert scored[seed] == every_test_image - left_out  # the set of scored paths
        assert sorted(map(os.path.realpath, report["reference_images_left_out"][str(seed)])) == sorted(left_out)
    lines = [line for line in (captured.out + captured.err).splitlines() if "reference images" in line]
    assert lines == [
        "note: left out the test images that are reference images of their class's memory (compared with "
        "themselves otherwise): 2 in seed 0, 2 in seed 1; the metrics are on the other test images"
    ], lines


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shots", "5"], "--shots 5: not enough normal train images in"),
        (["--shots", "0"], "--shots 0: must be at least 1"),
        (["--seeds", "2"], "--seeds 2: only with --shots"),
        (["--shots", "1", "--save-overlays"], "--save-overlays: not available with --shots"),
    ],
)
def test_evaluate_shots_refuses_bad_arguments_in_one_line(shots_setup, capsys, extra, message):
    work, model_dir, data = shots_setup
    output = work / "refused"
    argv = ["evaluate", "--model", model_dir, "--data", data, "--output", str(output), "--quiet", *extra]
    assert main(argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not output.exists()


def test_predict_and_calibrate_leave_out_a_reference_image_re_encoded(setup, tmp_path, capsys):
    """The same pixels under other bytes (a PNG re-encoded) are a reference image: predict cannot know before reading
    it, so it is skipped with its reason (exit 3, the other images scored); calibrate leaves it out of the
    thresholds and names it."""
    from PIL import Image

    work, model_dir, good, parts = setup
    reencoded = tmp_path / "reencoded.png"
    Image.open(good[0]).save(reencoded, compress_level=1)
    output = tmp_path / "predicted"
    argv = ["predict", *parts, str(reencoded), "--model", model_dir, "--output", str(output), "--quiet"]
    capsys.readouterr()
    assert main([*argv, "--no-overlays", "--reference", str(work / "good")]) == 3
    err = error_lines(capsys.readouterr().err)
    assert err == [
        f"skipped {reencoded}: the same pixels as a reference image of the few-shot memory (compared with "
        "itself it would score as normal)"
    ], err
    with open(output / "predictions.csv", encoding="utf-8") as stream:
        assert sorted(row["path"] for row in csv.DictReader(stream)) == sorted(parts)
    folder = save_tiny_model_folder(tmp_path / "model", "crane+")
    assert main(["calibrate", folder, *parts, str(reencoded), "--reference", *good, "--quiet"]) == 0
    record = json.loads((tmp_path / "model" / "calibration.json").read_text())
    assert record["normal_images"] == len(parts)
    assert record["reference_images_left_out"] == [str(reencoded)]
    assert f"note: left out {reencoded} (a reference image of the few-shot memory)" in capsys.readouterr().err
    before = (tmp_path / "model" / "config.json").read_bytes()
    assert main(["calibrate", folder, str(reencoded), "--reference", *good, "--quiet"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: all 1 normal images given to calibrate are reference"), err
    assert (tmp_path / "model" / "config.json").read_bytes() == before
