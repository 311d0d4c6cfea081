"""`crane-hf calibrate`: decision thresholds from normal images, saved into the model folder.

The image threshold is the lowest value at which at most `--fpr` of the normal images score at or above it; the
pixel threshold does the same over every pixel of the smoothed maps (at each image's original size) with
`--pixel-fpr`. Both go into the folder's config.json (`image_threshold`, `pixel_threshold`), which the pipeline and
`crane-hf predict` use by default; `calibration.json` records how they were obtained and the previous values.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import datetime, timezone
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .atomic_io import atomic_write_text
from .image_files import collect_image_paths, read_image


def threshold_for_fpr(values: np.ndarray, fpr: float) -> tuple[float, float]:
    """Lowest threshold t with mean(values >= t) <= fpr (ties kept below t); returns (t, achieved rate).

    Thresholds live in [0, 1]: if even t = 1 flags more than `fpr` of the values, 1.0 is returned with its rate.
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr={fpr} must be in [0, 1).")
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("No values to calibrate on.")
    allowed = math.floor(fpr * values.size)
    if allowed >= values.size:
        threshold = float(values.min())
    else:
        boundary = np.partition(values, values.size - allowed - 1)[values.size - allowed - 1]
        threshold = float(np.nextafter(boundary, np.inf))
    threshold = min(max(threshold, 0.0), 1.0)
    return threshold, float((values >= threshold).mean())


def calibrate_folder(
    model_dir: str,
    inputs: list[str],
    fpr: float = 0.01,
    pixel_fpr: float = 0.01,
    batch_size: int = 8,
    device: str | None = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Compute and save thresholds for the model folder `model_dir` from the normal images in `inputs`."""
    from .model_loading import load_model
    from .predict import make_pipeline

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{model_dir} is not a model folder (no config.json); calibrate writes into a model folder.")
    paths, missing = collect_image_paths(inputs)
    images, skipped = [], [f"{item.path}: {item.reason}" for item in missing]
    for path in paths:
        try:
            images.append(read_image(path))
        except ValueError as error:
            skipped.append(str(error))
    if not images:
        raise ValueError(
            "No readable normal images to calibrate on." + (f" Skipped: {'; '.join(skipped)}" if skipped else "")
        )
    model, processor = load_model(model_dir, device=device)
    pipe = make_pipeline(model, processor)
    scores, pixels = [], []
    for output in tqdm(  # a generator makes the pipeline stream, so the bar moves as images are scored
        pipe((image for image in images), batch_size=batch_size),
        total=len(images),
        desc="Calibrating",
        disable=not progress,
    ):
        scores.append(output["score"])
        pixels.append(output["anomaly_map"].ravel())
    image_threshold, image_rate = threshold_for_fpr(np.asarray(scores), fpr)
    pixel_threshold, pixel_rate = threshold_for_fpr(np.concatenate(pixels), pixel_fpr)
    with open(config_path, encoding="utf-8") as stream:
        config = json.load(stream)
    record = {
        "calibrated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "normal_images": len(images),
        "skipped": skipped,
        "image": {"target_fpr": fpr, "threshold": image_threshold, "fpr_on_calibration_set": image_rate},
        "pixel": {"target_fpr": pixel_fpr, "threshold": pixel_threshold, "fpr_on_calibration_set": pixel_rate},
        "previous": {
            "image_threshold": config.get("image_threshold"),
            "pixel_threshold": config.get("pixel_threshold"),
        },
    }
    config["image_threshold"] = image_threshold
    config["pixel_threshold"] = pixel_threshold
    atomic_write_text(os.path.join(model_dir, "calibration.json"), json.dumps(record, indent=2) + "\n")
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="model folder to calibrate (its config.json is updated)")
    parser.add_argument("inputs", nargs="+", help="normal (defect-free) images: files, folders or globs")
    parser.add_argument("--fpr", type=float, default=0.01, help="target image false-positive rate (default 0.01)")
    parser.add_argument("--pixel-fpr", type=float, default=0.01, help="target pixel false-positive rate")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        record = calibrate_folder(
            args.model_dir, args.inputs, args.fpr, args.pixel_fpr, args.batch_size, args.device, not args.quiet
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for kind in ("image", "pixel"):
        item = record[kind]
        print(
            f"{kind} threshold {item['threshold']:.6f} (target FPR {item['target_fpr']}, "
            f"{item['fpr_on_calibration_set']:.4f} on the {record['normal_images']} normal images)"
        )
    for line in record["skipped"]:
        print(f"skipped {line}", file=sys.stderr)
    print(f"Saved into {args.model_dir}/config.json (details in calibration.json)")
    return 3 if record["skipped"] else 0
