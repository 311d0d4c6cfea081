"""Small CLIP and DINOv2 architectures with random weights: for the offline demo, tests, benchmarks, and for
trying training offline.

They use the real 49408-token CLIP vocabulary (Crane's prompts are CLIP BPE ids) and the real layer types, so
everything runs exactly as with the paper's backbones, only smaller and without meaningful features: prompts trained
on them, and the scores they give, are MEANINGLESS.

    python -m crane_hf.small_backbones --output small-backbones     # small-backbones/clip, small-backbones/dinov2
    accelerate launch -m crane_hf.train --data synthetic-defects:test --clip small-backbones/clip ...
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

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


RANDOM_WEIGHTS_CARD = """# {name}: RANDOM weights

A small {kind} with random weights, written by `python -m crane_hf.small_backbones`. It has the real layer types (and
for CLIP the real vocabulary), so that training, evaluation and prediction run end to end without a download; prompts
trained on it, and the scores they give, are MEANINGLESS. Use the paper's backbones for real work
(openai/clip-vit-large-patch14-336, facebook/dinov2-with-registers-base).
"""


def save_small_random_backbones(output: str, seed: int = 0, image_size: int = 224, overwrite: bool = False) -> None:
    """Write `small_random_backbones(seed, image_size)` as two model folders, `output/clip` and `output/dinov2`,
    each with a README.md saying that the weights are random.

    Raises:
        OutputExistsError: `output` exists (not empty) and `overwrite` is False.
    """
    from .io.atomic import atomic_output_dir

    clip, dino = small_random_backbones(seed, image_size=image_size)
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        for name, kind, model in (("clip", "CLIP", clip), ("dinov2", "DINOv2 with registers", dino)):
            folder = os.path.join(staging, name)
            model.save_pretrained(folder)
            with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as card:
                card.write(RANDOM_WEIGHTS_CARD.format(name=name, kind=kind))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m crane_hf.small_backbones --output DIR`: exit code 0, or 2 when the output exists."""
    parser = argparse.ArgumentParser(
        prog="python -m crane_hf.small_backbones",
        description="Write small CLIP and DINOv2 backbones with RANDOM weights (DIR/clip, DIR/dinov2) to try training "
        "and evaluation offline: everything runs, and the prompts trained on them are meaningless.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--image-size", type=int, default=224, help="the backbones' native input size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    from .io.atomic import OutputExistsError

    try:
        save_small_random_backbones(args.output, args.seed, args.image_size, args.overwrite)
    except OutputExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"Wrote small backbones with RANDOM weights to {args.output}/clip and {args.output}/dinov2: training runs end "
        "to end on them, and the prompts it learns are MEANINGLESS."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
