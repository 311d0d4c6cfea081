"""Peak memory (RSS) of `crane-hf calibrate` against the number of images: it should not grow with them.

    python benchmarks/calibrate_memory.py [--images 20 200] [--side 1000] [--source DIR]

Builds a tiny random Crane+ folder (CLIP 6 layers x 32, DINOv2 2 layers x 24, input 56: the model's own memory is
negligible, so the table shows what the command keeps per image) and `--side` x `--side` RGB PNGs (one megapixel
by default), then runs `crane-hf calibrate` once per image count, each in a fresh process, and prints its peak
resident memory (`ru_maxrss`) and wall time. `--source` runs another checkout's code (its `src` folder), e.g. to
measure the code before a change.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.tiny_models import save_tiny_model_folder  # noqa: E402

RUN_CALIBRATE = """
import resource, sys
try:
    from crane_hf.commands.cli import main
except ImportError:  # a --source checkout from before the package layout (crane_hf 0.1)
    from crane_hf.cli import main
code = main(["calibrate", *sys.argv[1:]])
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "exit", code)
"""


def write_images(folder: str, count: int, side: int) -> None:
    """`count` distinct smooth RGB images of side x side (small PNG files, full-size decoded images)."""
    os.makedirs(folder, exist_ok=True)
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    for index in range(count):
        phase = index / max(count, 1)
        red = np.outer(ramp, np.ones(side, np.float32)) * 200
        green = np.outer(np.ones(side, np.float32), ramp) * (150 + 100 * phase)
        blue = np.full((side, side), 40 + 150 * phase, np.float32)
        pixels = np.stack([red, green, blue], axis=-1).astype(np.uint8)
        pixels[side // 3 : side // 3 + 40, side // 2 : side // 2 + 60] = (255, 255, 255) if index % 2 else (0, 0, 0)
        Image.fromarray(pixels).save(os.path.join(folder, f"{index:04d}.png"), compress_level=1)


def measure(model_dir: str, images: str, source: str | None) -> tuple[float, float, int]:
    """(peak RSS in MiB, seconds, exit code) of one `crane-hf calibrate` in a fresh process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if source:
        env["PYTHONPATH"] = os.pathsep.join([source, env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", RUN_CALIBRATE, model_dir, images, "--quiet", "--fpr", "0.05", "--pixel-fpr", "0.01"],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - started
    line = [row for row in done.stdout.splitlines() if row.startswith("peak_rss_kib")]
    if not line:
        raise RuntimeError(f"calibrate failed:\n{done.stdout}\n{done.stderr}")
    fields = line[-1].split()
    return int(fields[1]) / 1024, seconds, int(fields[3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--side", type=int, default=1000)
    parser.add_argument("--source", default=None, help="a checkout's src folder to run instead of this one")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        model_dir = save_tiny_model_folder(os.path.join(work, "model"), "crane+")
        write_images(os.path.join(work, "images"), max(args.images), args.side)
        names = sorted(os.listdir(os.path.join(work, "images")))
        for count in args.images:
            folder = os.path.join(work, f"images-{count}")
            os.makedirs(folder)
            for name in names[:count]:
                os.link(os.path.join(work, "images", name), os.path.join(folder, name))
            copy = os.path.join(work, f"model-{count}")
            shutil.copytree(model_dir, copy)
            rows.append((count, *measure(copy, folder, args.source)))
    print(f"| images ({args.side} x {args.side}) | peak RSS (MiB) | wall time (s) | exit code |")
    print("|---|---|---|---|")
    for count, peak, seconds, code in rows:
        print(f"| {count} | {peak:.0f} | {seconds:.1f} | {code} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
