"""Can Crane's prompts learn to localize defects, and does that transfer to unseen classes?

With small random frozen backbones (no pretrained knowledge at all), train the prompts with the real training
command on some synthetic classes, then compare the pixel AUROC of the trained and the untrained model on held-out
synthetic classes (and on the training classes). Pixel AUROC is computed per class on the smoothed S x S maps
(sigma 4, as in the paper's evaluation) with scikit-learn, then averaged over classes.

    python benchmarks/learnability.py                    # defaults below: 5 seeds, about 4 minutes on 2 CPU cores
    python benchmarks/learnability.py --heldout-classes grass,moon,tissue --seeds 0

The default classes are all grayscale: random backbones know nothing of which colors are normal, so prompts trained
on gray textures learn "colored = anomalous" (the color stains) and fail on a colored held-out class such as tissue
(docs/training.md gives the numbers).

Prints one table per seed (a seed fixes the random backbones, the initial prompts and the data) and a summary.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from accelerate.utils import set_seed
from random_backbones import save_random_backbones
from sklearn.metrics import roc_auc_score

from crane_hf import CraneForAnomalyDetection, CraneImageProcessor
from crane_hf.commands.train import main as train_main
from crane_hf.data import load_meta_json
from crane_hf.data.synthetic import generate_synthetic_dataset
from crane_hf.small_backbones import small_clip_config
from crane_hf.training.data_loading import ProcessedImages


def pixel_auroc_per_class(model: CraneForAnomalyDetection, dataset_root: str, classes: list[str]) -> dict[str, float]:
    """Pixel AUROC of each class's test split: smoothed maps (sigma from the config) against the masks."""
    processor = CraneImageProcessor.from_crane_config(model.config)
    model.eval()
    scores = {}
    for class_name in classes:
        images = ProcessedImages(load_meta_json(dataset_root, "test", [class_name]), processor)
        batch = torch.utils.data.default_collate([images[i] for i in range(len(images))])
        with torch.no_grad():
            maps = model(batch["pixel_values"]).anomaly_maps
        smoothed = processor.post_process_anomaly_maps(maps, sigma=model.config.smoothing_sigma)
        scores[class_name] = roc_auc_score(batch["masks"].flatten().numpy(), smoothed.flatten().numpy())
    return scores


def run_seed(args: argparse.Namespace, seed: int, work: str) -> dict[str, dict[str, float]]:
    classes = args.train_classes + args.heldout_classes
    data = generate_synthetic_dataset(
        os.path.join(work, f"data-{seed}"),
        classes,
        image_size=args.image_size,
        train_good=0,
        test_good=args.normal_per_class,
        test_defective=args.defective_per_type,
        seed=seed,
        overwrite=True,
    )
    clip = save_random_backbones(
        os.path.join(work, f"backbones-{seed}"), small_clip_config(image_size=args.image_size), seed=seed
    )["clip"]
    set_seed(seed)  # the trainer seeds the same way before building the model: the same initial prompts
    untrained = CraneForAnomalyDetection.from_backbones(clip, image_size=args.image_size)
    before = pixel_auroc_per_class(untrained, data, classes)
    output = os.path.join(work, f"run-{seed}")
    train_args = [
        "--data", f"{data}:test:{','.join(args.train_classes)}",
        "--clip", clip,
        "--output-dir", output,
        "--image-size", str(args.image_size),
        "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size),
        "--lr", str(args.lr),
        "--seed", str(seed),
        "--num-workers", "0",
        "--cache-features",
        "--overwrite",
    ]  # fmt: skip
    if train_main(train_args) != 0:
        raise SystemExit("training failed")
    after = pixel_auroc_per_class(CraneForAnomalyDetection.from_pretrained(output), data, classes)
    return {"before": before, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-classes", type=lambda s: s.split(","), default=["brick", "gravel", "coins"])
    parser.add_argument("--heldout-classes", type=lambda s: s.split(","), default=["grass", "moon", "cells"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--normal-per-class", type=int, default=6)
    parser.add_argument("--defective-per-type", type=int, default=6, help="per class and defect type")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--work-dir", help="keep data, backbones and runs here (default: a temporary folder)")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work_dir or temporary
        for seed in args.seeds:
            results[seed] = run_seed(args, seed, work)
            print(f"\nseed {seed}: pixel AUROC per class (untrained -> trained)")
            print(f"{'class':10s} {'role':9s} {'untrained':>9s} {'trained':>9s}")
            for name in args.train_classes + args.heldout_classes:
                role = "train" if name in args.train_classes else "held-out"
                before, after = results[seed]["before"][name], results[seed]["after"][name]
                print(f"{name:10s} {role:9s} {before:9.3f} {after:9.3f}")

    print(f"\nsummary over seeds {args.seeds}: mean over classes of the pixel AUROC (mean +- std over seeds)")
    print(f"{'classes':9s} {'untrained':>15s} {'trained':>15s}   per seed (untrained -> trained)")
    for role, names in (("train", args.train_classes), ("held-out", args.heldout_classes)):
        cells = []
        for stage in ("before", "after"):
            means = [np.mean([results[s][stage][n] for n in names]) for s in args.seeds]
            cells.append(f"{np.mean(means):.3f} +- {np.std(means):.3f}")
        per_seed = ", ".join(
            f"{np.mean([results[s]['before'][n] for n in names]):.2f} -> "
            f"{np.mean([results[s]['after'][n] for n in names]):.2f}"
            for s in args.seeds
        )
        print(f"{role:9s} {cells[0]:>15s} {cells[1]:>15s}   {per_seed}")


if __name__ == "__main__":
    main()
