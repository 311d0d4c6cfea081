"""Non-finite numbers fail closed: a diverged training stops and publishes nothing, NaN prompts do not load, a NaN
score is an error for that image (never `is_anomalous: false`), calibrate never writes NaN."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import pipeline

from crane_hf import CraneForAnomalyDetection
from crane_hf.commands.cli import main
from crane_hf.commands.train import main as train_main
from crane_hf.models.crane.checkpoint_validation import NonFiniteWeightsError

from .tiny_models import write_test_images
from .training_fixtures import backbones, one_thread, synthetic, tiny_training_args

__all__ = ["backbones", "one_thread", "synthetic"]  # fixtures used by name


def _poison(model_dir, name: str) -> None:
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def nan_backbone_model(tiny_model_dir, tmp_path):
    """A model folder whose prompts are finite but whose CLIP projection holds a NaN: every score is NaN."""
    model_dir = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, model_dir)
    _poison(model_dir, "clip.visual_projection.weight")
    return model_dir


def test_prompt_tensors_with_nan_are_refused_by_name(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    _poison(model_dir, "prompt_learner.ctx_anomalous")
    with pytest.raises(NonFiniteWeightsError, match=r"prompt_learner.ctx_anomalous \(1 of \d+ values\)"):
        CraneForAnomalyDetection.from_pretrained(str(model_dir))


def test_prompts_only_folder_with_inf_is_refused(backbones, tmp_path):
    model = CraneForAnomalyDetection.from_backbones(backbones["clip"], image_size=56)
    model.save_pretrained(tmp_path / "prompts", include_backbones=False)
    path = tmp_path / "prompts" / "model.safetensors"
    tensors = load_file(path)
    tensors["prompt_learner.deep_prompts"][0, 0, 0] = float("inf")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightsError, match=f"{path}.*prompt_learner.deep_prompts"):
        CraneForAnomalyDetection.from_pretrained(str(tmp_path / "prompts"))


def test_a_nan_score_is_an_error_never_a_pass(nan_backbone_model, tmp_path, capsys):
    detector = pipeline("zero-shot-anomaly-detection", model=str(nan_backbone_model))
    images = write_test_images(tmp_path / "imgs", count=3)
    with pytest.raises(ValueError, match="non-finite"):
        detector(images[0])
    out = tmp_path / "out"
    argv = ["predict", str(tmp_path / "imgs"), "--model", str(nan_backbone_model), "--output", str(out), "--quiet"]
    assert main(argv) == 3
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["predictions"] == []
    assert len(summary["skipped"]) == 3 and all("non-finite" in item["reason"] for item in summary["skipped"])
    assert "non-finite" in capsys.readouterr().err


def test_calibrate_never_writes_nan(nan_backbone_model, tmp_path, capsys):
    write_test_images(tmp_path / "normal", count=3)
    before = (nan_backbone_model / "config.json").read_bytes()
    assert main(["calibrate", str(nan_backbone_model), str(tmp_path / "normal"), "--quiet"]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert (nan_backbone_model / "config.json").read_bytes() == before
    assert not (nan_backbone_model / "calibration.json").exists()


def test_evaluate_skips_images_with_nan_scores(nan_backbone_model, synthetic, tmp_path):
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(nan_backbone_model), "--data", f"{synthetic}:test:brick", "--output", str(out)]
    assert main([*argv, "--quiet"]) == 3
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 0 and len(report["skipped"]) == 7
    assert all("non-finite" in item["reason"] for item in report["skipped"])


@pytest.mark.usefixtures("one_thread")
def test_training_with_an_infinite_learning_rate_stops_and_publishes_nothing(backbones, synthetic, tmp_path, capsys):
    output = tmp_path / "run"
    assert train_main(tiny_training_args(backbones, synthetic, output, "--lr", "inf")) == 2
    err = capsys.readouterr().err
    assert "Training stopped at epoch 1, step 1" in err and "NaN or infinite" in err
    assert "Nothing of this epoch is saved or published" in err
    # The run created the folder and finished no checkpoint: the folder is removed, nothing is left (issue 13).
    assert not output.exists()


@pytest.mark.usefixtures("one_thread")
def test_a_nan_loss_stops_training_before_the_optimizer_step(backbones, synthetic, tmp_path, capsys, monkeypatch):
    import crane_hf.training.train as train_module

    original = train_module.CraneTrainingStep.forward

    def nan_on_second_step(self, batch):
        output = original(self, batch)
        if getattr(self, "_calls", 0) == 1:
            output.loss = output.loss * float("nan")
            output.focal_loss = output.focal_loss * float("nan")
        self._calls = getattr(self, "_calls", 0) + 1
        return output

    monkeypatch.setattr(train_module.CraneTrainingStep, "forward", nan_on_second_step)
    output = tmp_path / "run"
    output.mkdir()  # a folder the run did not create is kept after a failure, with the run's log
    assert train_main(tiny_training_args(backbones, synthetic, output)) == 2
    err = capsys.readouterr().err
    assert "Training stopped at epoch 1, step 2: the loss is not finite (loss nan, focal_loss nan" in err
    assert not (output / "model.safetensors").exists()
    assert not [name for name in os.listdir(output) if name.startswith("checkpoint-epoch-")]
    log = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1]  # the finite step is logged, the NaN one is not


def test_loading_torch_inf_prompt_state_is_refused(tiny_model_dir):
    model = CraneForAnomalyDetection.from_pretrained(tiny_model_dir)
    state = {name: t.clone() for name, t in model.state_dict().items() if name.startswith("prompt_learner.")}
    state["prompt_learner.ctx_normal"][0, 0] = -torch.inf
    with pytest.raises(NonFiniteWeightsError, match=r"somewhere\.safetensors holds NaN or infinite values"):
        model.load_prompt_state(state, source="somewhere.safetensors")
