"""`datasets` datasets as inputs of a batch prediction (`crane-hf predict --dataset`).

A dataset is named by Parquet files (a file, a folder holding them or a glob pattern), a folder written by
`save_to_disk`, or a Hub dataset id (downloaded to the `datasets` cache, whose Arrow files are memory-mapped: rows
are read as they are scored, not held in memory). Its image column is read undecoded and fingerprinted and decoded
as files are (`image_stream.DatasetSource`); rows are named by their `image_path` column where there is one.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from ..io.output_safety import protected_paths
from .sharded_prediction import (
    PredictionReport,
    ReportOptions,
    check_decision_arguments,
    check_run_arguments,
    run_prediction,
    run_settings,
)

SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk


def parquet_files(spec: str) -> list[str] | None:
    """The Parquet files `spec` names (a file, a folder holding them or a glob pattern), or None when `spec` is a
    `save_to_disk` folder or a Hub id; `ValueError` when it names Parquet files and none exists (checked before the
    model is loaded)."""
    if os.path.isdir(spec):
        if any(os.path.isfile(os.path.join(spec, name)) for name in SAVED_DATASET_FILES):
            return None
        files = sorted(glob.glob(os.path.join(glob.escape(spec), "**", "*.parquet"), recursive=True))
    elif spec.endswith(".parquet") or glob.has_magic(spec):
        files = sorted(glob.glob(spec, recursive=True))
    else:
        return None
    if not files:
        raise ValueError(f"--dataset {spec}: cannot be loaded (no Parquet files found)")
    return files


def load_image_dataset(spec: str, split: str) -> Any:
    """The `datasets.Dataset` named by `spec` (see the module docstring); `ValueError` naming it when it cannot be
    loaded."""
    import datasets

    files = parquet_files(spec)
    try:
        if files is not None:
            return datasets.load_dataset("parquet", data_files=files, split="train")
        if os.path.isdir(spec):
            loaded = datasets.load_from_disk(spec)
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(spec, split=split)
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetNotFoundError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"--dataset {spec}: cannot be loaded ({message})") from error


def predict_dataset(
    model: Any,
    processor: Any,
    spec: str,
    split: str,
    image_column: str,
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
    """`sharded_prediction.predict_images` for the rows of the dataset `spec` (split `split`, images in
    `image_column`): the same tables, with `path` the row's `image_path` or `SPEC[row]`."""
    from .image_stream import DatasetSource

    check_decision_arguments(model, threshold, pixel_threshold, color_scale)
    check_run_arguments(batch_size, workers, formats)
    protected = [
        *(protected or []),
        *protected_paths("the dataset", [spec]),
        *protected_paths("the model folder", [getattr(model, "name_or_path", None)]),
    ]

    def search() -> tuple[None, list, list]:
        DatasetSource(load_image_dataset(spec, split), image_column, spec)  # loaded (and cached) once, checked
        return None, [], []

    def make_source(_: None) -> DatasetSource:
        return DatasetSource(load_image_dataset(spec, split), image_column, spec)

    settings = {
        **run_settings(model, threshold, pixel_threshold, write_overlays, save_maps, formats, color_scale),
        "dataset": [spec, split, image_column],
    }
    return run_prediction(
        model, processor, search, output_dir, batch_size, threshold, pixel_threshold, write_overlays, save_maps,
        overwrite, progress, protected, resume, workers, formats, settings, make_source,
        ReportOptions(report_html, color_scale, notice),
    )  # fmt: skip


__all__ = ["SAVED_DATASET_FILES", "load_image_dataset", "parquet_files", "predict_dataset"]
