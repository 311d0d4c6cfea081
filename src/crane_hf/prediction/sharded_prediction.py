"""One batch prediction, on one process or split over the processes of `accelerate launch`, resumable.

    accelerate launch --multi_gpu --num_processes 4 -m crane_hf.predict /data/archive --model crane+/mvtec --output out
    crane-hf predict /data/archive --model crane+/mvtec --output out --num-processes 4     # the same, launched for you

The main process lists the inputs once and claims the output (checks, lock, the partial folder:
`io.atomic.resumable_output_dir`); `PartialState.split_between_processes` gives each process a contiguous share of the
positions, without padding or duplicates. Each process reads its images in DataLoader workers (`image_stream`), scores
them batch by batch on its device (pinned memory and non-blocking copies on CUDA) and appends one record per image to
its own shard, flushed per batch (`result_shards`); decision figures (`reporting.decision_figure`) and maps are written
by the process that scored the image, under a temporary name, renamed once the batch's records are on disk. When every
process has finished, the main process merges the shards in order of position into the tables, builds report.html from
the merged rows when asked (`reporting.run_report`) and publishes the output. The tables do not depend on the number of
processes: an image gives the same bits whatever else is in its batch (docs/architecture.md, "Bitwise
reproducibility"), and the rows are ordered by position in the input list.

With `resume`, positions whose image was already scored (same path, same SHA-256 of its bytes, its figure and map
in place) are not scored again; a killed run loses at most its batches in flight.

This module imports torch, accelerate and the model folder only when a run starts (`crane-hf predict --help` stays
fast: tests/test_startup.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

from ..io.atomic import naming_write_errors, resumable_output_dir
from ..io.image_files import SkippedFile, find_image_inputs
from ..io.output_names import MARKER_NAME, TEMP_TAG, path_inside, safe_file_name
from ..io.output_safety import (
    UnsafeOutputError,
    check_output_dir,
    claim_contents,
    claim_entries,
    content_record,
    file_signatures,
    matches_record,
    on_main_process,
    partial_dir,
    protected_paths,
)
from .result_shards import (
    CSV_COLUMNS,
    FEW_SHOT_COLUMNS,
    ROWS_FOLDER,
    TABLE_FORMATS,
    ShardWriter,
    done_fingerprints,
    merged_records,
    next_run,
    read_records,
    shard_paths,
    table_row,
    write_tables,
)

COMMAND = "predict"
TORN_SUFFIX = ".crane-hf-writing"  # an overlay or map being written (renamed when complete)
REPORT_STAGING = ".report.crane-hf-writing"  # report.html and report_files/ being written (renamed when complete)


@dataclass
class PredictionReport:
    """What a run did. Rows are not held in memory: `rows` reads them back from the output's predictions.csv."""

    scored: int = 0
    anomalous: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    output_dir: str | None = None
    left_out: list[str] = field(default_factory=list)  # crane-hf output folders not searched
    resumed: int = 0  # images whose results a resumed run kept
    main_process: bool = True

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows of predictions.csv (path, score, is_anomalous, ...), typed as in predictions.json."""
        import csv

        with open(os.path.join(self.output_dir, "predictions.csv"), encoding="utf-8", newline="") as stream:
            return [_typed_row(row) for row in csv.DictReader(stream)]


def _typed_row(row: dict[str, str]) -> dict[str, Any]:
    typed: dict[str, Any] = dict(row)
    for key in ("score", "max_pixel_score", "anomalous_pixel_fraction"):
        typed[key] = float(row[key])
    typed["is_anomalous"] = row["is_anomalous"] == "True"
    return typed


# Temporaries a predict run leaves in its partial folder when killed (a figure or map being written, the marker
# being rewritten, the JSON Lines table behind predictions.parquet, the report being built): crane-hf's by their
# names, which no user file takes by chance; they are removed or rewritten.
_OWN_TEMPORARIES = re.compile(
    rf"(?:overlays|maps)/\.\d{{5,}}_[^/]*\.(?:png|npy){re.escape(TORN_SUFFIX)}"
    r"|\.predictions\.jsonl\.tmp"
    rf"|{re.escape(MARKER_NAME + TEMP_TAG)}[^/]*"
    rf"|{re.escape(REPORT_STAGING)}/.+"
)


def owned_partial_files(folder: str) -> set[str]:
    """The files of the partial folder `folder` ("/"-separated relative paths) that predict runs show they wrote:
    shards every line of which is a prediction record (a torn last line allowed), figures and maps that hold the
    content a record of those shards gives for them (`output_safety.content_record`), and crane-hf's temporaries
    by name. (The tables and report of a run killed while publishing are listed with their content in the folder's
    marker.) A user's file under one of these names, or a shard edited by hand, is not among them."""
    owned: set[str] = set()
    written: dict[str, list[Any]] = {}
    for shard in shard_paths(folder):
        found: dict[str, list[Any]] = {}
        try:
            for record in read_records(shard):
                for name, content in (record.get("written") or {}).items():
                    found.setdefault(name, []).append(content)
        except (ValueError, OSError, AttributeError):
            continue
        owned.add(f"{ROWS_FOLDER}/{os.path.basename(shard)}")
        for name, contents in found.items():
            written.setdefault(name, []).extend(contents)
    for name, contents in written.items():
        path = os.path.join(folder, *name.split("/"))
        if any(matches_record(path, content) for content in contents):
            owned.add(name)
    for root, _, names in os.walk(folder):
        relative = os.path.relpath(root, folder).replace(os.sep, "/")
        for name in names:
            candidate = name if relative == "." else f"{relative}/{name}"
            if _OWN_TEMPORARIES.fullmatch(candidate):
                owned.add(candidate)
    return owned


def output_name(index: int, path: str, suffix: str) -> str:
    """A unique, readable file name: position in the input list, up to three parent folders (the class of the
    MVTec-AD layout) and the file name with its extension, e.g. 00003_coins_test_scratch_000.jpg.png; shortened
    safely when long (`io.output_names.safe_file_name`)."""
    return safe_file_name(f"{index:05d}_" + "_".join(last_parts(path)), suffix)


def last_parts(path: str) -> list[str]:
    """The file name and up to three folders above it: what a figure names its image by."""
    return os.path.normpath(os.path.abspath(path)).split(os.sep)[-4:]


def prediction_protections(inputs: list[str], model_source: str | None) -> list[tuple[str, str]]:
    """The folders an output of `predict` (or `calibrate`) may not be or contain: the inputs and the model folder."""
    return [*protected_paths("an input", inputs), *protected_paths("the model folder", [model_source])]


def model_fingerprint(model: Any) -> str:
    """SHA-256 of what decides a model's numbers besides its backbones' weights: its config (which names the
    backbones and the computation) and its learned prompts; for an exported folder (`export.runner`), its config
    and the bytes of every file in the folder (the graph holds backbones and prompts)."""
    from ..training.fingerprints import file_sha256, module_fingerprint

    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    learner = getattr(model, "prompt_learner", None)
    if learner is not None:
        digest.update(module_fingerprint([learner]).encode())
    else:  # an exported folder
        with os.scandir(model.folder) as entries:
            files = sorted(entry.name for entry in entries if entry.is_file(follow_symlinks=False))
        for name in files:
            digest.update(f"{name}\0{file_sha256(os.path.join(model.folder, name))}\n".encode())
    return digest.hexdigest()


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
    resume: bool = False,
    workers: int = 0,
    formats: tuple[str, ...] = ("csv", "json"),
    report_html: bool = False,
    color_scale: str = "absolute",
    notice: str | None = None,
) -> PredictionReport:
    """Score every image in `inputs` (files, folders, globs) and write the results to `output_dir`.

    Writes `predictions.csv` / `.json` / `.jsonl` / `.parquet` (`formats`; one row per scored image, in input
    order: path, score (float, unrounded: the decision is made on it), is_anomalous, max_pixel_score and
    anomalous_pixel_fraction (unrounded too), overlay (relative path or ""), sha256 of the file),
    `overlays/*.png` (decision figures: image | heatmap with colour bar | pixels at or above the pixel threshold,
    with name, verdict, score and thresholds; colours on the absolute [0, 1] scale or, with
    `color_scale="image"`, stretched to each map), optionally `maps/*.npy` (float32 smoothed maps), `skipped.txt`
    (unreadable inputs) and, with `report_html`, `report.html` and its thumbnails `report_files/` (with `notice`
    highlighted at its top), built from all the rows (a resumed run's too). Under `accelerate launch` the images
    are split over the processes (see the module docstring); every process must call this with the same arguments,
    and only the main process's report holds the totals. `workers` DataLoader processes read the images (0: the
    calling process).
    The output may not be or contain an input, the model folder or a `protected` (what, path) folder; it is left
    out of the inputs, as are other crane-hf output folders (`io.image_files.find_image_inputs`).
    Raises `ValueError` / `OSError` (one line, naming the argument, file or folder) before any image is scored,
    also when the model's thresholds that would decide were calibrated under another computation
    (`CraneConfig.check_thresholds`).
    """
    check_decision_arguments(model, threshold, pixel_threshold, color_scale)
    check_run_arguments(batch_size, workers, formats)
    protected = [*(protected or []), *prediction_protections(inputs, getattr(model, "name_or_path", None))]
    check_output_dir(output_dir, overwrite, protected)

    def search() -> tuple[list[str], list[SkippedFile], list[str]]:
        found = find_image_inputs(inputs, exclude=[output_dir, partial_dir(output_dir)])
        return found.paths, found.skipped, found.left_out

    from .image_stream import FileSource

    settings = run_settings(model, threshold, pixel_threshold, write_overlays, save_maps, formats, color_scale)
    return run_prediction(
        model, processor, search, output_dir, batch_size, threshold, pixel_threshold, write_overlays, save_maps,
        overwrite, progress, protected, resume, workers, formats, settings, FileSource,
        ReportOptions(report_html, color_scale, notice),
    )  # fmt: skip


@dataclass(frozen=True)
class ReportOptions:
    """How a run shows its results: `report_html` (build report.html), `color_scale` of the decision figures
    ("absolute" or "image") and `notice`, highlighted at the top of the report."""

    report_html: bool = False
    color_scale: str = "absolute"
    notice: str | None = None


def check_decision_arguments(
    model: Any, threshold: float | None, pixel_threshold: float | None, color_scale: str
) -> None:
    """Refuse, before any work, thresholds outside [0, 1], an unknown colour scale, and model thresholds that would
    decide although they were calibrated under another computation (`CraneConfig.check_thresholds`)."""
    from ..models.crane.thresholds import check_threshold
    from ..reporting.decision_figure import COLOR_SCALES

    for name, value in (("threshold", threshold), ("pixel_threshold", pixel_threshold)):
        if value is not None:
            check_threshold(value, name)
    if color_scale not in COLOR_SCALES:
        raise ValueError(f"color_scale must be one of {COLOR_SCALES}, got {color_scale!r}.")
    from ..models.crane.configuration_crane import threshold_context

    # thresholds hold for the memory and the dtype they were calibrated with
    model.config.check_thresholds(image=threshold is None, pixel=pixel_threshold is None, **threshold_context(model))


def check_run_arguments(batch_size: int, workers: int, formats: tuple[str, ...]) -> None:
    """Refuse a batch size under 1, a negative number of workers and unknown or no table formats."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be at least 1")
    if workers < 0:
        raise ValueError(f"workers {workers}: must be at least 0")
    unknown = [name for name in formats if name not in TABLE_FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats {','.join(formats)}: choose among {', '.join(TABLE_FORMATS)}")


def run_settings(
    model: Any,
    threshold: float | None,
    pixel_threshold: float | None,
    write_overlays: bool,
    save_maps: bool,
    formats: tuple[str, ...],
    color_scale: str = "absolute",
) -> dict[str, Any]:
    """What the results of a run depend on, stored with its partial results: a resumed run must match it."""
    from ..model_loading import computation_summary

    memory = getattr(model, "reference_memory", None)
    return {
        "model": model_fingerprint(model),
        "computation": computation_summary(model),
        "reference_memory": memory.identity if memory is not None else None,
        "dtype": str(model.dtype),
        "threshold": threshold,
        "pixel_threshold": pixel_threshold,
        "overlays": write_overlays,
        "maps": save_maps,
        "formats": sorted(formats),
        "color_scale": color_scale,
    }


def refuse_reference_inputs(source: Any, memory: Any) -> None:
    """Refuse (`ValueError` naming them) inputs of `source` that are images of the reference `memory`: the same file
    or the same bytes (`few_shot_options.reference_images_among`). Such an image matches itself in the memory and
    scores near 0, a "not anomalous" that says nothing; calibrate and evaluate leave them out, but a prediction run
    decides on every input it is given, so it fails closed instead: no image is scored.

    Reads every input once more (its SHA-256) before the run; only with a reference memory. A reference image in
    other bytes (the same decoded pixels, e.g. re-encoded) is known only once decoded: it is skipped then, with its
    reason (`ImageStream`, `SAME_PIXELS_REASON`).
    """
    from ..few_shot_options import reference_images_among

    found = reference_images_among(
        range(len(source)), memory, lambda index: f"sha256:{source.sha256(index)}", path=source.file
    )
    if found:
        names = [source.name(index) for index in found]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ValueError(
            f"{len(names)} of the inputs are reference images of the few-shot memory (the same files or the same "
            f"bytes): {shown}; each would match itself in the memory and pass as normal. Remove them from the inputs "
            "(or from --reference) and rerun."
        )


def run_prediction(
    model: Any,
    processor: Any,
    search: Any,
    output_dir: str,
    batch_size: int,
    threshold: float | None,
    pixel_threshold: float | None,
    write_overlays: bool,
    save_maps: bool,
    overwrite: bool,
    progress: bool,
    protected: list[tuple[str, str]],
    resume: bool,
    workers: int,
    formats: tuple[str, ...],
    settings: dict[str, Any],
    make_source: Any,
    show: ReportOptions = ReportOptions(),
) -> PredictionReport:
    """The run shared by file and dataset inputs: `search()` (main process only) gives (items, skipped inputs,
    left-out folders), `make_source(items)` the source (`image_stream`), `show` the figures' colour scale and the
    report."""
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from ..model_loading import make_pipeline
    from .image_stream import ImageStream, batches, image_loader

    state = PartialState(cpu=not torch.accelerator.is_available())  # no GPU: gloo processes on the CPU
    items, found_skipped, left_out = on_main_process(state, search)
    source = make_source(items)
    memory = getattr(model, "reference_memory", None)
    if memory is not None:  # before the output is claimed and any image scored
        on_main_process(state, lambda: refuse_reference_inputs(source, memory))
    pipe = make_pipeline(model, processor)
    params: dict[str, Any] = {}
    if threshold is not None:
        params["threshold"] = threshold
    if pixel_threshold is not None:
        params["pixel_threshold"] = pixel_threshold
    _, forward_params, postprocess_params = pipe._sanitize_parameters(**params)
    decision = model.config.pixel_threshold if pixel_threshold is None else pixel_threshold
    image_decision = model.config.image_threshold if threshold is None else threshold
    figures = FigureOptions(image_decision, decision, show.color_scale) if write_overlays else None
    report = PredictionReport(
        skipped=list(found_skipped), output_dir=output_dir, left_out=left_out, main_process=state.is_main_process
    )
    with contextlib.ExitStack() as claim:
        output = resumable_output_dir(
            output_dir, overwrite, protected, COMMAND, resume, settings, owned_by_run=owned_partial_files
        )
        folder, outcome = on_main_process(state, lambda: claim.enter_context(output))
        if state.is_main_process and outcome == "discarded":
            print(
                f"note: discarded the partial results of an interrupted run on {output_dir} (--resume keeps them)",
                file=sys.stderr,
            )
        run = on_main_process(state, lambda: _prepare_folder(folder, write_overlays, save_maps))
        with state.split_between_processes(list(range(len(source)))) as share:
            positions = range(share[0], share[-1] + 1) if share else range(0)
        done = done_fingerprints(folder, positions, source.name) if outcome == "resumed" else {}
        known = memory.known_fingerprints if memory is not None else frozenset()
        stream = ImageStream(source, positions, processor, pipe.dtype, write_overlays, done, known)
        loader = image_loader(stream, batch_size, workers, pin_memory=pipe.device.type == "cuda")
        writer = ShardWriter(folder, run, state.process_index)
        bar = tqdm(
            total=len(positions), desc="Scoring", unit="image", disable=not (progress and state.is_main_process)
        )
        try:
            for batch in batches(loader):
                kept = _score_batch(
                    pipe, batch, forward_params, postprocess_params, decision, folder, save_maps, figures
                )
                for record in kept:
                    writer.write(record)
                writer.flush()  # a killed run loses at most the batch in flight
                _publish_files(folder, kept)  # its figures and maps get their names once their records are on disk
                bar.update(len(batch["items"]))
        except BaseException:
            if state.is_main_process:
                print(
                    f"note: the results scored so far are kept in {folder}; rerun the same command with --resume "
                    "to finish them",
                    file=sys.stderr,
                )
            raise
        finally:
            bar.close()
            writer.close()
        state.wait_for_everyone()
        if not state.is_main_process:
            return report
        summary = {
            "model": getattr(model.config, "preset", None) or model.config.name_or_path or None,
            "computation": settings["computation"],
            "reference_memory": model.reference_memory.describe() if settings["reference_memory"] else None,
            "image_threshold": image_decision,
            "pixel_threshold": decision,
            "skipped": [{"path": item.path, "reason": item.reason} for item in found_skipped],
            "left_out": left_out,
        }
        tally = {"earlier_runs": 0}
        records = _final_records(folder, len(source), source.name, run, tally)
        rows: list[dict[str, Any]] = []  # for the report only: it shows every row
        if show.report_html:
            records = _kept_rows(records, rows)
        report.scored, report.anomalous, skipped = write_tables(folder, records, summary, formats)
        tables = [f"predictions.{name}" for name in formats] + (["skipped.txt"] if skipped else [])
        claim_entries(folder, tables, COMMAND)  # with their content: a run killed from here on is taken up
        report.resumed = tally["earlier_runs"]
        report.skipped = [SkippedFile(item["path"], item["reason"]) for item in skipped]
        if show.report_html:
            _write_report(folder, rows, summary, skipped, show.notice, progress)
        shutil.rmtree(os.path.join(folder, ROWS_FOLDER))  # last: a run killed before is resumed from its records
    return report


def _write_report(
    folder: str, rows: list[dict[str, Any]], summary: dict[str, Any], skipped: list, notice: str | None, progress: bool
) -> None:
    """report.html and report_files/ of the partial folder `folder`, built under `REPORT_STAGING` (crane-hf's
    temporary by its name), listed with their content in the folder's marker, then renamed: a run killed at any
    point leaves no file of the report that a resumed run would have to refuse as not crane-hf's."""
    from ..reporting.run_report import ASSETS_FOLDER, REPORT_FILE, write_predictions_report

    staging = os.path.join(folder, REPORT_STAGING)
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's
    os.makedirs(staging)
    write_predictions_report(folder, rows, summary, skipped, notice=notice, progress=progress, write_to=staging)
    names = [
        REPORT_FILE,
        *(f"{ASSETS_FOLDER}/{name}" for name in file_signatures(os.path.join(staging, ASSETS_FOLDER))),
    ]
    claim_contents(folder, {name: content_record(os.path.join(staging, *name.split("/"))) for name in names}, COMMAND)
    for name in (ASSETS_FOLDER, REPORT_FILE):  # a report of a run killed after it got its names: listed, replaced
        target = os.path.join(folder, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        with contextlib.suppress(FileNotFoundError):
            os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


def _kept_rows(records: Any, rows: list[dict[str, Any]]) -> Any:
    """`records`, unchanged, appending the table row of each scored one to `rows`."""
    for record in records:
        if "skipped" not in record:
            rows.append(table_row(record))
        yield record


@dataclass(frozen=True)
class FigureOptions:
    """What a decision figure states and how it is coloured: the thresholds that decide and the colour scale."""

    image_threshold: float
    pixel_threshold: float
    color_scale: str


def _prepare_folder(folder: str, write_overlays: bool, save_maps: bool) -> int:
    """Make the folders of overlays and maps, remove files that a killed run left half-written or not yet named
    (temporary names of `_write_staged`), and return the number of this run."""
    for name, wanted in (("overlays", write_overlays), ("maps", save_maps)):
        subfolder = os.path.join(folder, name)
        if wanted:
            os.makedirs(subfolder, exist_ok=True)
        if os.path.isdir(subfolder):
            with os.scandir(subfolder) as entries:
                for entry in entries:
                    if entry.name.startswith(".") and entry.name.endswith(TORN_SUFFIX) and entry.is_file():
                        os.remove(entry.path)
    return next_run(folder)


def _final_records(folder: str, count: int, name: Any, run: int, tally: dict[str, int]):
    """The latest record of every position, in order; files of superseded records that the latest one does not
    name (an overlay of an image now skipped, or scored under another name) are removed from the partial folder, as
    are those of positions beyond `count` (an earlier run's, whose input list was longer). Counts the records of
    earlier runs in `tally["earlier_runs"]`."""
    expected = 0
    for record, superseded in merged_records(folder):
        index = record["index"]
        if index >= count:  # no longer listed: its files are no result of this run
            group = [*superseded, record]
            for old in group:
                for key in ("overlay", "map"):
                    if old.get(key):
                        _remove_own_file(folder, old[key], group)
            continue
        if index != expected or record["path"] != name(index):
            raise RuntimeError(f"the partial results in {folder} do not cover position {expected}")  # a bug
        expected += 1
        tally["earlier_runs"] += record["run"] != run and "skipped" not in record
        keep = {record.get("overlay"), record.get("map")} if "skipped" not in record else set()
        group = [*superseded, record]
        for old in group:
            for key in ("overlay", "map"):
                if old.get(key) and old[key] not in keep:
                    _remove_own_file(folder, old[key], group)
        yield record
    if expected != count:
        raise RuntimeError(f"the partial results in {folder} hold {expected} of {count} positions")  # a bug


def _remove_own_file(folder: str, relative: str, records: list[dict[str, Any]]) -> None:
    """Remove the figure or map `relative` of the partial folder if it holds what one of `records` wrote there;
    `UnsafeOutputError` naming it if it holds anything else (a file put there under its name)."""
    target = path_inside(folder, relative)
    if not os.path.lexists(target):
        return
    name = relative.replace(os.sep, "/")
    if not any(matches_record(target, (record.get("written") or {}).get(name)) for record in records):
        raise UnsafeOutputError(
            f"refusing to remove {target}: it is not the file crane-hf wrote under that name; move it away and "
            "rerun with --resume."
        )
    os.remove(target)


def _score_batch(
    pipe: Any,
    batch: dict[str, Any],
    forward_params: dict[str, Any],
    postprocess_params: dict[str, Any],
    decision: float,
    folder: str,
    save_maps: bool,
    figures: FigureOptions | None,
) -> list[dict[str, Any]]:
    """The records of one batch: scored rows (decision figures, with `figures`, and maps written), skipped images
    with the reason; images a resumed run already holds give no record."""
    import numpy as np

    from ..models.crane.thresholds import at_or_above
    from ..reporting.decision_figure import save_decision_figure

    scored = [item for item in batch["items"] if item.status == "scored"]
    outputs = _pipeline_outputs(pipe, batch, scored, forward_params, postprocess_params) if scored else {}
    records = []
    for item in batch["items"]:
        record: dict[str, Any] = {"index": item.index, "path": item.path, "sha256": item.sha256}
        if item.status == "done":
            continue
        output = outputs.get(item.index)
        if item.status == "skipped" or isinstance(output, BaseException):
            reason = item.reason if item.status == "skipped" else f"could not be scored ({output})"
            records.append({**record, "skipped": reason})
            continue
        anomaly_map = output["anomaly_map"]
        record.update(
            score=float(output["score"]),  # unrounded: the decision is made on this value
            is_anomalous=bool(output["is_anomalous"]),
            max_pixel_score=float(anomaly_map.max()),  # unrounded, like the score
            anomalous_pixel_fraction=float(at_or_above(anomaly_map, decision).mean()),
            overlay="",
        )
        record.update({name: float(output[name]) for name in FEW_SHOT_COLUMNS if name in output})
        written: dict[str, Any] = {}
        if figures is not None:
            record["overlay"] = os.path.join("overlays", output_name(item.index, item.path, ".png"))
            written[record["overlay"]] = _write_staged(
                folder,
                record["overlay"],
                save_decision_figure,
                output["image"],
                anomaly_map,
                score=output["score"],
                image_threshold=figures.image_threshold,
                pixel_threshold=figures.pixel_threshold,
                name=os.path.join(*last_parts(item.path)),
                color_scale=figures.color_scale,
            )
        if save_maps:
            record["map"] = os.path.join("maps", output_name(item.index, item.path, ".npy"))
            written[record["map"]] = _write_staged(folder, record["map"], np.save, anomaly_map)
        if written:  # what this run wrote there (`owned_partial_files`)
            record["written"] = {name.replace(os.sep, "/"): content for name, content in written.items()}
        records.append(record)
    return records


def _pipeline_outputs(
    pipe: Any, batch: dict[str, Any], scored: list, forward_params: dict, postprocess_params: dict
) -> dict[int, Any]:
    """Position -> pipeline output (or the error) of the batch's images to score: one forward pass for the batch
    (inputs copied to the device without blocking; pinned on CUDA), or image by image when it fails, so that one
    bad input cannot sink its batch."""
    from ..models.crane.pipeline_zero_shot_anomaly_detection import MAP_KEYS, SCORE_KEYS

    pixel_values = batch["pixel_values"].to(pipe.device, non_blocking=True)
    try:
        forward = pipe.forward(
            {"pixel_values": pixel_values, "original_size": batch["original_size"]}, **forward_params
        )
        parts = [(forward, position) for position in range(len(scored))]
    except Exception as error:  # isolate the offending image below
        if type(error).__name__ == "OutOfMemoryError":
            raise
        parts = []
        for position in range(len(scored)):
            try:
                single = {
                    "pixel_values": pixel_values[position : position + 1],
                    "original_size": batch["original_size"][position : position + 1],
                }
                parts.append((pipe.forward(single, **forward_params), 0))
            except Exception as single_error:
                if type(single_error).__name__ == "OutOfMemoryError":
                    raise
                parts.append((single_error, 0))
    results: dict[int, Any] = {}
    for item, image, (forward, position) in zip(scored, batch["images"], parts):
        if isinstance(forward, BaseException):
            results[item.index] = forward
            continue
        # the image's scores and maps: with a reference memory (few-shot) both branches too, beside the fused ones
        one = {name: forward[name][position : position + 1] for name in SCORE_KEYS if name in forward}
        one.update({name: forward[name][position] for name in MAP_KEYS if name in forward})
        try:
            results[item.index] = pipe.postprocess(one, **postprocess_params)
            if image is not None:  # the decoded image (uint8 RGB) for its decision figure
                results[item.index]["image"] = image
        except ValueError as error:  # a non-finite score or map: never a decision
            results[item.index] = error
    return results


def _staging_path(folder: str, relative: str) -> tuple[str, str]:
    """(temporary name, final path) of the figure or map `relative` of the partial folder `folder`."""
    target = path_inside(folder, relative)
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}{TORN_SUFFIX}"), target


def _write_staged(folder: str, relative: str, write: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`write(stream, *args, **kwargs)` a figure or map of the partial folder under its temporary name (renamed by
    `_publish_files` once the image's record is on disk, so that a killed run never leaves a figure without its
    record, which would make the partial folder hold a file no record shows crane-hf wrote). Returns the file's
    `content_record`."""
    staging, target = _staging_path(folder, relative)
    with naming_write_errors(target), open(staging, "wb") as stream:  # a full disk names the file
        write(stream, *args, **kwargs)
    return content_record(staging)


def _publish_files(folder: str, records: list[dict[str, Any]]) -> None:
    """Give the figures and maps of `records` (written by `_write_staged`) their names. A run killed before
    leaves records whose files are missing: a resumed run scores those images again (`done_fingerprints`)."""
    for record in records:
        for name in record.get("written") or {}:
            os.replace(*_staging_path(folder, name))


__all__ = [
    "CSV_COLUMNS",
    "PredictionReport",
    "ReportOptions",
    "check_decision_arguments",
    "check_run_arguments",
    "last_parts",
    "model_fingerprint",
    "output_name",
    "predict_images",
    "prediction_protections",
    "run_prediction",
    "run_settings",
]
