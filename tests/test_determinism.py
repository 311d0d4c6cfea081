"""Determinism on the CPU: the same inputs give bitwise-equal outputs across runs and batch compositions, and
training with a seed is reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import pipeline

from crane_hf.commands.train import main as train_main

from .tiny_models import tiny_model, write_test_images
from .training_fixtures import backbones, synthetic, tiny_training_args

__all__ = ["backbones", "synthetic"]  # fixtures used by name


@pytest.mark.parametrize("size", [56, 112])
def test_outputs_do_not_depend_on_the_batch_bit_for_bit(variant, size):
    model = tiny_model(variant)
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        full = model(images)
        singles = [model(images[i : i + 1]) for i in range(6)]
        middle = model(images[2:5])
        shuffled = model(images[[5, 3, 1, 0, 2, 4]])
    for i, single in enumerate(singles):
        assert torch.equal(full.anomaly_scores[i], single.anomaly_scores[0])
        assert torch.equal(full.anomaly_maps[i], single.anomaly_maps[0])
    assert torch.equal(full.anomaly_scores[2:5], middle.anomaly_scores)
    assert torch.equal(full.anomaly_maps[[5, 3, 1, 0, 2, 4]], shuffled.anomaly_maps)


def test_repeated_runs_and_fresh_models_are_bitwise_equal(variant):
    images = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = tiny_model(variant)(images)
        second = tiny_model(variant)(images)
    assert torch.equal(first.anomaly_scores, second.anomaly_scores)
    assert torch.equal(first.anomaly_maps, second.anomaly_maps)


def test_pipeline_batch_size_does_not_change_results(tiny_model_dir, tmp_path):
    paths = write_test_images(tmp_path, count=7, seed=5)
    detector = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir)
    batched = detector(paths, batch_size=4)
    for path, result in zip(paths, batched):
        single = detector(path)
        assert single["score"] == result["score"]
        assert np.array_equal(single["anomaly_map"], result["anomaly_map"])


def test_training_with_a_seed_is_reproducible(backbones, synthetic, tmp_path):
    runs = []
    for name in ("first", "second"):
        output = tmp_path / name
        argv = tiny_training_args(backbones, synthetic, output, "--cpu", "--seed", "5")
        assert train_main(argv) == 0
        runs.append(load_file(str(output / "model.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
