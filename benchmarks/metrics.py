"""Time and peak memory of crane_hf.metrics against scikit-learn plus a per-threshold AUPRO loop.

Synthetic data at MVTec-AD scale by default: 1,725 maps at 518 x 518 (463 M pixels), about 2/3 of the images
anomalous with 1-4 elliptic blobs each (about 2.5 % anomalous pixels overall), smooth float32 maps (a low-resolution
noise field upsampled bilinearly, as a patch-level map is) raised inside the blobs. Images are generated on the fly
from their index, so every method sees the same data and streaming needs no copy of the data set.

Each method runs in its own subprocess; its peak memory is that process's maximum resident set size
(resource.getrusage), reported with the resident size it started from (after imports, and after generating the
inputs for methods that take the whole data set at once). Baselines that would not fit in memory or time run on
the first `--baseline-maps` / `--aupro-baseline-maps` images and are extrapolated linearly in the number of pixels
(marked in the table).

    python benchmarks/metrics.py                          # full scale (several minutes, ~6 GB)
    python benchmarks/metrics.py --maps 120 --size 256    # quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

SRC = Path(__file__).resolve().parents[1] / "src"
LOW_RESOLUTION = 37  # the patch grid of a ViT-L/14 at 518 x 518


def synthetic_image(index: int, size: int, seed: int) -> tuple[bool, float, np.ndarray, np.ndarray]:
    """One image: (label, score, mask [S,S] bool, map [S,S] float32), a function of (index, size, seed) only."""
    rng = np.random.default_rng([seed, index])
    anomalous = bool(rng.random() < 2 / 3)
    mask = np.zeros((size, size), dtype=bool)
    if anomalous:
        rows, cols = np.ogrid[:size, :size]
        num_blobs = int(rng.integers(1, 5))
        target_area = 0.0375 * size * size / num_blobs  # ~3.75 % of an anomalous image, 2.5 % of all pixels
        for _ in range(num_blobs):
            elongation = rng.uniform(0.4, 2.5)
            radius_rows = np.sqrt(target_area * rng.uniform(0.3, 1.7) / np.pi * elongation)
            radius_cols = target_area * rng.uniform(0.3, 1.7) / (np.pi * radius_rows)
            center_row, center_col = rng.uniform(0, size, 2)
            mask |= ((rows - center_row) / radius_rows) ** 2 + ((cols - center_col) / radius_cols) ** 2 <= 1
    noise = rng.normal(size=(LOW_RESOLUTION, LOW_RESOLUTION)).astype(np.float32)
    smooth = ndimage.zoom(noise, size / LOW_RESOLUTION, order=1)[:size, :size]
    anomaly_map = 0.25 * smooth + 0.35 * mask + 0.02 * rng.random((size, size), dtype=np.float32)
    score = float(anomaly_map.max() + 0.1 * rng.normal())
    return anomalous, score, mask, anomaly_map.astype(np.float32)


def synthetic_batch(start: int, stop: int, size: int, seed: int):
    """Images start..stop-1 stacked: labels [B], scores [B], masks [B,S,S], maps [B,S,S]."""
    images = [synthetic_image(index, size, seed) for index in range(start, stop)]
    labels = np.array([image[0] for image in images])
    scores = np.array([image[1] for image in images])
    return labels, scores, np.stack([image[2] for image in images]), np.stack([image[3] for image in images])


def resident_gib() -> float:
    """Current resident set size of this process in GiB (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_resident_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


# ------------------------------------------------------------------------------------------- methods (children)


def run_accumulator(args) -> dict:
    """Stream batches into AnomalyMetricAccumulator, then compute with both AUPRO variants."""
    from crane_hf.metrics import AnomalyMetricAccumulator

    base_gib = start_gib = resident_gib()
    accumulator = AnomalyMetricAccumulator()
    update_seconds = 0.0
    for start in range(0, args.maps, args.batch_size):
        batch = synthetic_batch(start, min(start + args.batch_size, args.maps), args.size, args.seed)
        began = time.perf_counter()
        accumulator.update(*batch[:2], masks=batch[2], maps=batch[3])
        update_seconds += time.perf_counter() - began
    timings = {"update": update_seconds}
    results = {}
    for variant in ("official", "legacy"):
        began = time.perf_counter()
        results[variant] = accumulator.compute(aupro_variant=variant)
        timings[f"compute {variant}"] = time.perf_counter() - began
    return {"base_gib": base_gib, "start_gib": start_gib, "seconds": timings, "results": results}


def run_compute_metrics(args) -> dict:
    """compute_metrics on the whole data set held in memory (official AUPRO)."""
    from crane_hf.metrics import compute_metrics

    base_gib = resident_gib()
    data = synthetic_batch(0, args.maps, args.size, args.seed)
    start_gib = resident_gib()
    began = time.perf_counter()
    results = compute_metrics(*data)
    seconds = {"compute": time.perf_counter() - began}
    return {"base_gib": base_gib, "start_gib": start_gib, "seconds": seconds, "results": results}


def run_sklearn(args) -> dict:
    """scikit-learn on the flattened pixels: roc_auc_score, average_precision_score, F1-max from the PR curve."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    base_gib = resident_gib()
    _, _, masks, maps = synthetic_batch(0, args.maps, args.size, args.seed)
    truth, scores = masks.ravel(), maps.ravel()
    start_gib = resident_gib()
    began = time.perf_counter()
    pixel_auroc = roc_auc_score(truth, scores)
    pixel_ap = average_precision_score(truth, scores)
    precision, recall, _ = precision_recall_curve(truth, scores)
    with np.errstate(invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    results = {"pixel_auroc": pixel_auroc, "pixel_ap": pixel_ap, "pixel_f1_max": float(np.nanmax(f1))}
    seconds = {"sklearn": time.perf_counter() - began}
    return {"base_gib": base_gib, "start_gib": start_gib, "seconds": seconds, "results": results}


def run_threshold_loop_aupro(args) -> dict:
    """AUPRO as the official Crane code computes it: 200 thresholds, a loop over every region at each threshold."""
    from skimage import measure
    from sklearn.metrics import auc

    base_gib = resident_gib()
    _, _, masks, maps = synthetic_batch(0, args.maps, args.size, args.seed)
    start_gib = resident_gib()
    began = time.perf_counter()
    regions = [
        (image, region.coords)
        for image, mask in enumerate(masks)
        for region in measure.regionprops(measure.label(mask))
    ]
    normal = ~masks
    num_normal = normal.sum()
    low, high = float(maps.min()), float(maps.max())
    fprs, pros = [], []
    for threshold in np.arange(low, high, (high - low) / 200):
        binary = maps > np.float32(threshold)
        recalls = [binary[image][coords[:, 0], coords[:, 1]].sum() / len(coords) for image, coords in regions]
        pros.append(np.mean(recalls))
        fprs.append(np.logical_and(binary, normal).sum() / num_normal)
    fprs, pros = np.array(fprs), np.array(pros)
    kept = fprs < 0.3
    kept_fprs = (fprs[kept] - fprs[kept].min()) / (fprs[kept].max() - fprs[kept].min())
    results = {"pixel_aupro_legacy": auc(kept_fprs, pros[kept])}
    seconds = {"aupro loop": time.perf_counter() - began}
    return {"base_gib": base_gib, "start_gib": start_gib, "seconds": seconds, "results": results}


METHODS = {
    "accumulator": run_accumulator,
    "compute_metrics": run_compute_metrics,
    "sklearn": run_sklearn,
    "aupro_loop": run_threshold_loop_aupro,
}


# ------------------------------------------------------------------------------------------------- parent


def run_child(method: str, args, maps: int) -> dict:
    """Run one method in a fresh interpreter and return its measurements plus its peak RSS."""
    command = [sys.executable, __file__, "--child", method, "--maps", str(maps), "--size", str(args.size)]
    command += ["--seed", str(args.seed), "--batch-size", str(args.batch_size)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=1725, help="number of images (default: MVTec-AD's 1,725)")
    parser.add_argument("--size", type=int, default=518, help="map side in pixels (default 518)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per accumulator update")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-maps", type=int, default=216, help="images for scikit-learn (then extrapolated)")
    parser.add_argument(
        "--aupro-baseline-maps", type=int, default=None, help="images for the AUPRO threshold loop (default: all)"
    )
    parser.add_argument("--skip-one-shot", action="store_true", help="do not run compute_metrics on all maps")
    parser.add_argument("--child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        measurement = METHODS[args.child](args)
        measurement["peak_gib"] = peak_resident_gib()
        print(json.dumps(measurement))
        return

    pixels = args.maps * args.size * args.size
    print(f"{args.maps} maps at {args.size} x {args.size} = {pixels / 1e6:.0f} M pixels, batch {args.batch_size}")
    rows = []  # (method, maps, seconds, start GiB, peak GiB, note)

    def add_rows(method: str, maps: int, names: dict[str, str]) -> dict:
        """Run `method` on `maps` images; rows for the timings in `names`, extrapolated to --maps if fewer."""
        measurement = run_child(method, args, maps)
        scale = args.maps / maps
        base, peak = measurement["base_gib"], measurement["peak_gib"]
        for key, label in names.items():
            seconds = measurement["seconds"][key]
            if scale == 1:
                rows.append((label, maps, seconds, measurement["start_gib"], peak, "measured"))
            else:  # time and the memory above the interpreter's own scale with the number of pixels
                note = f"extrapolated x{scale:.1f} from {maps} maps ({seconds:.1f} s, peak {peak:.2f} GiB)"
                rows.append((label, args.maps, seconds * scale, None, base + (peak - base) * scale, note))
        return measurement

    streamed = add_rows(
        "accumulator",
        args.maps,
        {
            "update": "AnomalyMetricAccumulator.update (all batches)",
            "compute official": "AnomalyMetricAccumulator.compute (official AUPRO)",
            "compute legacy": "AnomalyMetricAccumulator.compute (legacy AUPRO)",
        },
    )
    one_shot = None
    if not args.skip_one_shot:
        one_shot = add_rows("compute_metrics", args.maps, {"compute": "compute_metrics, all maps at once (official)"})
    baseline_maps = min(args.baseline_maps, args.maps)
    sklearn = add_rows("sklearn", baseline_maps, {"sklearn": "sklearn roc_auc + AP + PR-curve F1 (pixels)"})
    if baseline_maps < args.maps:  # the same subset through compute_metrics, measured, for a like-for-like row
        subset = run_child("compute_metrics", args, baseline_maps)
        label = f"compute_metrics on the first {baseline_maps} maps (official)"
        rows.append(
            (label, baseline_maps, subset["seconds"]["compute"], subset["start_gib"], subset["peak_gib"], "measured")
        )
    aupro_maps = min(args.aupro_baseline_maps or args.maps, args.maps)
    loop_label = "AUPRO loop, 200 thresholds x regions (official code style)"
    loop = add_rows("aupro_loop", aupro_maps, {"aupro loop": loop_label})

    header = ("method", "maps", "time (s)", "start RSS (GiB)", "peak RSS (GiB)", "note")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for method, maps, seconds, start, peak, note in rows:
        start_text = "" if start is None else f"{start:.2f}"
        print(f"| {method} | {maps} | {seconds:.1f} | {start_text} | {peak:.2f} | {note} |")
    print("accumulator results (official):", json.dumps(streamed["results"]["official"]))
    print("accumulator results (legacy):", json.dumps(streamed["results"]["legacy"]))
    if one_shot is not None:
        same = one_shot["results"] == streamed["results"]["official"]
        print(f"compute_metrics (one shot) == accumulator (batches of {args.batch_size}): {same}")
    if baseline_maps == args.maps:
        print("sklearn results:", json.dumps(sklearn["results"]))
    if aupro_maps == args.maps:
        legacy = streamed["results"]["legacy"]["pixel_aupro"]
        print(f"legacy AUPRO: threshold loop {loop['results']['pixel_aupro_legacy']!r}, accumulator {legacy!r}")


if __name__ == "__main__":
    main()
