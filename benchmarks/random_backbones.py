"""Backbones with random weights saved to local folders, for benchmarks that must run offline.

`--clip` / `--dino` of the training command take such folders like Hub ids, so the benchmarks exercise the real
command end to end.
"""

from __future__ import annotations

import os

import torch
from transformers import CLIPConfig, CLIPModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from crane_hf import CraneConfig


def paper_backbone_configs() -> tuple[CLIPConfig, Dinov2WithRegistersConfig]:
    """The architectures of openai/clip-vit-large-patch14-336 and facebook/dinov2-with-registers-base."""
    config = CraneConfig.for_variant("crane+")
    return config.clip_config, config.dino_config


def save_random_backbones(
    folder: str, clip_config: CLIPConfig, dino_config: Dinov2WithRegistersConfig | None = None, seed: int = 0
) -> dict[str, str]:
    """Build the backbones with random weights (seeded) and save them under `folder`; returns their paths."""
    torch.manual_seed(seed)
    paths = {"clip": os.path.join(folder, "clip")}
    CLIPModel(clip_config).save_pretrained(paths["clip"])
    if dino_config is not None:
        paths["dino"] = os.path.join(folder, "dino")
        Dinov2WithRegistersModel(dino_config).save_pretrained(paths["dino"])
    return paths
