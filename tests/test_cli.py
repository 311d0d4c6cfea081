"""The crane-hf command line on tiny model folders: predict, calibrate, push --dry-run, --help everywhere."""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from crane_hf import CraneConfig, CraneForAnomalyDetection
from crane_hf.commands.calibrate import threshold_for_fpr
from crane_hf.commands.cli import COMMANDS, main
from crane_hf.computation_options import add_computation_arguments, computation_overrides
from crane_hf.models.crane import configuration_crane

from .tiny_models import write_test_images


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    write_test_images(folder, count=5)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "sub_gray.bmp")
    return folder


def test_console_script_and_help_on_every_command():
    result = subprocess.run(["crane-hf", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "predict" in result.stdout
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0


def test_predict_writes_tables_and_overlays_and_skips_unreadable_files(tiny_model_dir, image_folder, tmp_path, capsys):
    output = tmp_path / "results"
    code = main(
        [
            "predict",
            str(image_folder),
            "--model",
            tiny_model_dir,
            "--output",
            str(output),
            "--batch-size",
            "2",
            "--quiet",
        ]
    )
    assert code == 3  # finished, some inputs skipped
    with open(output / "predictions.csv", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert sorted(os.path.basename(r["path"]) for r in rows) == [
        "part_0.png",
        "part_1.png",
        "part_2.png",
        "part_3.png",
        "part_4.png",
        "sub_gray.bmp",
    ]
    for row in rows:
        assert 0.0 <= float(row["score"]) <= 1.0
        figure = Image.open(output / row["overlay"])  # a decision figure: image | heatmap | decision
        source = Image.open(row["path"])
        assert figure.mode == "RGB" and figure.width > 3 * 200
        assert figure.text["Image size"] == f"{source.width}x{source.height}"
        assert figure.text["Score"] == row["score"] == repr(float(row["score"]))  # the decided value, unrounded
        assert figure.text["Verdict"] == ("ANOMALOUS" if row["is_anomalous"] == "True" else "OK")
        assert os.path.basename(row["overlay"]).endswith(f"_images_{os.path.basename(row['path'])}.png")
    summary = json.loads((output / "predictions.json").read_text())
    assert len(summary["predictions"]) == 6
    skipped = {os.path.basename(item["path"]): item["reason"] for item in summary["skipped"]}
    assert set(skipped) == {"empty.png", "notes.jpg"}
    assert "not a readable image" in skipped["notes.jpg"]
    assert "skipped" in capsys.readouterr().err
    assert (output / "skipped.txt").read_text().count("\n") == 2
    # the scores equal the pipeline's
    detector = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir)
    first = next(r for r in rows if r["path"].endswith("part_1.png"))
    assert float(first["score"]) == pytest.approx(detector(first["path"])["score"], abs=1e-5)


def test_predict_never_overwrites_without_asking(tiny_model_dir, image_folder, tmp_path, capsys):
    output = tmp_path / "results"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    argv = ["predict", str(image_folder / "part_0.png"), "--model", tiny_model_dir, "--output", str(output), "--quiet"]
    assert main(argv) == 2
    assert "already exists and was not written by crane-hf" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 2  # a folder crane-hf did not write is never replaced
    assert "not written by crane-hf" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "precious"
    os.remove(output / "keep.txt")
    assert main(argv) == 0  # an empty folder is used
    assert main(argv) == 2 and "pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0  # its own output is replaced
    assert (output / "predictions.csv").is_file()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".results")] == []  # no staging or lock left behind


def test_predict_globs_missing_inputs_and_maps(tiny_model_dir, image_folder, tmp_path):
    output = tmp_path / "results"
    pattern = str(image_folder / "part_*.png")
    code = main(
        [
            "predict",
            pattern,
            str(tmp_path / "nope.png"),
            "--model",
            tiny_model_dir,
            "--output",
            str(output),
            "--save-maps",
            "--no-overlays",
            "--quiet",
        ]
    )
    assert code == 3
    summary = json.loads((output / "predictions.json").read_text())
    assert len(summary["predictions"]) == 5 and summary["skipped"][0]["path"].endswith("nope.png")
    maps = sorted(os.listdir(output / "maps"))
    assert len(maps) == 5 and np.load(output / "maps" / maps[0]).dtype == np.float32
    assert not (output / "overlays").exists()


def test_predict_reports_a_bad_model_clearly(tmp_path, image_folder, capsys):
    assert (
        main(
            [
                "predict",
                str(image_folder),
                "--model",
                str(tmp_path / "missing-model"),
                "--output",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_threshold_for_fpr_is_the_lowest_threshold_meeting_the_target():
    values = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    threshold, rate = threshold_for_fpr(values, 0.2)
    assert rate == pytest.approx(0.2) and 0.8 < threshold <= 0.9
    assert threshold_for_fpr(values, 0.0)[1] == 0.0
    assert threshold_for_fpr(np.ones(4), 0.1) == (1.0, 1.0)  # cannot do better than 1.0 on saturated scores
    with pytest.raises(ValueError, match="fpr"):
        threshold_for_fpr(values, 1.0)


def test_calibrate_saves_thresholds_into_the_model_folder(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    normal = write_test_images(tmp_path / "normal", count=10, seed=3)
    assert (
        main(["calibrate", str(model_dir), str(tmp_path / "normal"), "--fpr", "0.2", "--pixel-fpr", "0.05", "--quiet"])
        == 0
    )
    record = json.loads((model_dir / "calibration.json").read_text())
    model = CraneForAnomalyDetection.from_pretrained(model_dir)
    assert model.config.image_threshold == record["image"]["threshold"]
    assert model.config.pixel_threshold == record["pixel"]["threshold"]
    assert (record["previous"]["image_threshold"], record["previous"]["pixel_threshold"]) == (0.5, 0.5)
    assert record["previous"]["threshold_computation"] is None  # the default thresholds hold for any computation
    assert record["previous"]["computation"] == record["computation"] and record["computation_changed"] == {}
    recorded = {**model.config.inference_computation, "few_shot_memory": None, "dtype": "float32"}
    assert model.config.threshold_computation == recorded
    detector = pipeline("zero-shot-anomaly-detection", model=str(model_dir))
    results = detector(normal)
    flagged = sum(r["is_anomalous"] for r in results)
    assert flagged <= 2  # at most 20% of the normal images
    pixels = np.concatenate([r["anomaly_map"].ravel() for r in results])
    assert (pixels >= model.config.pixel_threshold).mean() <= 0.05 + 1e-3  # float rounding across batch sizes


def test_predict_applies_computation_options(tiny_model_dir, tmp_path, capsys):
    images = write_test_images(tmp_path / "images", count=3)
    common = ["predict", str(tmp_path / "images"), "--model", tiny_model_dir, "--no-overlays", "--quiet"]
    assert main([*common, "--output", str(tmp_path / "default")]) == 0
    options = [
        "--soft-mean",
        "--dattn-input",
        "layer_input",
        "--deep-prompt-rounding",
        "none",
        "--eattn-maps",
        "per_layer",
    ]
    assert main([*common, "--output", str(tmp_path / "changed"), *options]) == 0
    default = json.loads((tmp_path / "default" / "predictions.json").read_text())
    changed = json.loads((tmp_path / "changed" / "predictions.json").read_text())
    changes = {
        "soft_mean": True,
        "dattn_input": "layer_input",
        "deep_prompt_rounding_dtype": None,
        "eattn_map_source": "per_layer",
    }
    assert default["computation"]["published_computation"] is True
    assert {name: changed["computation"][name] for name in changes} == changes
    detector = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir, model_kwargs=changes)  # transformers' way
    assert detector.model.config.computation == {name: changes[name] for name in detector.model.config.computation}
    expected = {os.path.basename(path): result["score"] for path, result in zip(images, detector(images))}
    scores = {os.path.basename(row["path"]): row["score"] for row in changed["predictions"]}
    assert scores == pytest.approx(expected, abs=1e-6)
    assert any(abs(a["score"] - b["score"]) > 1e-4 for a, b in zip(default["predictions"], changed["predictions"]))
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--output", str(tmp_path / "bad"), "--eattn-maps", "every_layer"])
    assert exit_info.value.code == 2 and "invalid choice: 'every_layer'" in capsys.readouterr().err


def test_computation_options_offer_exactly_the_values_the_config_accepts():
    # The options are defined without importing transformers (fast --help), so their choices are written out again:
    # every value offered must build a model config, and every value the config accepts must be offered.
    parser = argparse.ArgumentParser()
    add_computation_arguments(parser)
    options = {"--eattn-maps": "eattn_map_source", "--dattn-input": "dattn_input"}
    options["--deep-prompt-rounding"] = "deep_prompt_rounding_dtype"
    accepted = {
        "eattn_map_source": configuration_crane.EATTN_MAP_SOURCES,
        "dattn_input": configuration_crane.DATTN_INPUTS,
        "deep_prompt_rounding_dtype": configuration_crane.DEEP_PROMPT_ROUNDING_DTYPES,
    }
    for option, field in options.items():
        (action,) = (action for action in parser._actions if option in action.option_strings)
        offered = [computation_overrides(parser.parse_args([option, choice]))[field] for choice in action.choices]
        assert sorted(offered, key=str) == sorted(accepted[field], key=str)
        for value in offered:
            assert getattr(CraneConfig(**{field: value}), field) == value
        with pytest.raises(ValueError, match=field):
            CraneConfig(**{field: "something_else"})
    assert computation_overrides(parser.parse_args([])) == {}
    assert computation_overrides(parser.parse_args(["--no-soft-mean"])) == {"soft_mean": False}


def test_calibrate_saves_the_computation_its_thresholds_hold_for(tiny_model_dir, tmp_path):
    write_test_images(tmp_path / "normal", count=4, seed=3)
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    assert main(["calibrate", str(model_dir), str(tmp_path / "normal"), "--soft-mean", "--quiet"]) == 0
    saved = json.loads((model_dir / "config.json").read_text())
    record = json.loads((model_dir / "calibration.json").read_text())
    assert saved["soft_mean"] is True and record["overrides"] == {"soft_mean": True}
    assert record["computation"]["soft_mean"] is True
    # A folder saved with the old switch: a changed computation field replaces it with the three new fields.
    legacy_dir = tmp_path / "legacy"
    shutil.copytree(tiny_model_dir, legacy_dir)
    config = json.loads((legacy_dir / "config.json").read_text())
    for name in ("eattn_map_source", "dattn_input", "deep_prompt_rounding_dtype"):
        del config[name]
    (legacy_dir / "config.json").write_text(json.dumps({**config, "official_code_compat": True}))
    assert main(["calibrate", str(legacy_dir), str(tmp_path / "normal"), "--quiet"]) == 0
    assert json.loads((legacy_dir / "config.json").read_text())["official_code_compat"] is True  # left as it was
    assert (
        main(["calibrate", str(legacy_dir), str(tmp_path / "normal"), "--dattn-input", "layer_input", "--quiet"]) == 0
    )
    saved = json.loads((legacy_dir / "config.json").read_text())
    assert "official_code_compat" not in saved
    assert (saved["eattn_map_source"], saved["dattn_input"], saved["deep_prompt_rounding_dtype"]) == (
        "last_layer",
        "layer_input",
        "float16",
    )
    assert CraneForAnomalyDetection.from_pretrained(legacy_dir).config.dattn_input == "layer_input"


def test_calibrate_needs_a_model_folder_and_images(tmp_path, capsys):
    assert main(["calibrate", str(tmp_path), str(tmp_path), "--quiet"]) == 2
    assert "not a model folder" in capsys.readouterr().err


REMOTE_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["crane_hf"] = None
    import numpy as np
    from transformers import pipeline
    detector = pipeline("zero-shot-anomaly-detection", model=sys.argv[1], trust_remote_code=True)
    print(repr(detector(np.load(sys.argv[2]))["score"]))
    """
)


def test_push_dry_run_writes_a_complete_repository_that_loads_back(tiny_model_dir, tmp_path):
    out = tmp_path / "repo"
    assert main(["push", tiny_model_dir, "--repo-id", "acme/crane-tiny", "--dry-run", str(out)]) == 0
    files = set(os.listdir(out))
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "modeling_crane.py",
        "configuration_crane.py",
        "pipeline_zero_shot_anomaly_detection.py",
        "visualization.py",
    } <= files
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_crane.CraneForAnomalyDetection"
    assert "zero-shot-anomaly-detection" in config["custom_pipelines"]
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: mit" in front and "pipeline_tag: image-segmentation" in front and "anomaly-detection" in front
    assert 'pipeline("zero-shot-anomaly-detection", model="acme/crane-tiny", trust_remote_code=True)' in card
    assert "pip install crane-hf" not in card and "`pip install -e .` in the clone" in card  # no index serves it
    assert (
        "- Computation (the published Crane code's): E-Attn maps `last_layer`, D-Attn input `after_attention`" in card
    )
    loaded = CraneForAnomalyDetection.from_pretrained(out)
    original = CraneForAnomalyDetection.from_pretrained(tiny_model_dir)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(loaded(pixels).anomaly_maps, original(pixels).anomaly_maps)
    picture = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", picture)
    (tmp_path / "remote.py").write_text(REMOTE_LOAD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(out), str(tmp_path / "pixels.npy")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    local = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir)(picture)["score"]
    assert float(result.stdout.strip()) == pytest.approx(local, abs=1e-6)
    assert main(["push", tiny_model_dir, "--repo-id", "acme/crane-tiny", "--dry-run", str(out)]) == 2  # exists


def test_model_card_lists_the_published_results_of_a_preset(tiny_model_dir):
    from crane_hf.commands.push import build_model_card

    model = CraneForAnomalyDetection.from_pretrained(tiny_model_dir)
    model.config.preset = "crane+/visa"
    card = str(build_model_card(model, "acme/crane-plus"))
    assert "| MVTec-AD | 93.9 | 97.6 | 93.6 | 91.2 | 88.1 | 43.8 |" in card
    assert "model-index" in card and "pixel-aupro" in card
    assert "computed with `pillow<13`" in card  # remote-code users install their own Pillow (docs/architecture.md)


def test_fields_that_do_not_apply_to_crane_are_recorded_as_not_applicable(tmp_path):
    from .tiny_models import save_tiny_model_folder

    model_dir = save_tiny_model_folder(tmp_path / "crane", "crane")
    images = write_test_images(tmp_path / "images", count=2)
    common = ["predict", *images, "--model", model_dir, "--no-overlays", "--quiet"]
    assert main([*common, "--output", str(tmp_path / "default")]) == 0
    assert main([*common, "--output", str(tmp_path / "layer-input"), "--dattn-input", "layer_input"]) == 0
    default = json.loads((tmp_path / "default" / "predictions.json").read_text())
    changed = json.loads((tmp_path / "layer-input" / "predictions.json").read_text())
    assert [row["score"] for row in changed["predictions"]] == [row["score"] for row in default["predictions"]]
    assert changed["computation"]["dattn_input"] == "layer_input"  # as given, and marked as changing nothing
    assert changed["computation"]["not_applicable"] == ["dattn_input"]
    assert changed["computation"]["published_computation"] is True


def test_the_backbone_mismatch_error_names_the_option_the_command_line_has(tiny_model_dir, tmp_path, capsys):
    from .tiny_models import fingerprint_compatible_clip

    clip = fingerprint_compatible_clip("crane/mvtec", patch_size=37)
    with torch.no_grad():
        clip.text_model.embeddings.token_embedding.weight[49406] += 0.5
    clip.save_pretrained(tmp_path / "other-clip")
    images = write_test_images(tmp_path / "images", count=1)
    common = ["predict", *images, "--model", "crane/mvtec", "--clip", str(tmp_path / "other-clip"), "--quiet"]
    assert main([*common, "--output", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "not openai/clip-vit-large-patch14-336" in err and "--allow-backbone-mismatch" in err
    assert not (tmp_path / "refused").exists()
    assert main([*common, "--output", str(tmp_path / "allowed"), "--allow-backbone-mismatch"]) == 0
    folder = ["predict", *images, "--model", tiny_model_dir, "--output", str(tmp_path / "f"), "--quiet"]
    assert main([*folder, "--allow-backbone-mismatch"]) == 2
    assert "apply to presets only" in capsys.readouterr().err
    for command in ("evaluate", "push"):  # the other commands that load presets with --clip
        parser = argparse.ArgumentParser()
        importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
        assert any("--allow-backbone-mismatch" in action.option_strings for action in parser._actions), command


def _bug(*args, **kwargs):
    raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")  # what a bug in the work raises


@pytest.mark.parametrize(
    ("command", "module", "name"),
    [
        ("calibrate", "crane_hf.commands.calibrate", "_calibrate"),
        ("evaluate", "crane_hf.evaluation.evaluate", "evaluate_model"),
        ("train", "crane_hf.training.train", "train"),
        ("train-keyerror", "crane_hf.training.train", "train"),
    ],
)
def test_a_bug_inside_the_work_is_not_reported_as_refused_input(
    tiny_model_dir, tmp_path, monkeypatch, command, module, name, capsys
):
    """Exit code 2 means "refused input, one line"; a bug (TypeError, KeyError, ...) is not caught as one: it
    propagates with its traceback (exit 1 from the console script, `test_a_bug_exits_1_with_its_traceback`)."""
    from crane_hf.data import generate_synthetic_dataset

    write_test_images(tmp_path / "normal", count=2)
    data = generate_synthetic_dataset(str(tmp_path / "data"), ["brick"], ["spot"], image_size=32, test_defective=1)
    bug = _bug
    if command == "train-keyerror":
        command, bug = "train", lambda *args: {}["epoch"]
    monkeypatch.setattr(importlib.import_module(module), name, bug)
    argv = {
        "calibrate": ["calibrate", str(shutil.copytree(tiny_model_dir, tmp_path / "m")), str(tmp_path / "normal")],
        "evaluate": ["evaluate", "--model", tiny_model_dir, "--data", data, "--output", str(tmp_path / "ev")],
        "train": ["train", "--data", data, "--clip", "c", "--output-dir", str(tmp_path / "tr")],
    }[command]
    with pytest.raises((TypeError, KeyError)):
        main([*argv, "--quiet"] if command != "train" else argv)
    assert "error:" not in capsys.readouterr().err


def test_a_bug_exits_1_with_its_traceback_on_one_process_and_on_two(tiny_model_dir, tmp_path):
    """Through the console script: a TypeError raised inside the work (here in the scoring of a batch, in every
    process) exits 1 with its traceback, on one process and with --num-processes 2; a refused input exits 2 with one
    line (`test_predict_at_scale.py::test_an_input_refused_in_the_processes_is_one_line_and_exit_2_as_on_one`)."""
    from .tiny_models import subprocess_environment

    write_test_images(tmp_path / "imgs", count=4)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import crane_hf.prediction.sharded_prediction as sharded

            def _score_batch(*args, **kwargs):
                raise TypeError("a bug inside the work")

            sharded._score_batch = _score_batch
            """
        )
    )
    env = subprocess_environment()
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    script = shutil.which("crane-hf")
    for processes in ("1", "2"):
        output = tmp_path / f"out{processes}"
        command = [script, "predict", str(tmp_path / "imgs"), "--model", tiny_model_dir, "--output", str(output)]
        command += ["--quiet", "--workers", "0", "--num-processes", processes]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert result.returncode == 1, (processes, result.stderr)
        assert "Traceback" in result.stderr and "TypeError: a bug inside the work" in result.stderr, result.stderr
        assert not output.exists()


@pytest.mark.parametrize("fails", [False, True])
def test_a_command_destroys_the_process_group_it_joined(tmp_path, fails):
    """A process of `accelerate launch` / `--num-processes` joins a gloo group; one left alive at exit can abort the
    process at interpreter shutdown (SIGABRT), failing a finished run. The command destroys it, on success and on
    error alike."""
    import torch.distributed as dist

    from crane_hf.commands.cli_support import run_command

    def joins_a_group(args: argparse.Namespace) -> int:
        dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
        assert dist.is_initialized()
        if args.fails:
            raise ValueError("a bad argument")
        return 0

    assert run_command(joins_a_group, argparse.Namespace(fails=fails)) == (2 if fails else 0)
    assert not dist.is_initialized()
