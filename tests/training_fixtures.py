"""Fixtures of the training tests: one CPU thread, tiny random backbones in local folders, a synthetic dataset."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPModel, Dinov2WithRegistersModel

from crane_hf.data.synthetic import generate_synthetic_dataset

from .tiny_models import randomize_, tiny_clip_config, tiny_dino_config


def tiny_training_args(backbones, synthetic, output_dir, *extra, batch_size: int = 2, epochs: int = 1) -> list[str]:
    """`crane_hf.training.train` arguments for the tiny backbones and the synthetic test split at 56 pixels (later
    `extra` arguments override earlier ones)."""
    return [
        "--data",
        f"{synthetic}:test",
        "--clip",
        backbones["clip"],
        "--output-dir",
        str(output_dir),
        "--image-size",
        "56",
        "--batch-size",
        str(batch_size),
        "--epochs",
        str(epochs),
        "--num-workers",
        "0",
        *extra,
    ]


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not stall on a shared, busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def backbones(tmp_path_factory) -> dict[str, str]:
    """Folders of a tiny random CLIP and DINOv2 (what `--clip` / `--dino` name)."""
    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    randomize_(CLIPModel(tiny_clip_config()), seed=1).save_pretrained(root / "clip")
    randomize_(Dinov2WithRegistersModel(tiny_dino_config()), seed=2).save_pretrained(root / "dino")
    return {"clip": str(root / "clip"), "dino": str(root / "dino")}


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> str:
    """Two classes, 64 px; test split: 2 normal + 5 defective images per class."""
    root = tmp_path_factory.mktemp("synthetic") / "data"
    return generate_synthetic_dataset(
        str(root), ["brick", "coins"], image_size=64, train_good=1, test_good=2, test_defective=1, seed=0
    )
