"""`crane-hf predict`: score image files and write a CSV/JSON table and heatmap overlays.

The output folder is built under a temporary name and renamed when complete, so an interrupted run leaves nothing
half-written; an existing output is only replaced with `--overwrite`, and only if crane-hf wrote it. The output is
never read as input (nor any other crane-hf output folder inside the inputs), and may not be or contain an input,
the model folder, the working, home or root folder (`io/output_safety.py`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from ..computation_options import add_computation_arguments, computation_overrides
from ..io.atomic import atomic_output_dir
from ..io.image_files import SkippedFile, find_image_inputs
from ..io.output_names import path_inside, safe_file_name
from ..io.output_safety import check_output_dir, protected_paths
from .cli_support import one_line, require_positive, require_range

if TYPE_CHECKING:
    from ..models.crane.pipeline_zero_shot_anomaly_detection import ZeroShotAnomalyDetectionPipeline

CSV_COLUMNS = ("path", "score", "is_anomalous", "max_pixel_score", "anomalous_pixel_fraction", "overlay")


@dataclass
class PredictionReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    output_dir: str | None = None
    left_out: list[str] = field(default_factory=list)  # crane-hf output folders not searched


def _output_name(index: int, path: str, suffix: str) -> str:
    """A unique, readable file name: index, parent folder and file name (extension kept), e.g.
    00003_scratch_000.jpg.png; shortened safely when long (`io.output_names.safe_file_name`)."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return safe_file_name(f"{index:05d}_{parent}_{os.path.basename(path)}", suffix)


def _score_chunk(pipe, images, batch_size, params):
    """Pipeline outputs for a chunk; on failure, image by image so one bad input cannot sink its batch."""
    try:
        return [(output, None) for output in pipe(images, batch_size=batch_size, **params)]
    except Exception:  # isolate the offending image below and report it
        results = []
        for image in images:
            try:
                results.append((pipe(image, **params), None))
            except Exception as error:  # reported as a skipped file
                results.append((None, error))
        return results


def score_image_files(
    pipe: ZeroShotAnomalyDetectionPipeline, paths: list[str], batch_size: int, params: dict[str, Any], chunk_size: int
) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """Read and score `chunk_size` image files at a time (memory does not grow with their number); yields, for
    each path, (path, pipeline output, None) or (path, None, the reason it was skipped)."""
    from ..models.crane.image_reading import read_image

    for start in range(0, len(paths), chunk_size):
        loaded = []
        for path in paths[start : start + chunk_size]:
            try:
                loaded.append((path, read_image(path)))
            except ValueError as error:
                yield path, None, str(error).removeprefix(f"{path}: ")
        names = [path for path, _ in loaded]
        results = _score_chunk(pipe, [image for _, image in loaded], batch_size, params) if loaded else []
        loaded.clear()  # the decoded images of this chunk are not kept
        for path, (output, error) in zip(names, results):
            yield (path, output, None) if output is not None else (path, None, f"could not be scored ({error})")


def predict_images(
    model: Any,
    processor: Any,
    inputs: list[str],
    output_dir: str,
    batch_size: int = 8,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    write_overlays: bool = True,
    save_maps: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    protected: list[tuple[str, str]] | None = None,
) -> PredictionReport:
    """Score every image in `inputs` (files, folders, globs) and write the results to `output_dir`.

    Writes `predictions.csv` and `predictions.json` (one row per scored image), `overlays/*.png` (heatmap and
    threshold contour), optionally `maps/*.npy` (float32 smoothed maps) and `skipped.txt` (unreadable inputs).
    The output may not be or contain an input, the model folder or a `protected` (what, path) folder; it is left
    out of the inputs, as are other crane-hf output folders (`io.image_files.find_image_inputs`).
    """
    from ..model_loading import make_pipeline
    from ..models.crane.thresholds import at_or_above, check_threshold

    for name, value in (("threshold", threshold), ("pixel_threshold", pixel_threshold)):
        if value is not None:
            check_threshold(value, name)
    model.config.check_thresholds(image=threshold is None, pixel=pixel_threshold is None)  # before any work
    require_positive("batch_size", batch_size)
    protected = [*(protected or []), *prediction_protections(inputs, getattr(model, "name_or_path", None))]
    check_output_dir(output_dir, overwrite, protected)
    found = find_image_inputs(inputs, exclude=[output_dir])
    paths = found.paths
    report = PredictionReport(skipped=list(found.skipped), output_dir=output_dir, left_out=found.left_out)
    pipe = make_pipeline(model, processor)
    params: dict[str, Any] = {"return_overlay": write_overlays}
    if threshold is not None:
        params["threshold"] = threshold
    if pixel_threshold is not None:
        params["pixel_threshold"] = pixel_threshold
    decision = model.config.pixel_threshold if pixel_threshold is None else pixel_threshold
    chunk_size = max(1, batch_size) * 4
    with atomic_output_dir(output_dir, overwrite=overwrite, protected=protected, command="predict") as staging:
        if write_overlays:
            os.makedirs(os.path.join(staging, "overlays"))
        if save_maps:
            os.makedirs(os.path.join(staging, "maps"))
        bar = tqdm(total=len(paths), desc="Scoring", unit="image", disable=not progress)
        for path, output, reason in score_image_files(pipe, paths, batch_size, params, chunk_size):
            bar.update(1)
            if output is None:
                report.skipped.append(SkippedFile(path, reason))
                continue
            index = len(report.rows)
            row = {
                "path": path,
                "score": float(output["score"]),  # unrounded: the decision is made on this value
                "is_anomalous": bool(output["is_anomalous"]),
                "max_pixel_score": float(output["anomaly_map"].max()),  # unrounded, like the score
                "anomalous_pixel_fraction": float(at_or_above(output["anomaly_map"], decision).mean()),
                "overlay": "",
            }
            if write_overlays:
                row["overlay"] = os.path.join("overlays", _output_name(index, path, ".png"))
                output["overlay"].save(path_inside(staging, row["overlay"]))
            if save_maps:
                np.save(
                    path_inside(staging, os.path.join("maps", _output_name(index, path, ".npy"))),
                    output["anomaly_map"],
                )
            report.rows.append(row)
        bar.close()
        _write_tables(staging, report, model, threshold, decision)
    return report


def prediction_protections(inputs: list[str], model_source: str | None) -> list[tuple[str, str]]:
    """The folders an output of `predict` (or `calibrate`) may not be or contain: the inputs and the model folder."""
    return [*protected_paths("an input", inputs), *protected_paths("the model folder", [model_source])]


def _write_tables(
    folder: str, report: PredictionReport, model: Any, threshold: float | None, pixel_threshold: float
) -> None:
    from ..model_loading import computation_summary

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(report.rows)
    with open(os.path.join(folder, "predictions.csv"), "w", encoding="utf-8", newline="") as stream:
        stream.write(buffer.getvalue())
    summary = {
        "model": getattr(model.config, "preset", None) or model.config.name_or_path or None,
        "computation": computation_summary(model),
        "image_threshold": model.config.image_threshold if threshold is None else threshold,
        "pixel_threshold": pixel_threshold,
        "predictions": report.rows,
        "skipped": [asdict(item) for item in report.skipped],
        "left_out": report.left_out,
    }
    with open(os.path.join(folder, "predictions.json"), "w", encoding="utf-8") as stream:
        json.dump(summary, stream, indent=2)
    if report.skipped:
        with open(os.path.join(folder, "skipped.txt"), "w", encoding="utf-8") as stream:
            stream.writelines(f"{item.path}\t{item.reason}\n" for item in report.skipped)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("--model", default="crane+/mvtec", help="preset name, model folder or Hub id")
    parser.add_argument("--clip", default=None, help="local CLIP folder for a preset (instead of the Hub)")
    parser.add_argument("--dino", default=None, help="local DINOv2 folder for a preset (instead of the Hub)")
    parser.add_argument(
        "--allow-backbone-mismatch", action="store_true", help="accept a --clip unlike the preset's fingerprint"
    )
    parser.add_argument("--output", default="crane-hf-predictions", help="folder to write (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights' dtype (default: as loaded)"
    )
    parser.add_argument("--threshold", type=float, default=None, help="image-score threshold (default: the model's)")
    parser.add_argument("--pixel-threshold", type=float, default=None, help="contour threshold (default: the model's)")
    parser.add_argument("--no-overlays", action="store_true", help="do not write heatmap overlays")
    parser.add_argument("--save-maps", action="store_true", help="also write each smoothed map as .npy")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_computation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..model_loading import load_model, resolve_device

    try:  # every argument, the device and the output are checked before the model is loaded
        require_positive("--batch-size", args.batch_size)
        require_range("--threshold", args.threshold, 0.0, 1.0)
        require_range("--pixel-threshold", args.pixel_threshold, 0.0, 1.0)
        resolve_device(args.device)
        protected = [
            *prediction_protections(args.inputs, args.model),
            *protected_paths("a backbone", [args.clip, args.dino]),
        ]
        check_output_dir(args.output, args.overwrite, protected)
        model, processor = load_model(
            args.model,
            clip=args.clip,
            dino=args.dino,
            allow_backbone_mismatch=args.allow_backbone_mismatch,
            device=args.device,
            dtype=args.dtype,
            **computation_overrides(args),
        )
        report = predict_images(
            model,
            processor,
            args.inputs,
            args.output,
            batch_size=args.batch_size,
            threshold=args.threshold,
            pixel_threshold=args.pixel_threshold,
            write_overlays=not args.no_overlays,
            save_maps=args.save_maps,
            overwrite=args.overwrite,
            progress=not args.quiet,
            protected=protected,
        )
    except (OSError, TypeError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    anomalous = sum(row["is_anomalous"] for row in report.rows)
    print(f"Scored {len(report.rows)} images ({anomalous} anomalous); results in {report.output_dir}")
    for folder in report.left_out:
        print(f"note: left out {folder} (a crane-hf output folder, never read as input)", file=sys.stderr)
    for item in report.skipped:
        print(f"skipped {item.path}: {item.reason}", file=sys.stderr)
    return 3 if report.skipped else 0
