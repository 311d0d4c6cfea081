"""A model folder named with "~" (a quoted or programmatic home path) is the same folder wherever a model is named:
`load_detector`, `transformers.pipeline` and every command's model argument."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import pipeline

import crane_hf
from crane_hf.commands.cli import build_parser
from crane_hf.model_loading import check_model_available

from .tiny_models import save_tiny_model_folder, write_test_images


@pytest.fixture
def home_model(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    save_tiny_model_folder(home / "my-model", variant="crane")
    return str(home / "my-model")


def test_tilde_model_folder_loads_as_the_folder(home_model, tmp_path):
    image = write_test_images(tmp_path / "images", count=1)[0]
    assert check_model_available("~/my-model") == "folder"
    expected = crane_hf.load_detector(home_model, device="cpu")(image)
    for detector in (
        crane_hf.load_detector("~/my-model", device="cpu"),
        pipeline(crane_hf.PIPELINE_TASK, "~/my-model"),
    ):
        result = detector(image)
        assert result["score"] == expected["score"]
        assert torch.equal(torch.as_tensor(result["anomaly_map"]), torch.as_tensor(expected["anomaly_map"]))


@pytest.mark.parametrize(
    ("command", "dest"),
    [
        (["predict", "x.png", "--model", "~/my-model"], "model"),
        (["evaluate", "--model", "~/my-model", "--data", "d"], "model"),
        (["demo", "--model", "~/my-model"], "model"),
        (["app", "--model", "~/my-model"], "model"),
        (["export", "~/my-model", "--format", "onnx", "--output", "o"], "model"),
        (["push", "~/my-model", "--repo-id", "a/b", "--dry-run", "o"], "model"),
        (["calibrate", "~/my-model", "x.png"], "model_dir"),
    ],
)
def test_every_command_reads_a_tilde_model_path_as_the_folder(home_model, command, dest):
    """The commands check the output against the model folder (never inside it) with the path they load."""
    args = build_parser().parse_args(command)
    assert getattr(args, dest) == os.path.expanduser("~/my-model") == home_model


def test_a_preset_name_is_not_a_path(home_model):
    assert build_parser().parse_args(["predict", "x.png", "--model", "crane+/mvtec"]).model == "crane+/mvtec"


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "x.png"],
        ["evaluate", "--data", "d"],
        ["export", "crane+/mvtec", "--format", "onnx", "--output", "o"],
        ["push", "crane+/mvtec", "--repo-id", "a/b"],
        ["app"],
        ["convert", "--checkpoint", "c.pth", "--variant", "crane+", "--output", "o"],
        ["train", "--data", "d", "--output-dir", "o"],
    ],
)
def test_every_command_reads_tilde_backbone_paths_as_the_folders(home_model, command):
    args = build_parser().parse_args([*command, "--clip", "~/clip", "--dino", "~/dino"])
    assert (args.clip, args.dino) == (os.path.expanduser("~/clip"), os.path.expanduser("~/dino"))


def test_a_preset_loads_tilde_backbone_folders(home_model, tmp_path):
    from crane_hf.presets import model_from_preset

    from .tiny_models import fingerprint_compatible_clip

    fingerprint_compatible_clip("crane/mvtec").save_pretrained(tmp_path / "home" / "clip")
    model = model_from_preset("crane/mvtec", clip="~/clip")
    assert model.config.preset == "crane/mvtec"
