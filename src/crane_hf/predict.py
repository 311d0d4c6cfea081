"""`crane-hf predict`: score image files and write a CSV/JSON table and heatmap overlays.

The output folder is built under a temporary name and renamed when complete, so an interrupted run leaves nothing
half-written, and an existing output is only replaced with `--overwrite`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .atomic_io import atomic_output_dir, check_can_write
from .image_files import SkippedFile, collect_image_paths, read_image
from .pipeline_zero_shot_anomaly_detection import ZeroShotAnomalyDetectionPipeline

CSV_COLUMNS = ("path", "score", "is_anomalous", "max_pixel_score", "anomalous_pixel_fraction", "overlay")


@dataclass
class PredictionReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    output_dir: str | None = None


def make_pipeline(model: Any, processor: Any) -> ZeroShotAnomalyDetectionPipeline:
    """The anomaly-detection pipeline around an already loaded model and processor."""
    return ZeroShotAnomalyDetectionPipeline(model=model, image_processor=processor, device=model.device)


def _overlay_name(index: int, path: str) -> str:
    """The image's output name: unique and readable, with index, up to three parent folders (the class of the
    MVTec-AD layout) and the file name with its extension, e.g. 00003_coins_test_scratch_000.png; its figure is
    `figure_file_name` of it and its map that name plus .npy."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)[-4:]
    return f"{index:05d}_" + re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts))[-120:]


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
    report_html: bool = False,
    color_scale: str = "absolute",
    notice: str | None = None,
) -> PredictionReport:
    """Score every image in `inputs` (files, folders, globs) and write the results to `output_dir`.

    Writes `predictions.csv` and `predictions.json` (one row per scored image), `overlays/*.png` (decision figures:
    image | heatmap with colour bar | pixels over the threshold, with name, verdict, score and thresholds; colours on
    the absolute [0, 1] scale or, with `color_scale="image"`, stretched to each map), optionally `maps/*.npy`
    (float32 smoothed maps), `skipped.txt` (unreadable inputs) and, with `report_html`, `report.html` (with `notice`
    highlighted at its top).
    """
    from .reporting.decision_figure import COLOR_SCALES, save_decision_figure
    from .reporting.output_names import figure_file_name

    if color_scale not in COLOR_SCALES:
        raise ValueError(f"color_scale must be one of {COLOR_SCALES}, got {color_scale!r}.")
    check_can_write(output_dir, overwrite)
    paths, skipped = collect_image_paths(inputs)
    report = PredictionReport(skipped=list(skipped), output_dir=output_dir)
    pipe = make_pipeline(model, processor)
    params: dict[str, Any] = {}
    if threshold is not None:
        params["threshold"] = threshold
    if pixel_threshold is not None:
        params["pixel_threshold"] = pixel_threshold
    decision = model.config.pixel_threshold if pixel_threshold is None else pixel_threshold
    image_decision = model.config.image_threshold if threshold is None else threshold
    chunk_size = max(1, batch_size) * 4
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        if write_overlays:
            os.makedirs(os.path.join(staging, "overlays"))
        if save_maps:
            os.makedirs(os.path.join(staging, "maps"))
        bar = tqdm(total=len(paths), desc="Scoring", unit="image", disable=not progress)
        for start in range(0, len(paths), chunk_size):
            loaded = []
            for path in paths[start : start + chunk_size]:
                try:
                    loaded.append((path, read_image(path)))
                except ValueError as error:
                    report.skipped.append(SkippedFile(path, str(error).removeprefix(f"{path}: ")))
                    bar.update(1)
            results = _score_chunk(pipe, [image for _, image in loaded], batch_size, params) if loaded else []
            for (path, image), (output, error) in zip(loaded, results):
                bar.update(1)
                if output is None:
                    report.skipped.append(SkippedFile(path, f"could not be scored ({error})"))
                    continue
                index = len(report.rows)
                row = {
                    "path": path,
                    "score": round(float(output["score"]), 6),
                    "is_anomalous": bool(output["is_anomalous"]),
                    "max_pixel_score": round(float(output["anomaly_map"].max()), 6),
                    "anomalous_pixel_fraction": round(float((output["anomaly_map"] >= decision).mean()), 6),
                    "overlay": "",
                }
                if write_overlays:
                    row["overlay"] = os.path.join("overlays", figure_file_name(_overlay_name(index, path)))
                    save_decision_figure(
                        os.path.join(staging, row["overlay"]),
                        _display_rgb(image),
                        output["anomaly_map"],
                        score=output["score"],
                        image_threshold=image_decision,
                        pixel_threshold=decision,
                        name=os.path.join(*os.path.normpath(os.path.abspath(path)).split(os.sep)[-4:]),
                        color_scale=color_scale,
                    )
                if save_maps:
                    np.save(os.path.join(staging, "maps", _overlay_name(index, path) + ".npy"), output["anomaly_map"])
                report.rows.append(row)
        bar.close()
        _write_tables(staging, report, model, threshold, decision)
        if report_html:
            from .reporting.run_report import write_report_for_predictions

            write_report_for_predictions(staging, notice=notice, progress=progress)
    return report


def _display_rgb(image: Any) -> np.ndarray:
    """The image as the figure shows it: RGB uint8, converted as the processor converts it (16-bit, float...)."""
    from .image_processing_crane import image_to_rgb_array

    rgb = image_to_rgb_array(image)
    return rgb if rgb.dtype == np.uint8 else (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _write_tables(
    folder: str, report: PredictionReport, model: Any, threshold: float | None, pixel_threshold: float
) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(report.rows)
    with open(os.path.join(folder, "predictions.csv"), "w", encoding="utf-8", newline="") as stream:
        stream.write(buffer.getvalue())
    summary = {
        "model": getattr(model.config, "preset", None) or model.config.name_or_path or None,
        "image_threshold": model.config.image_threshold if threshold is None else threshold,
        "pixel_threshold": pixel_threshold,
        "predictions": report.rows,
        "skipped": [asdict(item) for item in report.skipped],
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
    parser.add_argument("--output", default="crane-hf-predictions", help="folder to write (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threshold", type=float, default=None, help="image-score threshold (default: the model's)")
    parser.add_argument("--pixel-threshold", type=float, default=None, help="contour threshold (default: the model's)")
    parser.add_argument("--no-overlays", action="store_true", help="do not write heatmap overlays")
    parser.add_argument("--save-maps", action="store_true", help="also write each smoothed map as .npy")
    parser.add_argument(
        "--color-scale",
        choices=["absolute", "image"],
        default="absolute",
        help="heatmap colours: absolute 0-1 scores (comparable across images; default) or stretched to each image",
    )
    parser.add_argument("--report", action="store_true", help="also write report.html to review the run in a browser")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .model_loading import load_model

    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        check_can_write(args.output, args.overwrite)
        model, processor = load_model(args.model, clip=args.clip, dino=args.dino, device=args.device, dtype=args.dtype)
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
            report_html=args.report,
            color_scale=args.color_scale,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    anomalous = sum(row["is_anomalous"] for row in report.rows)
    print(f"Scored {len(report.rows)} images ({anomalous} anomalous); results in {report.output_dir}")
    if args.report:
        print(f"Report: {os.path.join(os.path.abspath(report.output_dir), 'report.html')}")
    for item in report.skipped:
        print(f"skipped {item.path}: {item.reason}", file=sys.stderr)
    return 3 if report.skipped else 0
