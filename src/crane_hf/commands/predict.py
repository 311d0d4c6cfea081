"""`crane-hf predict`: score image files and write a CSV/JSON table, decision figures and (`--report`) report.html.

Each scored image gets a decision figure (image | anomaly map with colour bar | pixels at or above the pixel
threshold, with the file name, verdict, score and thresholds written on it: `reporting/decision_figure.py`); with
`--report`, `report.html` shows the run sorted by score, filterable by verdict and class, with the score histogram
and the threshold (`reporting/run_report.py`); it opens from disk, offline.

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
from ..few_shot_options import add_reference_arguments, check_reference, load_reference_memory
from ..io.atomic import atomic_output_dir
from ..io.image_files import SkippedFile, find_image_inputs
from ..io.output_names import path_inside, safe_file_name
from ..io.output_safety import check_output_dir, protected_paths
from .cli_support import one_line, require_positive, require_range

if TYPE_CHECKING:
    from ..models.crane.pipeline_zero_shot_anomaly_detection import ZeroShotAnomalyDetectionPipeline

CSV_COLUMNS = ("path", "score", "is_anomalous", "max_pixel_score", "anomalous_pixel_fraction", "overlay")
FEW_SHOT_COLUMNS = ("zero_shot_score", "few_shot_score")  # with a reference memory: the two branches of "score"


@dataclass
class PredictionReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    output_dir: str | None = None
    left_out: list[str] = field(default_factory=list)  # crane-hf output folders not searched


def _output_name(index: int, path: str, suffix: str) -> str:
    """A unique, readable file name: index, up to three parent folders (the class of the MVTec-AD layout) and the
    file name with its extension, e.g. 00003_coins_test_scratch_000.jpg.png; shortened safely when long
    (`io.output_names.safe_file_name`)."""
    return safe_file_name(f"{index:05d}_" + "_".join(_last_parts(path)), suffix)


def _last_parts(path: str) -> list[str]:
    """The file name and up to three folders above it: what a figure names its image by."""
    return os.path.normpath(os.path.abspath(path)).split(os.sep)[-4:]


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
) -> Iterator[tuple[str, Any, dict[str, Any] | None, str | None]]:
    """Read and score `chunk_size` image files at a time (memory does not grow with their number); yields, for
    each path, (path, decoded image, pipeline output, None) or (path, None, None, the reason it was skipped)."""
    from ..models.crane.image_reading import read_image

    for start in range(0, len(paths), chunk_size):
        loaded = []
        for path in paths[start : start + chunk_size]:
            try:
                loaded.append((path, read_image(path)))
            except ValueError as error:
                yield path, None, None, str(error).removeprefix(f"{path}: ")
        results = _score_chunk(pipe, [image for _, image in loaded], batch_size, params) if loaded else []
        for (path, image), (output, error) in zip(loaded, results):
            if output is not None:
                yield path, image, output, None
            else:
                yield path, None, None, f"could not be scored ({error})"
        loaded.clear()  # the decoded images of this chunk are not kept


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
    report_html: bool = False,
    color_scale: str = "absolute",
    notice: str | None = None,
) -> PredictionReport:
    """Score every image in `inputs` (files, folders, globs) and write the results to `output_dir`.

    Writes `predictions.csv` and `predictions.json` (one row per scored image), `overlays/*.png` (decision figures:
    image | heatmap with colour bar | pixels at or above the pixel threshold, with name, verdict, score and
    thresholds; colours on the absolute [0, 1] scale or, with `color_scale="image"`, stretched to each map),
    optionally `maps/*.npy` (float32 smoothed maps), `skipped.txt` (unreadable inputs) and, with `report_html`,
    `report.html` and its thumbnails `report_files/` (with `notice` highlighted at its top).
    The output may not be or contain an input, the model folder or a `protected` (what, path) folder; it is left
    out of the inputs, as are other crane-hf output folders (`io.image_files.find_image_inputs`).
    """
    from ..model_loading import make_pipeline
    from ..models.crane.thresholds import at_or_above, check_threshold
    from ..reporting.decision_figure import COLOR_SCALES, save_decision_figure

    for name, value in (("threshold", threshold), ("pixel_threshold", pixel_threshold)):
        if value is not None:
            check_threshold(value, name)
    if color_scale not in COLOR_SCALES:
        raise ValueError(f"color_scale must be one of {COLOR_SCALES}, got {color_scale!r}.")
    memory = getattr(model, "reference_memory", None)  # thresholds hold for the memory they were calibrated with
    model.config.check_thresholds(  # before any work
        image=threshold is None,
        pixel=pixel_threshold is None,
        few_shot_memory=memory.identity if memory is not None else None,
    )
    require_positive("batch_size", batch_size)
    protected = [*(protected or []), *prediction_protections(inputs, getattr(model, "name_or_path", None))]
    check_output_dir(output_dir, overwrite, protected)
    found = find_image_inputs(inputs, exclude=[output_dir])
    paths = found.paths
    report = PredictionReport(skipped=list(found.skipped), output_dir=output_dir, left_out=found.left_out)
    pipe = make_pipeline(model, processor)
    params: dict[str, Any] = {}
    if threshold is not None:
        params["threshold"] = threshold
    if pixel_threshold is not None:
        params["pixel_threshold"] = pixel_threshold
    decision = model.config.pixel_threshold if pixel_threshold is None else pixel_threshold
    image_decision = model.config.image_threshold if threshold is None else threshold
    chunk_size = max(1, batch_size) * 4
    with atomic_output_dir(output_dir, overwrite=overwrite, protected=protected, command="predict") as staging:
        if write_overlays:
            os.makedirs(os.path.join(staging, "overlays"))
        if save_maps:
            os.makedirs(os.path.join(staging, "maps"))
        bar = tqdm(total=len(paths), desc="Scoring", unit="image", disable=not progress)
        for path, image, output, reason in score_image_files(pipe, paths, batch_size, params, chunk_size):
            bar.update(1)
            if output is None:
                report.skipped.append(SkippedFile(path, reason))
                continue
            index = len(report.rows)
            row = {
                "path": path,
                "score": float(output["score"]),  # unrounded: the decision is made on this value
                "is_anomalous": bool(output["is_anomalous"]),
                "max_pixel_score": round(float(output["anomaly_map"].max()), 6),
                "anomalous_pixel_fraction": round(float(at_or_above(output["anomaly_map"], decision).mean()), 6),
                "overlay": "",
            }
            row.update({name: float(output[name]) for name in FEW_SHOT_COLUMNS if name in output})
            if write_overlays:
                row["overlay"] = os.path.join("overlays", _output_name(index, path, ".png"))
                save_decision_figure(
                    path_inside(staging, row["overlay"]),
                    _display_rgb(image),
                    output["anomaly_map"],
                    score=output["score"],
                    image_threshold=image_decision,
                    pixel_threshold=decision,
                    name=os.path.join(*_last_parts(path)),
                    color_scale=color_scale,
                )
            if save_maps:
                np.save(
                    path_inside(staging, os.path.join("maps", _output_name(index, path, ".npy"))),
                    output["anomaly_map"],
                )
            report.rows.append(row)
        bar.close()
        _write_tables(staging, report, model, threshold, decision)
        if report_html:
            from ..reporting.run_report import write_report_for_predictions

            write_report_for_predictions(staging, notice=notice, progress=progress)
    return report


def _display_rgb(image: Any) -> np.ndarray:
    """The image as the figure shows it: RGB uint8, converted as the processor converts it (16-bit, float...)."""
    from ..models.crane.image_processing_crane import image_to_rgb_array

    rgb = image_to_rgb_array(image)
    return rgb if rgb.dtype == np.uint8 else (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def prediction_protections(inputs: list[str], model_source: str | None) -> list[tuple[str, str]]:
    """The folders an output of `predict` (or `calibrate`) may not be or contain: the inputs and the model folder."""
    return [*protected_paths("an input", inputs), *protected_paths("the model folder", [model_source])]


def _write_tables(
    folder: str, report: PredictionReport, model: Any, threshold: float | None, pixel_threshold: float
) -> None:
    from ..model_loading import computation_summary

    buffer = io.StringIO()
    few_shot = getattr(model, "reference_memory", None) is not None
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS + (FEW_SHOT_COLUMNS if few_shot else ()))
    writer.writeheader()
    writer.writerows(report.rows)
    with open(os.path.join(folder, "predictions.csv"), "w", encoding="utf-8", newline="") as stream:
        stream.write(buffer.getvalue())
    summary = {
        "model": getattr(model.config, "preset", None) or model.config.name_or_path or None,
        "computation": computation_summary(model),
        "image_threshold": model.config.image_threshold if threshold is None else threshold,
        "pixel_threshold": pixel_threshold,
        "reference_memory": model.reference_memory.describe() if few_shot else None,
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
    parser.add_argument("--model", default="crane+/mvtec", help="preset name, model folder, Hub id or exported folder")
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
    parser.add_argument(
        "--color-scale",
        choices=["absolute", "image"],
        default="absolute",
        help="heatmap colours: absolute 0-1 scores (comparable across images; default) or stretched to each image",
    )
    parser.add_argument("--report", action="store_true", help="also write report.html to review the run in a browser")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_computation_arguments(parser)
    add_reference_arguments(parser, " (default: the model folder's reference_memory.safetensors, if any)")


def run(args: argparse.Namespace) -> int:
    from ..model_loading import check_device, load_model

    try:  # every argument, the device and the output are checked before the model is loaded
        require_positive("--batch-size", args.batch_size)
        require_range("--threshold", args.threshold, 0.0, 1.0)
        require_range("--pixel-threshold", args.pixel_threshold, 0.0, 1.0)
        check_device(args.model, args.device)
        protected = [
            *prediction_protections(args.inputs, args.model),
            *protected_paths("a backbone", [args.clip, args.dino]),
            *protected_paths("a reference", args.reference or []),
        ]
        check_output_dir(args.output, args.overwrite, protected)
        reference = check_reference(args.reference, exclude=[args.output])
        model, processor = load_model(
            args.model,
            clip=args.clip,
            dino=args.dino,
            allow_backbone_mismatch=args.allow_backbone_mismatch,
            device=args.device,
            dtype=args.dtype,
            **computation_overrides(args),
        )
        if reference is not None:  # before any image is scored: a memory of another model is refused here
            load_reference_memory(model, processor, reference)
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
            report_html=args.report,
            color_scale=args.color_scale,
        )
    except (OSError, TypeError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    anomalous = sum(row["is_anomalous"] for row in report.rows)
    print(f"Scored {len(report.rows)} images ({anomalous} anomalous); results in {report.output_dir}")
    if args.report:
        print(f"Report: {os.path.join(os.path.abspath(report.output_dir), 'report.html')}")
    for folder in report.left_out:
        print(f"note: left out {folder} (a crane-hf output folder, never read as input)", file=sys.stderr)
    for item in report.skipped:
        print(f"skipped {item.path}: {item.reason}", file=sys.stderr)
    return 3 if report.skipped else 0
