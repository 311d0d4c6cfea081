"""`crane-hf predict` at scale: end-to-end against model-only throughput, and memory over a long run.

    python benchmarks/predict_throughput.py                      # both tables (about 20 minutes on 2 busy cores)
    python benchmarks/predict_throughput.py --part throughput --images 1000 --rounds 5 --variant crane+ --batch-size 8
    python benchmarks/predict_throughput.py --part memory --memory-images 10000

Throughput: a random Crane / Crane+ at the small shape of benchmarks/inference.py (CLIP ViT-B/14 width, 12 layers,
DINOv2-S/14 with registers, input 224) saved as a model folder, and `--images` PNGs of 256 x 256. "Model only" is
`pipeline.forward` (the model, then smoothing and resizing of the maps) on batches already decoded and
preprocessed in memory; "end to end" is `predict_images` on the files (listing, reading, fingerprinting, decoding
and preprocessing in DataLoader workers, scoring, the table rows, overlays, the shard, the merge into the tables),
without the interpreter start and model load, which the last column adds (the whole `crane-hf predict` command,
run once, with overlays, on the first round's images). The passes are interleaved in `--rounds` rounds, each on its
own part of the images, so that a load changing during the run changes all of them alike.

Memory: the tiny test model (input 56) on `--memory-images` PNGs of 64 x 64 (the model's cost is negligible, so
what grows with the number of images shows), `crane-hf predict` in a child process; the resident memory of the
process and its DataLoader workers is sampled every 0.2 s and reported when 10 %, 25 %, 50 % and 90 % of the
records are on disk (counted from the shards' lines), with the peak.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (ROOT, HERE):
    if folder not in sys.path:
        sys.path.insert(0, folder)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_images(folder: str, count: int, side: int, seed: int = 0) -> None:
    """`count` distinct smooth RGB PNGs of side x side."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, side, dtype=np.float32)
    for index in range(count):
        shift = rng.integers(0, 64, 3)
        pixels = np.stack([np.add.outer(base, base)[:, ::-1] / 2 + shift[c] for c in range(3)], -1)
        pixels[rng.integers(0, side - 8) :][:8, rng.integers(0, side - 8) :][:, :8] = 255
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{index:06d}.png"))


def throughput(args: argparse.Namespace, work: str) -> list[str]:
    """Model-only and end-to-end throughput, interleaved: the images are split into `--rounds` parts, and each
    round runs the three passes (model only, end to end with overlays, end to end without) on its part, one after
    the other, so that a load that changes during the run (other processes on the machine) changes all three
    alike; the table gives each pass's total and the median (and range) of the per-round ratios."""
    import statistics

    import torch
    from inference import build_model

    from crane_hf.commands.predict import default_workers
    from crane_hf.model_loading import load_model, make_pipeline
    from crane_hf.prediction.sharded_prediction import predict_images

    model_dir = os.path.join(work, "model")
    build_model("small", args.variant).save_pretrained(model_dir)
    rounds = max(1, min(args.rounds, args.images))
    parts = [args.images // rounds + (index < args.images % rounds) for index in range(rounds)]
    folders = []
    for index, count in enumerate(parts):
        folders.append(os.path.join(work, f"images-{index}"))
        write_images(folders[-1], count, 256, seed=index)
    model, processor = load_model(model_dir)
    pipe = make_pipeline(model, processor)
    workers = default_workers() if args.workers is None else args.workers

    def model_only(folder: str) -> float:
        names = sorted(os.listdir(folder))
        batches = []
        for start in range(0, len(names), args.batch_size):
            prepared = [pipe.preprocess(os.path.join(folder, name)) for name in names[start : start + args.batch_size]]
            keys = ("pixel_values", "original_size")
            batches.append({key: torch.cat([item[key] for item in prepared]) for key in keys})
        started = time.perf_counter()
        for batch in batches:
            pipe.forward(batch)
        return time.perf_counter() - started

    def end_to_end(folder: str, overlays: bool) -> float:
        output = os.path.join(work, f"out-{os.path.basename(folder)}-{overlays}")
        started = time.perf_counter()
        predict_images(
            model, processor, [folder], output, batch_size=args.batch_size, write_overlays=overlays,
            progress=False, workers=workers,
        )  # fmt: skip
        return time.perf_counter() - started

    model_only(folders[0])  # warm-up
    seconds: dict[str, list[float]] = {"model": [], "yes": [], "no": []}
    for folder in folders:
        seconds["model"].append(model_only(folder))
        seconds["yes"].append(end_to_end(folder, True))
        seconds["no"].append(end_to_end(folder, False))
    # the whole command once, as a user runs it (process start and model load included)
    command = [sys.executable, "-m", "crane_hf.commands.cli", "predict", folders[0], "--model", model_dir]
    command += ["--output", os.path.join(work, "out-cli"), "--quiet", "--batch-size", str(args.batch_size)]
    command += ["--workers", str(workers)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    whole = time.perf_counter() - started
    model_rate = args.images / sum(seconds["model"])
    rows = []
    whole_text = f"{whole:.1f} ({parts[0]} images)"
    for overlays in ("yes", "no"):
        ratios = [model / e2e for model, e2e in zip(seconds["model"], seconds[overlays])]
        rows.append(
            f"| {args.variant} | {args.images} | {rounds} | {args.batch_size} | {workers} | {overlays} | "
            f"{model_rate:.2f} | {args.images / sum(seconds[overlays]):.2f} | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {whole_text if overlays == 'yes' else '-'} |"
        )
    return [
        "| model (small shape) | images | rounds | batch | workers | overlays | model only (img/s) | "
        "end to end (img/s) | end-to-end / model-only ratio, median of rounds (range) | whole command (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def memory(args: argparse.Namespace, work: str) -> list[str]:
    import psutil

    from crane_hf.prediction.result_shards import shard_paths
    from tests.tiny_models import save_tiny_model_folder

    model_dir = save_tiny_model_folder(os.path.join(work, "tiny"), "crane+")
    lines = [
        "| images (64 x 64) | RSS at 10 % (MiB) | at 25 % | at 50 % | at 90 % | peak (MiB) | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for count in args.memory_images:
        images = os.path.join(work, f"small-{count}")
        write_images(images, count, 64, seed=count)
        output = os.path.join(work, f"memory-{count}")
        command = [sys.executable, "-m", "crane_hf.commands.cli", "predict", images, "--model", model_dir]
        command += ["--output", output, "--quiet", "--batch-size", "16", "--no-overlays"]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        parent = psutil.Process(process.pid)
        marks, peak, seen = {}, 0.0, 0
        partial = os.path.join(work, f".memory-{count}.crane-hf-partial")
        while process.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / 2**20
            except psutil.Error:
                continue
            peak = max(peak, rss)
            seen = _lines(shard_paths(partial))
            for share in (0.1, 0.25, 0.5, 0.9):
                if seen >= share * count and share not in marks:
                    marks[share] = rss
            time.sleep(0.2)
        wall = time.perf_counter() - started
        cells = " | ".join(f"{marks[s]:.0f}" if s in marks else "-" for s in (0.1, 0.25, 0.5, 0.9))
        lines.append(f"| {count} | {cells} | {peak:.0f} | {wall:.0f} |")
    return lines


def _lines(paths: list[str]) -> int:
    """Records on disk (newlines in the shards), counted without parsing them."""
    count = 0
    for path in paths:
        try:
            with open(path, "rb") as stream:
                count += sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(1 << 20), b""))
        except OSError:
            pass
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["throughput", "memory", "both"], default="both")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5, help="throughput: interleaved rounds (default 5)")
    parser.add_argument("--variant", choices=["crane", "crane+"], default="crane+")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--memory-images", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as work:
        if args.part in ("throughput", "both"):
            print("\n".join(throughput(args, work)))
        if args.part in ("memory", "both"):
            print("\n".join(memory(args, work)))
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
