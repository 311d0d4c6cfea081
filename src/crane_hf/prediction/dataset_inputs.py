"""`datasets` datasets as inputs of a batch prediction (`crane-hf predict --dataset`).

A dataset is named by Parquet files (a file, a folder holding them or a glob pattern), a folder written by
`save_to_disk`, or a Hub dataset id (downloaded to the `datasets` cache, whose Arrow files are memory-mapped: rows
are read as they are scored, not held in memory). Parquet files make one split, train, unless a folder holds them
by split (data/train-*.parquet, data/test-*.parquet: `parquet_files`). Its image column is read undecoded and
fingerprinted and decoded as files are (`image_stream.DatasetSource`); rows are named by their `image_path` column
where there is one.
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


def parquet_files(spec: str, split: str = "train") -> list[str] | None:
    """The Parquet files of split `split` that `spec` names (a file, a folder holding them or a glob pattern), or
    None when `spec` is a `save_to_disk` folder or a Hub id. A folder laid out by split (data/train-*.parquet,
    data/test-*.parquet: the Hub's layout, as `datasets` infers it) gives the files of `split`; other Parquet files
    make one split, train. `ValueError`, one line naming the argument or file, when none exists, when the split is
    not there, when a file is not Parquet or when the files do not share one set of columns (checked before the
    model is loaded; only the files' footers are read)."""
    splits = None
    if os.path.isdir(spec):
        if any(os.path.isfile(os.path.join(spec, name)) for name in SAVED_DATASET_FILES):
            return None
        splits = _split_files(spec)
        if splits is not None and split not in splits:
            raise ValueError(f"--split {split}: {spec} holds the splits {', '.join(splits)}")
        files = splits[split] if splits is not None else _parquet_under(spec)
    elif spec.endswith(".parquet") or glob.has_magic(spec):
        files = sorted(glob.glob(spec, recursive=True))
    else:
        return None
    if not files:
        raise ValueError(f"--dataset {spec}: cannot be loaded (no Parquet files found)")
    if splits is None and split != "train":
        raise ValueError(f"--split {split}: the Parquet files of --dataset {spec} make one split, train")
    _check_one_schema(spec, files)
    return files


def _parquet_under(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(folder), "**", "*.parquet"), recursive=True))


def _split_files(folder: str) -> dict[str, list[str]] | None:
    """Split -> the Parquet files of the folder `folder` when its file names give splits (`datasets`' inference,
    as for a dataset on the Hub), else None."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(folder)
    except Exception:  # datasets finds no pattern (EmptyDatasetError and others): no split layout
        return None
    if list(patterns) == ["train"] and patterns["train"] == ["**"]:
        return None
    found = DataFilesDict.from_patterns(patterns, base_path=folder)
    splits = {str(name): sorted(f for f in files if f.endswith(".parquet")) for name, files in found.items()}
    splits = {name: files for name, files in splits.items() if files}
    return splits or None


def _check_one_schema(spec: str, files: list[str]) -> None:
    """`ValueError` naming the first file that is not Parquet or whose columns differ from the first file's."""
    import pyarrow.parquet as pq

    first = None
    for path in files:
        try:
            names = pq.read_schema(path).names
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            message = f"--dataset {spec}: {path} is not a readable Parquet file ({' '.join(str(error).split())})"
            raise ValueError(message) from error
        if first is None:
            first = (path, names)
        elif names != first[1]:
            raise ValueError(
                f"--dataset {spec}: {path} has the columns {', '.join(names)}, {first[0]} has "
                f"{', '.join(first[1])}; the files of one dataset must share their columns"
            )


def load_image_dataset(spec: str, split: str) -> Any:
    """The `datasets.Dataset` named by `spec` (see the module docstring); `ValueError` naming it when it cannot be
    loaded."""
    import datasets

    files = parquet_files(spec, split)
    try:
        if files is not None:
            return datasets.load_dataset("parquet", data_files=files, split="train")
        if os.path.isdir(spec):
            loaded = datasets.load_from_disk(spec)
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(spec, split=split)
    except (
        OSError,
        ValueError,
        KeyError,
        datasets.exceptions.DatasetNotFoundError,
        datasets.exceptions.DatasetGenerationError,
    ) as error:
        cause = error.__cause__ if isinstance(error, datasets.exceptions.DatasetGenerationError) else None
        lines = [line.strip() for line in str(cause or error).splitlines() if line.strip()]
        message = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
        raise ValueError(f"--dataset {spec}: cannot be loaded ({message or type(error).__name__})") from error


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
