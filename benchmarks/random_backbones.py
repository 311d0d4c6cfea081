"""Backbones with random weights saved to local folders, for benchmarks that must run offline.

`--clip` / `--dino` of the training command take such folders like Hub ids, so the benchmarks exercise the real
command end to end.
"""

from __future__ import annotations

import os

import torch
from transformers import CLIPConfig, CLIPModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from crane_hf import CraneConfig


def small_clip_config(width: int = 64, vision_layers: int = 6, image_size: int = 224) -> CLIPConfig:
    """A small CLIP with the real 49408-token vocabulary (Crane's prompts are CLIP BPE ids)."""
    return CLIPConfig(
        projection_dim=width,
        text_config={
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "vocab_size": 49408,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "projection_dim": width,
        },
        vision_config={
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 14,
            "projection_dim": width,
        },
    )


def small_dino_config(width: int = 48, image_size: int = 224) -> Dinov2WithRegistersConfig:
    return Dinov2WithRegistersConfig(
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=14,
        image_size=image_size,
        num_register_tokens=4,
    )


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
