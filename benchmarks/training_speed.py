"""Training speed at the paper's shapes, with and without `--cache-features`.

Random weights with the real architectures (CLIP ViT-L/14@336, and DINOv2 ViT-B/14 with registers for Crane+),
S = 518, batch 1, through the real training command on a few synthetic images. Without the cache every step runs
the frozen backbones; with it, the backbones run once per image (the "cache fill", timed separately) and the
steps run only the prompt side (text encoder, logits, loss, backward).

    python benchmarks/training_speed.py                  # Crane and Crane+, 3 images each (about 15 min, 2 cores)
    python benchmarks/training_speed.py --variants crane --images 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from random_backbones import paper_backbone_configs, save_random_backbones

from crane_hf.commands.train import main as train_main
from crane_hf.data.synthetic import generate_synthetic_dataset


def measure(backbones: dict[str, str], data: str, variant: str, cached: bool, image_size: int, work: str) -> dict:
    """One epoch at batch 1; returns the trainer's timing of it."""
    output = os.path.join(work, f"{variant}-{'cached' if cached else 'plain'}")
    args = [
        "--data", f"{data}:test",
        "--clip", backbones["clip"],
        "--variant", variant,
        "--output-dir", output,
        "--image-size", str(image_size),
        "--batch-size", "1",
        "--epochs", "1",
        "--num-workers", "0",
        "--overwrite",
    ]  # fmt: skip
    if variant == "crane+":
        args += ["--dino", backbones["dino"]]
    if cached:
        args.append("--cache-features")
    if train_main(args) != 0:
        raise SystemExit(f"training failed: {args}")
    with open(os.path.join(output, "trainer_state.json"), encoding="utf-8") as stream:
        state = json.load(stream)
    epoch = state["history"][-1]
    return {"steps": epoch["steps"], "seconds": epoch["seconds"], "cache_seconds": state["cache_fill_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=("crane", "crane+"), default=["crane", "crane+"])
    parser.add_argument("--images", type=int, default=3, help="training images = steps per epoch at batch 1")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--work-dir", help="where to put the random backbones (3.4 GB) and runs; default: temporary")
    args = parser.parse_args()
    defects = ["spot", "hole", "scratch", "crack", "color_stain"][: max(args.images - 1, 0)]

    with tempfile.TemporaryDirectory() as temporary:
        work = args.work_dir or temporary
        clip_config, dino_config = paper_backbone_configs()
        backbones = save_random_backbones(os.path.join(work, "backbones"), clip_config, dino_config)
        data = generate_synthetic_dataset(
            os.path.join(work, "data"), ["brick"], defects, 256, 0, 1, 1, seed=0, overwrite=True
        )
        rows = []
        for variant in args.variants:
            for cached in (False, True):
                rows.append((variant, cached, measure(backbones, data, variant, cached, args.image_size, work)))

    print(f"\ntraining speed, S = {args.image_size}, batch 1, random weights, torch threads {torch.get_num_threads()}")
    print(f"{'variant':8s} {'features':9s} {'steps':>5s} {'s/step':>8s} {'steps/s':>8s} {'cache fill s/image':>19s}")
    for variant, cached, timing in rows:
        per_step = timing["seconds"] / timing["steps"]
        fill = f"{timing['cache_seconds'] / timing['steps']:.1f}" if cached else "-"
        label = "cached" if cached else "computed"
        print(f"{variant:8s} {label:9s} {timing['steps']:5d} {per_step:8.2f} {1 / per_step:8.3f} {fill:>19s}")


if __name__ == "__main__":
    main()
