"""crane-hf evaluate: per-class metrics equal to an independent computation, one process or two."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from crane_hf import CraneForAnomalyDetection, CraneImageProcessor
from crane_hf.commands.cli import main
from crane_hf.data import generate_synthetic_dataset, load_anomaly_dataset
from crane_hf.evaluation.evaluate import _computation_lines, computation_record, paper_protocol
from crane_hf.metrics import compute_metrics
from crane_hf.model_loading import prompts_origin
from crane_hf.models.crane.gaussian_smoothing import gaussian_smooth

from .tiny_models import (
    launch_two_processes,
    run_process_group,
    save_tiny_model_folder,
    subprocess_environment,
    tiny_model,
)


@pytest.fixture(scope="module")
def evaluation_setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("evaluation")
    model_dir = save_tiny_model_folder(work / "model", "crane+")
    data = generate_synthetic_dataset(
        str(work / "data"), classes=["brick", "coins"], image_size=64, train_good=0, test_good=3, test_defective=1
    )
    return work, model_dir, data


def _expected_metrics(model_dir: str, data: str, **overrides) -> dict[str, dict[str, float]]:
    """Metrics computed image by image with the model, processor, scipy-equal smoothing and compute_metrics."""
    model = CraneForAnomalyDetection.from_pretrained(model_dir, **overrides)
    processor = CraneImageProcessor.from_pretrained(model_dir)
    dataset = load_anomaly_dataset(data, "test")
    per_class: dict[str, list] = {}
    for row in dataset:
        inputs = processor([row["image"]], masks=[row["mask"]])
        with torch.no_grad():
            out = model(inputs["pixel_values"])
        smoothed = gaussian_smooth(out.anomaly_maps, 4.0)[0].numpy()
        per_class.setdefault(row["class_name"], []).append(
            (row["label"], float(out.anomaly_scores[0]), inputs["masks"][0].numpy().astype(bool), smoothed)
        )
    expected = {}
    for name, items in per_class.items():
        labels, scores, masks, maps = zip(*items)
        expected[name] = compute_metrics(np.array(labels), np.array(scores), np.stack(masks), np.stack(maps))
    return expected


def test_evaluate_writes_the_paper_table_with_exact_metrics(evaluation_setup, capsys):
    work, model_dir, data = evaluation_setup
    output = work / "single"
    assert main(["evaluate", "--model", model_dir, "--data", data, "--output", str(output), "--quiet"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    expected = _expected_metrics(model_dir, data)
    assert list(report["metrics"]) == ["brick", "coins", "mean"]
    for name, metrics in expected.items():
        for key, value in metrics.items():
            assert report["metrics"][name][key] == pytest.approx(value, abs=1e-6), (name, key)
    mean_auroc = np.mean([expected[n]["image_auroc"] for n in expected])
    assert report["metrics"]["mean"]["image_auroc"] == pytest.approx(mean_auroc)
    table = (output / "metrics.md").read_text()
    assert "| class | Image AUROC | Image AP | Image F1-max | Pixel AUROC | Pixel AUPRO | Pixel F1-max |" in table
    assert "| **mean** |" in table
    assert (output / "metrics.csv").read_text().startswith("class,")
    assert report["images"] == 16 and report["aupro"] == "official"
    assert report["computation"] == {
        "variant": "crane+",
        "eattn_map_source": "last_layer",
        "dattn_input": "after_attention",
        "deep_prompt_rounding_dtype": "float16",
        "published_computation": True,
        "soft_mean": False,
        "not_applicable": [],
        "feature_layers": [6],
        "image_size": 56,
        "smoothing_sigma": 4.0,
        "aupro": "official",
        "prompts": {"kind": "folder", "path": os.path.abspath(model_dir)},
    }
    head = table.split("| class |")[0]
    assert f"prompts from folder {os.path.abspath(model_dir)}" in head
    published = "computation (the published code's): E-Attn maps last_layer, D-Attn input after_attention"
    assert published + ", deep prompts float16" in head
    assert "soft_mean False, image size 56, smoothing sigma 4.0, AUPRO official" in head
    assert "Wrote metrics.md" in capsys.readouterr().out
    assert main(["evaluate", "--model", model_dir, "--data", data, "--output", str(output), "--quiet"]) == 2


def test_overlays_and_legacy_aupro(evaluation_setup):
    work, model_dir, data = evaluation_setup
    output = work / "overlays"
    argv = [
        "evaluate",
        "--model",
        model_dir,
        "--data",
        f"{data}:test:coins",
        "--output",
        str(output),
        "--aupro",
        "legacy",
        "--save-overlays",
        "--quiet",
    ]
    assert main(argv) == 0
    report = json.loads((output / "metrics.json").read_text())
    assert list(report["metrics"]) == ["coins", "mean"]
    coins = report["metrics"]["coins"]
    assert coins["pixel_aupro"] == coins["pixel_aupro_legacy"] != coins["pixel_aupro_official"]
    assert len(os.listdir(output / "overlays" / "coins")) == 8
    assert not any(name.startswith(".") for name in os.listdir(work))


def test_figures_and_report_refuse_thresholds_calibrated_for_another_computation(evaluation_setup, capsys):
    """Decision figures and report.html state verdicts: thresholds calibrated under another computation are refused
    before any work (as predict refuses them); the metrics alone need no threshold and run."""
    import shutil

    from .tiny_models import write_test_images

    work, model_dir, data = evaluation_setup
    model = work / "stale-model"
    shutil.copytree(model_dir, model)
    write_test_images(work / "stale-normal", count=4, size=(40, 40), seed=3)
    assert main(["calibrate", str(model), str(work / "stale-normal"), "--eattn-maps", "per_layer", "--quiet"]) == 0
    capsys.readouterr()
    argv = ["evaluate", "--model", str(model), "--data", f"{data}:test:coins", "--eattn-maps", "last_layer", "--quiet"]
    for option in ("--save-overlays", "--report"):
        output = work / f"stale{option}"
        assert main([*argv, "--output", str(output), option]) == 2
        err = capsys.readouterr().err
        assert "eattn_map_source 'per_layer' -> 'last_layer'" in err and "Recalibrate" in err, err
        assert "Traceback" not in err and not output.exists()
    assert main([*argv, "--output", str(work / "stale-metrics")]) == 0
    assert (work / "stale-metrics" / "metrics.json").is_file()


def test_computation_options_are_applied_and_recorded(evaluation_setup):
    work, model_dir, data = evaluation_setup
    output = work / "overridden"
    argv = ["evaluate", "--model", model_dir, "--data", data, "--output", str(output), "--quiet"]
    assert main([*argv, "--soft-mean", "--dattn-input", "layer_input", "--deep-prompt-rounding", "none"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    changes = {"soft_mean": True, "dattn_input": "layer_input", "deep_prompt_rounding_dtype": None}
    assert {name: report["computation"][name] for name in changes} == changes
    assert report["computation"]["published_computation"] is False
    assert "computation (differs from the published code's)" in (output / "metrics.md").read_text()
    expected = _expected_metrics(model_dir, data, **changes)
    for name, metrics in expected.items():
        for key, value in metrics.items():
            assert report["metrics"][name][key] == pytest.approx(value, abs=1e-6), (name, key)
    default = _expected_metrics(model_dir, data)
    assert any(abs(default[n][k] - expected[n][k]) > 1e-6 for n in expected for k in expected[n])


def test_prompts_origin_names_presets_folders_hub_ids_and_converted_checkpoints(tmp_path):
    model = tiny_model("crane")
    assert prompts_origin("crane+/mvtec", model) == {"kind": "preset", "preset": "crane+/mvtec"}
    assert prompts_origin("acme/crane-parts", model) == {"kind": "hub", "repo_id": "acme/crane-parts"}
    model.config.converted_from = {"checkpoint": "epoch_5.pth", "sha256": "ab" * 32}
    model.config.preset = "crane/visa"
    origin = prompts_origin(str(tmp_path), model)
    assert origin == {
        "kind": "folder",
        "path": str(tmp_path),
        "preset": "crane/visa",
        "converted_from": {"checkpoint": "epoch_5.pth", "sha256": "ab" * 32},
    }
    record = computation_record(model, str(tmp_path), "legacy", 4.0)
    assert record["prompts"] == origin and record["aupro"] == "legacy" and record["feature_layers"] == [2, 4, 6]
    lines = "\n".join(_computation_lines(record))
    assert "(saved from preset crane/visa) (converted from epoch_5.pth, sha256 " + "ab" * 32 + ")" in lines


def test_two_processes_equal_one(evaluation_setup):
    work, model_dir, data = evaluation_setup
    single = work / "one-process"
    assert main(["evaluate", "--model", model_dir, "--data", data, "--output", str(single), "--quiet"]) == 0
    command = [
        *launch_two_processes("crane_hf.evaluate"),
        "--model",
        model_dir,
        "--data",
        data,
        "--output",
        str(work / "two-processes"),
        "--batch-size",
        "2",
        "--quiet",
    ]
    result = run_process_group(command, env=subprocess_environment(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Wrote metrics.md") == 1
    one = json.loads((single / "metrics.json").read_text())
    two = json.loads((work / "two-processes" / "metrics.json").read_text())
    assert two["processes"] == 2 and two["images"] == one["images"] == 16
    for name in one["metrics"]:
        for key, value in one["metrics"][name].items():
            assert two["metrics"][name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_two_processes_with_skipped_files_exit_and_report_as_one(tmp_path, capsys):
    """Skipped files: --num-processes 2 exits 3 like one process (no launcher traceback), with the same report."""
    model_dir = save_tiny_model_folder(tmp_path / "model", "crane")
    data = generate_synthetic_dataset(
        str(tmp_path / "data"), classes=["brick"], image_size=32, train_good=0, test_good=3, test_defective=1
    )
    os.remove(os.path.join(data, "meta.json"))  # the class folders are read: unused files are found
    truncated = os.path.join(data, "brick", "test", "good", "001.png")
    with open(truncated, "r+b") as stream:
        stream.truncate(os.path.getsize(truncated) // 2)
    deeper = os.path.join(data, "brick", "test", "hole", "later", "000.png")
    os.makedirs(os.path.dirname(deeper))
    shutil.copy(os.path.join(data, "brick", "test", "hole", "000.png"), deeper)
    empty = os.path.join(data, "brick", "ground_truth", "spot", "000_mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(empty)
    argv = ["--model", model_dir, "--data", data, "--batch-size", "2", "--quiet"]
    assert main(["evaluate", *argv, "--output", str(tmp_path / "one")]) == 3
    single_err = capsys.readouterr().err
    command = [sys.executable, "-m", "crane_hf.commands.evaluate", *argv, "--output", str(tmp_path / "two")]
    result = run_process_group([*command, "--num-processes", "2"], env=subprocess_environment(), timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert result.stdout.count("Wrote metrics.md") == 1
    for start, count in (("skipped ", 2), ("warning: ", 1)):
        lines = [line for line in result.stderr.splitlines() if line.startswith(start)]
        assert lines == [line for line in single_err.splitlines() if line.startswith(start)] and len(lines) == count
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one.pop("processes"), two.pop("processes")) == (1, 2)
    assert two["images"] == 7  # 3 good and 5 defect types, less the truncated image
    assert [item["image_path"] for item in two["skipped"]] == [truncated, deeper]
    assert [(item["kind"], item["files"]) for item in two["warnings"]] == [("empty_mask", [empty])]
    assert (tmp_path / "two" / "skipped.txt").read_text() == (tmp_path / "one" / "skipped.txt").read_text()
    for name in one["metrics"]:
        for key, value in one["metrics"][name].items():
            assert two["metrics"][name][key] == pytest.approx(value, abs=1e-6), (name, key)
    assert {key: value for key, value in two.items() if key != "metrics"} == {
        key: value for key, value in one.items() if key != "metrics"
    }
    # Directly under accelerate launch the launcher turns exit 3 into its exit 1; evaluate says so first.
    direct = [*launch_two_processes("crane_hf.commands.evaluate"), *argv, "--output", str(tmp_path / "direct")]
    result = run_process_group(direct, env=subprocess_environment(), timeout=300)
    assert result.returncode == 1
    assert "note: exit code 3 (some files skipped; the report is complete); accelerate launch reports" in result.stderr
    assert json.loads((tmp_path / "direct" / "metrics.json").read_text())["skipped"] == two["skipped"]


def test_suspicious_masks_are_named_once_per_kind_recorded_and_kept_in_the_metrics(evaluation_setup, tmp_path, capsys):
    _, model_dir, _ = evaluation_setup
    data = generate_synthetic_dataset(
        str(tmp_path / "data"), classes=["brick"], image_size=64, train_good=0, test_good=2, test_defective=2
    )
    truth = os.path.join(data, "brick", "ground_truth")
    empty = [os.path.join(truth, "spot", "001_mask.png"), os.path.join(truth, "hole", "000_mask.png")]  # data order
    for path in empty:
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(path)
    full = os.path.join(truth, "crack", "000_mask.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(full)
    dot = np.zeros((64, 64), np.uint8)
    dot[20, 20] = 255  # one pixel of 64 x 64: under a pixel of the 56 x 56 maps, gone after the bilinear resize
    vanishing = os.path.join(truth, "scratch", "001_mask.png")
    Image.fromarray(dot).save(vanishing)
    output = tmp_path / "report"
    assert main(["evaluate", "--model", model_dir, "--data", data, "--output", str(output), "--quiet"]) == 0
    err = capsys.readouterr().err
    kept = "(as the published evaluation counts them)"
    expected_lines = [
        f"warning: evaluate: 2 anomalous image(s) have a mask that marks no pixel; their pixels count as normal in "
        f"the pixel metrics {kept}: {empty[0]}, {empty[1]}",
        "warning: evaluate: 1 anomalous image(s) have a mask whose pixels all vanish at the metrics' size "
        f"(56 x 56); their pixels count as normal in the pixel metrics {kept}: {vanishing}",
        f"warning: evaluate: 1 mask(s) mark every pixel as anomalous; their pixels count as anomalous in the pixel "
        f"metrics {kept}: {full}",
    ]
    assert [line for line in err.splitlines() if line.startswith("warning:")] == expected_lines
    report = json.loads((output / "metrics.json").read_text())
    assert [(w["kind"], w["count"], w["files"]) for w in report["warnings"]] == [
        ("empty_mask", 2, empty),
        ("mask_vanishes", 1, [vanishing]),
        ("full_mask", 1, [full]),
    ]
    assert [w["message"] for w in report["warnings"]] == [line.removeprefix("warning: ") for line in expected_lines]
    # Kept in the metrics, as the published evaluation keeps them: equal to the metrics over every image.
    assert report["images"] == 12 and report["skipped"] == []
    for name, metrics in _expected_metrics(model_dir, data).items():
        for key, value in metrics.items():
            assert report["metrics"][name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_num_processes_report_a_refused_model_once_with_exit_2_like_one_process(evaluation_setup, tmp_path, capsys):
    data = evaluation_setup[2]
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "crane", "image_threshold": 0.5, "image_threshold": 0.7}')
    argv = ["--model", str(broken), "--data", data, "--quiet"]
    assert main(["evaluate", *argv, "--output", str(tmp_path / "one")]) == 2
    single = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    command = [sys.executable, "-m", "crane_hf.commands.evaluate", *argv, "--output", str(tmp_path / "two")]
    result = run_process_group([*command, "--num-processes", "2"], env=subprocess_environment(), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == single and len(single) == 1
    assert "config.json: key 'image_threshold' appears 2 times in one object" in single[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "one").exists() and not (tmp_path / "two").exists()


def test_num_processes_is_checked_before_any_work(evaluation_setup, capsys, monkeypatch):
    work, model_dir, data = evaluation_setup
    argv = ["evaluate", "--model", model_dir, "--data", data, "--output", str(work / "never"), "--quiet"]
    assert main([*argv, "--num-processes", "0"]) == 2
    assert "--num-processes 0: must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # already under accelerate launch
    assert main([*argv, "--num-processes", "2"]) == 2
    assert "under accelerate launch, the launcher's --num_processes decides" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    # One GPU: a second process would be given a second GPU that does not exist.
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    assert main([*argv, "--num-processes", "2"]) == 2
    assert "--num-processes 2: this machine has 1 cuda device(s), one per process" in capsys.readouterr().err
    assert not (work / "never").exists()


def test_paper_protocol_follows_the_spec():
    assert paper_protocol("mvtec") == {
        "dataset": "mvtec",
        "preset": "crane+/visa",
        "soft_mean": False,
        "aupro": "legacy",
    }
    assert paper_protocol("VisA")["preset"] == "crane+/mvtec"
    assert paper_protocol("dagm")["soft_mean"] is True
    assert paper_protocol("BrainMRI") == {
        "dataset": "brainmri",
        "preset": "crane+/mvtec-epoch1",
        "soft_mean": True,
        "aupro": "legacy",
    }
    assert paper_protocol("mvtec_ad", "crane")["preset"] == "crane/visa"
    with pytest.raises(ValueError, match="--dataset"):
        paper_protocol("my-parts")


def test_the_mean_row_says_which_classes_each_metric_averages(tmp_path, tiny_model_dir):
    from .image_files import write_image, write_mask

    root = tmp_path / "data"
    for index in range(2):
        write_image(str(root / "brick" / "test" / "good" / f"{index:03d}.png"), value=100 + index)
        write_image(str(root / "brick" / "test" / "crack" / f"{index:03d}.png"), value=150 + index)
        write_mask(str(root / "brick" / "ground_truth" / "crack" / f"{index:03d}_mask.png"))
        write_image(str(root / "grass" / "test" / "good" / f"{index:03d}.png"), value=90 + index)  # normal only
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_model_dir, "--data", str(root), "--output", str(out), "--quiet"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    metrics = report["metrics"]
    assert metrics["grass"]["image_auroc"] is None and metrics["brick"]["image_auroc"] is not None
    assert metrics["mean"]["image_auroc"] == metrics["brick"]["image_auroc"]  # the mean of one class
    assert report["mean_classes"]["image_auroc"] == ["brick"]
    defined = [name for name in ("brick", "grass") if metrics[name]["pixel_auroc"] is not None]
    assert report["mean_classes"]["pixel_auroc"] == defined
    table = (out / "metrics.md").read_text()
    assert "The mean row averages the classes where a metric is defined: Image AUROC over 1 of 2 (brick)" in table
