"""Small CLIP and DINOv2 architectures with random weights: for the offline demo, tests and benchmarks.

They use the real 49408-token CLIP vocabulary (Crane's prompts are CLIP BPE ids) and the real layer types, so
everything runs exactly as with the paper's backbones, only smaller and without meaningful features.
"""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel


def small_clip_config(
    width: int = 64, vision_layers: int = 6, text_layers: int = 4, image_size: int = 224, patch_size: int = 14
) -> CLIPConfig:
    """A CLIP of `width` channels (2 heads), `vision_layers` / `text_layers` blocks, projection dim = width."""
    return CLIPConfig(
        projection_dim=width,
        text_config={
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": text_layers,
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
            "patch_size": patch_size,
            "projection_dim": width,
        },
    )


def small_dino_config(width: int = 48, layers: int = 2, image_size: int = 224) -> Dinov2WithRegistersConfig:
    """A DINOv2 with 4 registers, patch 14, `width` channels (2 heads) and `layers` blocks."""
    return Dinov2WithRegistersConfig(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=14,
        image_size=image_size,
        num_register_tokens=4,
    )


def small_random_backbones(
    seed: int = 0, image_size: int = 224, clip_width: int = 64, dino_width: int = 48
) -> tuple[CLIPModel, Dinov2WithRegistersModel]:
    """A small random CLIP and DINOv2 (eval mode), deterministic by `seed`."""
    torch.manual_seed(seed)
    clip = CLIPModel(small_clip_config(width=clip_width, image_size=image_size))
    dino = Dinov2WithRegistersModel(small_dino_config(width=dino_width, image_size=image_size))
    return clip.eval(), dino.eval()
