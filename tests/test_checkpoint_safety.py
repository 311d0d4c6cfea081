"""Untrusted checkpoints: safetensors only, and tensors that do not fit are refused by name before use."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from crane_hf import CraneForAnomalyDetection
from crane_hf.models.crane.checkpoint_validation import CheckpointMismatchError

from .tiny_models import save_tiny_model_folder


@pytest.fixture
def folder(tmp_path):
    return save_tiny_model_folder(tmp_path / "model", "crane+")


def _edit_weights(folder: str, edit) -> None:
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s.__setitem__("prompt_learner.ctx_normal", torch.zeros(5, 32)),
            "tensors of the wrong shape: prompt_learner.ctx_normal (5, 32) (expected (12, 32))",
        ),
        (
            lambda s: s.__setitem__("clip.visual_projection.weight", s["clip.visual_projection.weight"].int()),
            "not floating point: clip.visual_projection.weight I32",
        ),
        (lambda s: s.pop("clip.visual_projection.weight"), "missing tensors clip.visual_projection.weight"),
        (lambda s: s.__setitem__("bogus.weight", torch.zeros(3)), "unexpected tensors bogus.weight"),
    ],
    ids=["shape", "dtype", "missing", "unexpected"],
)
def test_checkpoints_that_do_not_fit_are_refused_by_name(folder, edit, message):
    _edit_weights(folder, edit)
    with pytest.raises(CheckpointMismatchError) as error:
        CraneForAnomalyDetection.from_pretrained(folder)
    assert message in str(error.value)


def test_pickled_weights_are_never_loaded(folder):
    state = load_file(os.path.join(folder, "model.safetensors"))
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"never from pickled \.bin/\.pth files"):
        CraneForAnomalyDetection.from_pretrained(folder)


def test_an_intact_checkpoint_loads_with_its_loading_info(folder):
    model, info = CraneForAnomalyDetection.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not any(p.requires_grad for p in model.clip.parameters())
