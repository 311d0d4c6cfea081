"""What a user types as a model: presets and the task's default in transformers' pipeline(), and names that cannot be
loaded here, which fail at once (no Hub retries) listing the presets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from huggingface_hub import constants
from transformers import Dinov2WithRegistersModel, pipeline

from crane_hf import load_detector
from crane_hf.presets import BackboneUnavailableError

from .tiny_models import (
    fingerprint_compatible_clip,
    free_port,
    populate_hub_cache,
    randomize_,
    tiny_dino_config,
    tiny_model,
    write_test_images,
)

TASK = "zero-shot-anomaly-detection"
PRESETS = "Presets: crane/mvtec, crane/visa, crane+/mvtec, crane+/visa, crane+/mvtec-epoch1."

PRESET_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import crane_hf  # before transformers' pipeline is taken: the registration wraps it
    from transformers import pipeline

    image, clip_folder, dino_folder = sys.argv[1:4]
    detectors = {
        "default": pipeline("zero-shot-anomaly-detection"),
        "named": pipeline("zero-shot-anomaly-detection", model="crane+/mvtec"),
        "no task": pipeline(model="crane+/mvtec"),
        "folders": pipeline(
            "zero-shot-anomaly-detection",
            model="crane+/mvtec",
            model_kwargs={"clip": clip_folder, "dino": dino_folder},
        ),
        "cached hub id": pipeline("zero-shot-anomaly-detection", model="acme/crane-tiny"),
        "load_detector": crane_hf.load_detector("crane+/mvtec", device="cpu"),
    }
    report = {
        name: {
            "class": type(detector).__name__,
            "task": detector.task,
            "preset": getattr(detector.model.config, "preset", None),
            "clip_backbone": detector.model.config.clip_backbone,
            "score": detector(image)["score"],
        }
        for name, detector in detectors.items()
    }
    print(json.dumps(report))
    """
)


def test_presets_and_the_default_work_in_transformers_pipeline(tmp_path):
    """`pipeline(TASK)` (the registered default), `pipeline(TASK, model=preset)` and `pipeline(model=preset)` give the
    model `load_detector(preset)` gives; `model_kwargs` reach the preset's backbones; Hub ids still load as usual."""
    hf_home = tmp_path / "hf-home"
    clip = fingerprint_compatible_clip("crane+/mvtec", patch_size=37, openai_hub_ids=True)
    dino = randomize_(Dinov2WithRegistersModel(tiny_dino_config()), seed=4)
    populate_hub_cache(hf_home, "openai/clip-vit-large-patch14-336", clip)
    populate_hub_cache(hf_home, "facebook/dinov2-with-registers-base", dino)
    populate_hub_cache(hf_home, "acme/crane-tiny", tiny_model("crane+"))
    clip.save_pretrained(tmp_path / "clip")
    dino.save_pretrained(tmp_path / "dino")
    (image,) = write_test_images(tmp_path / "images", count=1, size=(50, 60))
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m")}
    result = subprocess.run(
        [sys.executable, "-c", PRESET_SCRIPT, image, str(tmp_path / "clip"), str(tmp_path / "dino")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "No model was supplied, defaulted to crane+/mvtec" in result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    for name, detector in report.items():
        assert detector["class"] == "ZeroShotAnomalyDetectionPipeline", name
        assert detector["task"] == TASK, name
    presets = ("default", "named", "no task", "folders", "load_detector")
    assert {report[name]["preset"] for name in presets} == {"crane+/mvtec"}
    assert report["cached hub id"]["preset"] is None
    assert report["folders"]["clip_backbone"] == str(tmp_path / "clip")
    assert report["default"]["clip_backbone"] == "openai/clip-vit-large-patch14-336"
    # the same weights from the cache and from the folders: one score, the one load_detector gives
    assert len({report[name]["score"] for name in presets}) == 1


@pytest.fixture
def hub_unreachable(monkeypatch) -> list:
    """No HF_HUB_OFFLINE, and an endpoint that refuses connections: a machine without network. Gives the list of
    the connections attempted to it (each a retry the user would wait for)."""
    port = free_port()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    attempts = []
    connect = socket.socket.connect

    def counted(self, address):
        if isinstance(address, tuple) and address[1:2] == (port,):
            attempts.append(address)
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", counted)
    return attempts


@pytest.mark.parametrize("load", ["pipeline", "load_detector"])
@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("crane+/mvtc", ValueError, "not a valid Hub id. Did you mean crane+/mvtec? " + PRESETS),
        ("./no-such-folder", FileNotFoundError, "no such model folder: ./no-such-folder. " + PRESETS),
        ("crane/visaa", OSError, "Did you mean crane/visa? " + PRESETS),
        (
            "someone/does-not-exist",
            OSError,
            "neither in the Hugging Face cache nor downloadable here (http://127.0.0.1:",
        ),
        ("does-not-exist", FileNotFoundError, "no such model folder: does-not-exist. " + PRESETS),  # no owner: local
    ],
)
def test_unknown_model_names_fail_at_once_listing_the_presets(hub_unreachable, load, name, error, message):
    with pytest.raises(error) as raised:
        pipeline(TASK, model=name) if load == "pipeline" else load_detector(name)
    # no retries: one connection attempt for a valid Hub id, none for a preset's typo or a folder
    assert len(hub_unreachable) == (1 if error is OSError and "/" in name and "+" not in name else 0), hub_unreachable
    assert message in str(raised.value)
    assert PRESETS in str(raised.value)
    if error is OSError:  # a valid Hub id: one connection attempt told that the Hub cannot be reached
        assert f"{constants.ENDPOINT} cannot be reached" in str(raised.value)


def test_the_command_line_refuses_an_unknown_model_before_any_work(tmp_path):
    images = write_test_images(tmp_path / "images", count=1)
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    for name, expected in (
        ("someone/does-not-exist", "cannot be reached"),
        ("does-not-exist", "no such model folder: does-not-exist."),
        ("crane+/mvtc", "Did you mean crane+/mvtec?"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "crane_hf.cli", "predict", *images, "--model", name, "--output", "out"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr[-3000:]
        (line,) = result.stderr.strip().splitlines()  # one line, no retries, no traceback
        assert line.startswith("error: ") and expected in line and PRESETS in line
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("load", ["pipeline", "load_detector"])
def test_a_prompts_only_folder_whose_backbones_are_missing_fails_at_once(hub_unreachable, tmp_path, load):
    model = tiny_model("crane+")
    model.config.clip_backbone = "openai/clip-vit-large-patch14-336"
    model.config.dino_backbone = "facebook/dinov2-with-registers-base"
    folder = str(tmp_path / "my-prompts")
    model.save_pretrained(folder, include_backbones=False)
    with pytest.raises(BackboneUnavailableError) as raised:
        pipeline(TASK, model=folder) if load == "pipeline" else load_detector(folder)
    assert len(hub_unreachable) == 1, hub_unreachable  # one attempt tells the Hub is unreachable: no retries
    message = str(raised.value)
    assert message.startswith(f"Model {folder} needs the backbone openai/clip-vit-large-patch14-336, which is ")
    assert "  hf download facebook/dinov2-with-registers-base --local-dir dinov2-with-registers-base\n" in message
    assert '"dino_backbone": "/path/to/dinov2-with-registers-base"' in message


@pytest.mark.parametrize(
    ("command", "name", "expected"),
    [
        ("predict", "crane+/mvtc", "Did you mean crane+/mvtec?"),
        ("predict", "crane+/mvtec", "Preset crane+/mvtec needs the backbone openai/clip-vit-large-patch14-336"),
        ("evaluate", "someone/does-not-exist", "neither in the Hugging Face cache nor downloadable here"),
    ],
)
def test_a_model_that_cannot_load_fails_once_before_processes_start(tmp_path, command, name, expected):
    """`--num-processes 2`: a typo, an unreachable Hub id or a preset whose backbones are missing is one error line,
    before any process is launched (not one error per process and the launcher's traceback)."""
    images = write_test_images(tmp_path / "data" / "widget" / "test" / "good", count=2)
    inputs = ["--data", str(tmp_path / "data")] if command == "evaluate" else images
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "crane_hf.cli",
            command,
            *inputs,
            "--model",
            name,
            "--output",
            "out",
            *["--num-processes", "2"],
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()  # one line: no per-process errors, no launcher traceback
    assert line.startswith("error: ") and expected in line, line
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()
