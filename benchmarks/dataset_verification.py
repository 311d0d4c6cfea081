"""Cost of `verify_images=True` (every image and mask decoded once) against the default header-only checks of the
dataset loaders, and of the training pre-check (`check_rows`: every row prepared once at 518 px, content
fingerprint included), on synthetic datasets.

    python benchmarks/dataset_verification.py [--repeats 3]

Generates the default synthetic dataset (6 classes, 128 x 128) and one with MVTec-AD-sized images (2 classes,
1024 x 1024), then times `load_anomaly_dataset(root, "test")`
with and without `verify_images`, and `check_rows` on one process without workers (best of `--repeats`), and
prints a table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from crane_hf import CraneImageProcessor
from crane_hf.data import generate_synthetic_dataset, load_anomaly_dataset
from crane_hf.training.data_loading import ProcessedImages, check_rows

DATASETS = {
    "synthetic default (6 classes, 128 px)": {"image_size": 128},
    "MVTec-sized (2 classes, 1024 px)": {
        "classes": ["brick", "coins"],
        "defects": ["spot", "hole", "color_stain"],  # thin scratches and cracks are under 0.2% at 1024 px
        "image_size": 1024,
    },
}


def best_time(repeats: int, function, *args, **kwargs) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function(*args, **kwargs)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| dataset | test images | headers only (s) | verify_images (s) | per image (ms) | training pre-check (s) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for name, options in DATASETS.items():
            root = generate_synthetic_dataset(os.path.join(work, str(len(os.listdir(work)))), **options)
            count = len(load_anomaly_dataset(root, "test"))
            headers = best_time(args.repeats, load_anomaly_dataset, root, "test")
            verified = best_time(args.repeats, load_anomaly_dataset, root, "test", verify_images=True)
            images = ProcessedImages(load_anomaly_dataset(root, "test"), CraneImageProcessor(image_size=518))
            checked = best_time(args.repeats, check_rows, images, range(count))
            per_image = 1000 * verified / count
            print(f"| {name} | {count} | {headers:.3f} | {verified:.3f} | {per_image:.1f} | {checked:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
