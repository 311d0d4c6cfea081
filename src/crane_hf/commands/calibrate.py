"""`crane-hf calibrate`: decision thresholds from normal images, saved into the model folder.

The image threshold is the lowest image score of the normal images at which at most `--fpr` of them score at or
above it; the pixel threshold does the same over every pixel of the smoothed maps (at each image's original size)
with `--pixel-fpr`. Both are picked among the float32 values themselves and hold under the exact comparison the
pipeline and `crane-hf predict` make (`at_or_above` in `crane_hf/models/crane/thresholds.py`), so the rates reported
are the rates `predict` gives on the same images. Both go into the folder's config.json (`image_threshold`,
`pixel_threshold`), which the pipeline and `crane-hf predict` use by default; `calibration.json` records how they
were obtained and the previous values.

Images are read and scored a few at a time: memory does not grow with their number (the image scores are kept,
and for the pixels a fixed-size histogram, `ValueHistogram`). An image that cannot be read or whose
score or map is not finite is skipped and reported; no threshold is ever written from NaN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..io.atomic import atomic_write_text
from ..io.image_files import collect_image_paths


def threshold_for_fpr(values: np.ndarray, fpr: float) -> tuple[float, float]:
    """Lowest threshold t among `values` with mean(values >= t) <= fpr (exact comparison); returns (t, rate).

    Thresholds live in [0, 1]: if even t = 1 flags more than `fpr` of the values, 1.0 is returned with its rate.
    See `models/crane/thresholds.py`: `lowest_threshold`.
    """
    from ..models.crane.thresholds import lowest_threshold

    return lowest_threshold(values, fpr)


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
    from ..model_loading import load_model, make_pipeline
    from ..models.crane.thresholds import ValueHistogram
    from .predict import score_image_files

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{model_dir} is not a model folder (no config.json); calibrate writes into a model folder.")
    threshold_for_fpr(np.zeros(1), fpr)  # refuse a bad --fpr / --pixel-fpr before any work
    threshold_for_fpr(np.zeros(1), pixel_fpr)
    paths, missing = collect_image_paths(inputs)
    skipped = [f"{item.path}: {item.reason}" for item in missing]
    model, processor = load_model(model_dir, device=device)
    pipe = make_pipeline(model, processor)
    scores: list[float] = []
    pixels = ValueHistogram()
    chunk_size = max(1, batch_size)  # images (and maps) held at a time
    with tqdm(total=len(paths), desc="Calibrating", unit="image", disable=not progress) as bar:
        for path, output, reason in score_image_files(pipe, paths, batch_size, {}, chunk_size):
            bar.update(1)
            if output is None:
                skipped.append(f"{path}: {reason}")
                continue
            scores.append(output["score"])
            pixels.update(output["anomaly_map"])
    if not scores:
        raise ValueError(
            "No readable normal images to calibrate on." + (f" Skipped: {'; '.join(skipped)}" if skipped else "")
        )
    image_threshold, image_rate = threshold_for_fpr(np.asarray(scores, dtype=np.float32), fpr)
    pixel_threshold, pixel_rate = pixels.threshold(pixel_fpr)
    with open(config_path, encoding="utf-8") as stream:
        config = json.load(stream)
    record = {
        "calibrated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "normal_images": len(scores),
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
    parser.add_argument(
        "model_dir", help="model folder or exported folder (crane-hf export) to calibrate (its config.json is updated)"
    )
    parser.add_argument("inputs", nargs="+", help="normal (defect-free) images: files, folders or globs")
    parser.add_argument("--fpr", type=float, default=0.01, help="target image false-positive rate (default 0.01)")
    parser.add_argument("--pixel-fpr", type=float, default=0.01, help="target pixel false-positive rate")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


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
            f"{kind} threshold {item['threshold']!r} (target FPR {item['target_fpr']}, "
            f"{item['fpr_on_calibration_set']:.4f} on the {record['normal_images']} normal images)"
        )
        if item["fpr_on_calibration_set"] > item["target_fpr"]:
            print(
                f"warning: the {kind} target FPR {item['target_fpr']} cannot be met: "
                f"{item['fpr_on_calibration_set']:.4f} of the normal {kind} values score 1.0, the highest threshold",
                file=sys.stderr,
            )
    for line in record["skipped"]:
        print(f"skipped {line}", file=sys.stderr)
    print(f"Saved into {args.model_dir}/config.json (details in calibration.json)")
    return 3 if record["skipped"] else 0
