"""`report.html`: one self-contained page to review a run of `crane-hf predict` or `crane-hf evaluate`.

The page opens from disk in any browser, offline (no CDN, no external script or style sheet): the images sorted by
score, each with a small thumbnail of its decision figure linking to the full figure and to the image, filters by
verdict, class (and for evaluate, ground truth and wrong decisions), the score histogram with the image threshold,
and for evaluate the per-class metric table and each class's image-level ROC and precision-recall curves with the
F1-max operating point. Charts are inline SVG (data URIs); thumbnails are small JPEG files in `report_files/`
referenced relatively and loaded lazily, so a run of 10,000 images stays a page of a few megabytes.

The report is built from the predictions table (a list of rows, or a folder's `predictions.json`) and the figure
paths in it, so it does not depend on how the rows were produced.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from PIL import Image

from .decision_figure import _check_unit, decision_digits, display_rgb

REPORT_FILE = "report.html"
ASSETS_FOLDER = "report_files"
THUMBNAIL_WIDTH = 480  # pixels; a decision figure is about 1100 wide
THUMBNAIL_QUALITY = 80
# Folders of the MVTec-AD / VisA / generic layouts that come right after the class folder.
SPLIT_FOLDERS = ("train", "test", "validation", "val", "ground_truth")


def image_class(path: str) -> str:
    """The class of an image from its path: the folder before the split folder in the MVTec-AD / VisA / generic
    layouts (`.../coins/test/scratch/000.png` -> "coins"), else the image's folder name ("" for a bare file name)."""
    parts = [part for part in os.path.normpath(path).replace("\\", "/").split("/") if part not in ("", ".")]
    folders = parts[:-1]
    for index in range(len(folders) - 1, 0, -1):
        if folders[index].lower() in SPLIT_FOLDERS:
            return folders[index - 1]
    return folders[-1] if folders else ""


def _number(row: Mapping[str, Any], key: str, position: int, optional: bool = False) -> float | None:
    value = row.get(key)
    if value in (None, "") and optional:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"predictions row {position} ({row.get('path')!r}): {key}={value!r} is not a number."
        ) from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"predictions row {position} ({row.get('path')!r}): {key}={number} is not in [0, 1].")
    return number


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def _relative_link(target: str, folder: str) -> str:
    """A link usable from `folder/report.html`: relative when possible, else a file URI; percent-encoded, so that a
    file name holding `#`, `?`, `%` or `:` (read by a browser as fragment, query, escape or scheme) still names it."""
    from pathlib import Path
    from urllib.parse import quote

    target_path = Path(target if os.path.isabs(target) else os.path.join(folder, target)).resolve()
    try:
        return quote(Path(os.path.relpath(target_path, Path(folder).resolve())).as_posix(), safe="/")
    except ValueError:  # another drive on Windows
        return target_path.as_uri()


def _thumbnail(source: str, destination: str) -> tuple[int, int]:
    """Write a JPEG thumbnail THUMBNAIL_WIDTH wide (or smaller) of `source`; returns its (width, height). The image
    is shown as the pipeline read it (`display_rgb`: upright, 16-bit images scaled rather than clipped to white)."""
    with Image.open(source) as image:
        # reduced before it is converted (a large JPEG is even decoded at a reduced size), either way up; Pillow
        # resizes 16-bit images as 32-bit ("I"), which display_rgb scales as it scales "I;16"
        image = image.convert("I") if image.mode.startswith("I;16") else image
        image.thumbnail((THUMBNAIL_WIDTH * 4, THUMBNAIL_WIDTH * 4), Image.Resampling.LANCZOS)
        rgb = Image.fromarray(display_rgb(image))
    rgb.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH * 4), Image.Resampling.LANCZOS)
    rgb.save(destination, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return rgb.size


def _prepare_rows(
    folder: str,
    rows: Sequence[Mapping[str, Any]],
    image_threshold: float,
    progress: Callable | None,
    write_to: str | None = None,
) -> list[dict[str, Any]]:
    thumbnails = os.path.join(write_to or folder, ASSETS_FOLDER, "thumbnails")
    os.makedirs(thumbnails, exist_ok=True)
    prepared = []
    for position, row in enumerate(rows):
        score = _number(row, "score", position)
        anomalous = _flag(row["is_anomalous"]) if "is_anomalous" in row else score >= image_threshold
        label = row.get("label")
        truth = None if label in (None, "") else ("anomalous" if int(label) else "normal")
        path = str(row.get("path") or row.get("image_path") or "")
        figure = str(row.get("overlay") or "")
        figure_path = os.path.join(folder, figure) if figure and not os.path.isabs(figure) else figure
        item = {
            "path": path,
            "name": str(row.get("name") or path),
            "score": score,
            "score_text": f"{score:.{decision_digits(score, image_threshold, 4)}f}",  # never written = the threshold
            "verdict": "anomalous" if anomalous else "ok",
            "class_name": str(row.get("class_name") or image_class(path)),
            "truth": truth,
            "pixel_fraction": _number(row, "anomalous_pixel_fraction", position, optional=True),
            "figure_link": _relative_link(figure_path, folder) if figure else None,
            # a relative input path is relative to the working folder, not to the report's folder
            "image_link": _relative_link(os.path.abspath(path), folder) if path and os.path.exists(path) else None,
            "thumbnail": None,
        }
        source = figure_path if figure and os.path.isfile(figure_path) else path
        if source and os.path.isfile(source):
            name = f"{position:06d}.jpg"
            try:
                item["thumbnail_width"], item["thumbnail_height"] = _thumbnail(source, os.path.join(thumbnails, name))
                item["thumbnail"] = f"{ASSETS_FOLDER}/thumbnails/{name}"
            except (OSError, ValueError, Image.DecompressionBombError):
                pass  # the card still lists the image, its score and its links
        item["link"] = item["figure_link"] or item["image_link"] or item["thumbnail"]
        prepared.append(item)
        if progress is not None:
            progress(1)
    _shorten_names(prepared, rows)
    prepared.sort(key=lambda item: -item["score"])
    return prepared


def _shorten_names(prepared: list[dict[str, Any]], rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows without a `name` are named by their path below the folder all the images share."""
    unnamed = [item for item, row in zip(prepared, rows) if not row.get("name") and item["path"]]
    try:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(item["path"])) for item in unnamed])
    except ValueError:  # no paths, or paths on different drives
        return
    for item in unnamed:
        item["name"] = os.path.relpath(os.path.abspath(item["path"]), root).replace(os.sep, "/")


def write_run_report(
    folder: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    image_threshold: float,
    pixel_threshold: float,
    title: str,
    kind: str = "predict",
    model: str | None = None,
    notice: str | None = None,
    metrics: Mapping[str, Mapping[str, float | None]] | None = None,
    metric_columns: Sequence[tuple[str, str]] = (),
    skipped: Iterable[Mapping[str, Any]] = (),
    progress: bool = False,
    write_to: str | None = None,
) -> str:
    """Write `folder/report.html` and its thumbnails (`folder/report_files/`); returns the report's path.

    Args:
        folder: the run's output folder; relative `overlay` paths are relative to it.
        rows: one mapping per scored image with `path` (or `image_path`), `score` in [0, 1] and optionally
            `is_anomalous` (default: score >= image_threshold), `overlay` (the decision figure), `class_name`
            (default: from the path, `image_class`), `label` (ground truth, 0/1, evaluate),
            `anomalous_pixel_fraction`. Values may be strings, as read from a CSV.
        image_threshold, pixel_threshold: the thresholds of the run, shown and drawn on the histogram.
        title, kind ("predict" / "evaluate"), model, notice: page title, generator, model name, a highlighted note.
        metrics: per-class rows of metric values in [0, 1] (and "mean"), with `metric_columns` (key, label) pairs;
            with labels in `rows`, each class also gets its ROC and precision-recall curves.
        skipped: mappings with `path` and `reason`, listed at the end.
        progress: show a tqdm bar over the thumbnails.
        write_to: write report.html and report_files/ into this folder instead (links are still those of a report
            in `folder`, where they are to be moved: a report built under a temporary name, then renamed).

    Raises:
        ValueError: a threshold, score or pixel fraction that is not a number in [0, 1] (naming it, and for a row the
            row and the file); nothing is written then.
    """
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from tqdm.auto import tqdm

    from .charts import roc_pr_curves, score_histogram, svg_data_uri

    image_threshold = _check_unit("image_threshold", image_threshold)  # score >= NaN would make every image "ok"
    pixel_threshold = _check_unit("pixel_threshold", pixel_threshold)
    bar = tqdm(total=len(rows), desc="Report", unit="image", disable=not progress)
    prepared = _prepare_rows(folder, rows, image_threshold, bar.update, write_to)
    bar.close()
    has_labels = any(item["truth"] for item in prepared)
    if has_labels:
        groups = {
            "normal": [i["score"] for i in prepared if i["truth"] == "normal"],
            "anomalous": [i["score"] for i in prepared if i["truth"] == "anomalous"],
        }
        histogram_title = "image scores by ground truth"
    else:
        groups = {
            "OK": [i["score"] for i in prepared if i["verdict"] == "ok"],
            "ANOMALOUS": [i["score"] for i in prepared if i["verdict"] == "anomalous"],
        }
        histogram_title = "image scores by verdict"
    classes = sorted({item["class_name"] for item in prepared if item["class_name"]})
    curves = []
    if metrics is not None and has_labels:
        for name in (n for n in metrics if n != "mean"):
            members = [i for i in prepared if i["class_name"] == name and i["truth"]]
            try:
                figure, point = roc_pr_curves(
                    [i["truth"] == "anomalous" for i in members], [i["score"] for i in members], name
                )
                curves.append({"name": name, "uri": svg_data_uri(figure), "point": point})
            except ValueError as error:
                curves.append({"name": name, "uri": None, "reason": str(error)})
    environment = Environment(
        loader=FileSystemLoader(os.path.dirname(os.path.abspath(__file__))), autoescape=select_autoescape(["j2"])
    )
    html = environment.get_template("report.html.j2").render(
        title=title,
        kind=kind,
        model=model,
        notice=notice,
        rows=prepared,
        anomalous=sum(item["verdict"] == "anomalous" for item in prepared),
        image_threshold=float(image_threshold),
        pixel_threshold=float(pixel_threshold),
        classes=classes,
        has_labels=has_labels,
        histogram=svg_data_uri(score_histogram(groups, float(image_threshold), histogram_title)),
        metrics=metrics,
        metric_columns=list(metric_columns),
        curves=curves,
        skipped=list(skipped),
    )
    path = os.path.join(write_to or folder, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(html)
    return path


def write_report_for_predictions(folder: str, notice: str | None = None, progress: bool = False) -> str:
    """`write_run_report` for a folder written by `crane-hf predict` (its `predictions.json`)."""
    source = os.path.join(folder, "predictions.json")
    try:
        with open(source, encoding="utf-8") as stream:
            summary = json.load(stream)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{source}: cannot read the predictions ({error}).") from error
    for key in ("predictions", "image_threshold", "pixel_threshold"):
        if key not in summary:
            raise ValueError(f"{source}: no {key!r} field; is this a crane-hf predict folder?")
    return write_predictions_report(
        folder, summary["predictions"], summary, summary.get("skipped", []), notice=notice, progress=progress
    )


def write_predictions_report(
    folder: str,
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    skipped: Iterable[Mapping[str, str]] = (),
    notice: str | None = None,
    progress: bool = False,
    write_to: str | None = None,
) -> str:
    """`write_run_report` for the `rows` of a `crane-hf predict` run (path, score, is_anomalous, overlay...) and
    the head of its predictions.json (`summary`: model, image_threshold, pixel_threshold); returns the page's path.
    `write_to`: as in `write_run_report`."""
    model = summary.get("model")
    return write_run_report(
        folder,
        rows,
        image_threshold=summary["image_threshold"],
        pixel_threshold=summary["pixel_threshold"],
        title=f"crane-hf predict: {len(rows)} images" + (f", model {model}" if model else ""),
        model=model,
        notice=notice,
        skipped=list(skipped),
        progress=progress,
        write_to=write_to,
    )
