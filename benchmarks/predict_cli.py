"""Wall time of `crane-hf predict` on 20 images with a tiny model, end to end (process start included).

    python benchmarks/predict_cli.py [--images 20] [--repeats 3]

Builds a tiny random Crane+ folder (CLIP 6 layers x 32, DINOv2 2 layers x 24, input 56) and 20 synthetic
images of 256 x 256 (`crane_hf.data.synthetic`), then times the command line three times and prints the table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from crane_hf.data import generate_synthetic_dataset  # noqa: E402
from tests.tiny_models import save_tiny_model_folder  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        model_dir = save_tiny_model_folder(os.path.join(work, "model"), "crane+")
        data = generate_synthetic_dataset(
            os.path.join(work, "data"),
            classes=["brick", "coins"],
            image_size=256,
            train_good=0,
            test_good=args.images // 2,
            test_defective=0,
            seed=0,
        )
        images = [
            os.path.join(root, name) for root, _, names in os.walk(data) for name in names if name.endswith(".png")
        ]
        times = []
        for repeat in range(args.repeats):
            output = os.path.join(work, f"out{repeat}")
            started = time.perf_counter()
            subprocess.run(
                ["crane-hf", "predict", *images, "--model", model_dir, "--output", output, "--quiet"],
                check=True,
                capture_output=True,
            )
            times.append(time.perf_counter() - started)
        startup = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            subprocess.run(["crane-hf", "--help"], check=True, capture_output=True)
            startup.append(time.perf_counter() - started)
    print(f"| images | crane-hf predict (s, best of {args.repeats}) | of which process start (crane-hf --help) |")
    print("|---|---|---|")
    print(f"| {len(images)} | {min(times):.2f} | {min(startup):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
