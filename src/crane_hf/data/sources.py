"""Naming a dataset, its split and classes in one string (`--data ROOT[:SPLIT[:CLASS,CLASS...]]`), and opening it
whatever its layout.

The layout is detected from the root: a `meta.json` wins, then VisA's `split_csv/1cls.csv`, then class folders
(MVTec-AD / generic layout). The split defaults to "test": Crane's zero-shot protocol trains on the test split of
one dataset (MVTec-AD or VisA) and evaluates on the others.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import datasets

from .layouts import VISA_SPLIT_CSV, has_class_folders, load_class_folders, load_visa
from .meta_json import META_FILENAME, load_meta_json

LAYOUTS = ("meta.json", "visa", "folders")


@dataclass(frozen=True)
class DataSource:
    """A dataset root, one of its splits, and optionally some of its classes."""

    root: str
    split: str = "test"
    classes: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, spec: str) -> DataSource:
        """Parse "ROOT", "ROOT:SPLIT" or "ROOT:SPLIT:CLASS1,CLASS2" (a ROOT that exists as given is never split)."""
        if not spec:
            raise ValueError("Empty dataset name; expected ROOT[:SPLIT[:CLASS,CLASS...]].")
        for fields in range(3):
            parts = spec.rsplit(":", fields) if fields else [spec]
            if len(parts) == fields + 1 and os.path.isdir(parts[0]):
                root, split, classes = ([*parts, "", ""])[:3]
                names = tuple(name for name in classes.split(",") if name) or None
                repeated = sorted({name for name in names or () if names.count(name) > 1})
                if repeated:
                    raise ValueError(
                        f"--data {spec}: class {', '.join(map(repr, repeated))} named more than once; its images "
                        "would be scored and counted twice."
                    )
                return cls(root, split or "test", names)
        raise FileNotFoundError(f"No dataset folder in {spec!r}; expected ROOT[:SPLIT[:CLASS,CLASS...]].")

    def __str__(self) -> str:
        classes = f":{','.join(self.classes)}" if self.classes else ""
        return f"{self.root}:{self.split}{classes}"


def parse_sources(specs: Sequence[str]) -> list[DataSource]:
    """`DataSource.parse` of each spec; `ValueError` naming both specs when two of them reach the same images (the
    same root, by any spelling or link, and split, with the same or overlapping classes, "all" overlapping any):
    those images would be scored and counted twice."""
    sources = [DataSource.parse(spec) for spec in specs]
    for later, (spec, source) in enumerate(zip(specs, sources)):
        for earlier_spec, earlier in zip(specs[:later], sources[:later]):
            same_split = earlier.split == source.split
            if not same_split or os.path.realpath(earlier.root) != os.path.realpath(source.root):
                continue
            shared = (
                None
                if earlier.classes is None or source.classes is None
                else set(earlier.classes) & set(source.classes)
            )
            if shared is None or shared:
                which = "its images" if shared is None else f"class(es) {', '.join(sorted(shared))}"
                raise ValueError(
                    f"--data {earlier_spec} and {spec} name the same dataset split: {which} would be scored and "
                    "counted twice."
                )
    return sources


def detect_layout(root: str) -> str:
    """ "meta.json", "visa" or "folders"; raises `FileNotFoundError` when `root` holds none of them."""
    if os.path.isfile(os.path.join(root, META_FILENAME)):
        return "meta.json"
    if os.path.isfile(os.path.join(root, VISA_SPLIT_CSV)):
        return "visa"
    if os.path.isdir(root) and has_class_folders(root):
        return "folders"
    raise FileNotFoundError(
        f"{root} is not a dataset this package can read: no {META_FILENAME}, no {VISA_SPLIT_CSV}, and no "
        "<class>/train/good or <class>/test/<defect> image folders. For the datasets with their own layouts, write "
        "a meta.json first: python -m crane_hf.data.meta_writers <dataset> <root>."
    )


def load_anomaly_dataset(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    require_masks: bool | None = None,
    check_files: bool = True,
    skip_invalid: bool = False,
    verify_images: bool = False,
    strict: bool = False,
) -> datasets.Dataset:
    """Open a dataset whatever its layout (`detect_layout`) as a `datasets.Dataset` (columns:
    `crane_hf.data.records`). With `skip_invalid`, offending entries are left out with an `InvalidRecordWarning`
    each instead of raising. `require_masks` None (the default) refuses anomalous images without a mask in the
    classes where other anomalous images have one (see `validate_records`); VisA always requires masks.
    `verify_images` decodes every image and mask once (finds truncated files). Files under a class folder that are
    not used get an `UnusedFileWarning` each (`file_accounting`); `strict` refuses them and every offending entry
    instead (even with `skip_invalid`)."""
    layout = detect_layout(root)
    options = {
        "check_files": check_files,
        "skip_invalid": skip_invalid,
        "verify_images": verify_images,
        "strict": strict,
    }
    if layout == "meta.json":
        return load_meta_json(root, split, classes, require_masks=require_masks, **options)
    if layout == "visa":
        return load_visa(root, split, classes, **options)
    return load_class_folders(root, split, classes, require_masks=require_masks, **options)


def load_data_source(
    source: DataSource | str,
    require_masks: bool | None = None,
    skip_invalid: bool = False,
    verify_images: bool = False,
    strict: bool = False,
) -> datasets.Dataset:
    """`load_anomaly_dataset` for a `DataSource` or its string form."""
    source = DataSource.parse(source) if isinstance(source, str) else source
    return load_anomaly_dataset(
        source.root,
        source.split,
        source.classes,
        require_masks=require_masks,
        skip_invalid=skip_invalid,
        verify_images=verify_images,
        strict=strict,
    )


__all__ = ["LAYOUTS", "DataSource", "detect_layout", "load_anomaly_dataset", "load_data_source", "parse_sources"]
