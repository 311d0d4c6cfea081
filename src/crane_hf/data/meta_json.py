"""`meta.json`, the dataset index shared by Crane, AnomalyCLIP and AdaCLIP: reading, checking and writing it.

Format (paths relative to the dataset root)::

    {"train": {"<class>": [{"img_path": "...", "mask_path": "" or "...", "cls_name": "<class>",
                            "specie_name": "<defect type>", "anomaly": 0 or 1}, ...], ...},
     "test": {...}}

`train` and `test` are the usual splits; other split names are read the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

from ..io.atomic import atomic_write_text
from ..models.crane.json_reading import pairs_without_duplicates
from .file_accounting import masks_of_normal_entries, report_unused_files
from .records import (
    AnomalyRecord,
    DatasetLayoutError,
    UnknownSelectionError,
    duplicate_problems,
    records_to_dataset,
    validate_records,
)

META_FILENAME = "meta.json"
REQUIRED_FIELDS = {"img_path": str, "mask_path": str, "cls_name": str, "anomaly": int}


def _entry_problems(entry: object, origin: str, class_key: str) -> list[str]:
    if not isinstance(entry, Mapping):
        return [f"{origin}: entry must be an object, got {type(entry).__name__}"]
    problems = []
    for field, kind in REQUIRED_FIELDS.items():
        if field not in entry:
            if field == "mask_path":
                continue  # some writers leave it out for image-level datasets
            problems.append(f"{origin}: missing field {field!r}")
        elif not isinstance(entry[field], kind) or isinstance(entry[field], bool):
            problems.append(f"{origin}: field {field!r} must be {kind.__name__}, got {entry[field]!r}")
    if "specie_name" in entry and not isinstance(entry["specie_name"], str):
        problems.append(f"{origin}: field 'specie_name' must be str, got {entry['specie_name']!r}")
    if isinstance(entry.get("cls_name"), str) and entry["cls_name"] != class_key:
        problems.append(
            f"{origin}: field 'cls_name' is {entry['cls_name']!r} but the entry is listed under class {class_key!r}"
        )
    return problems


def parse_meta(meta: object, source: str, root: str | None = None) -> dict[str, list[AnomalyRecord]]:
    """Records per split from a parsed meta.json; raises `DatasetLayoutError` naming each malformed entry and each
    image listed twice (compared as files under `root` when given: see `duplicate_problems`)."""
    if not isinstance(meta, Mapping) or not meta:
        raise DatasetLayoutError(source, ["the top level must be a non-empty object {split: {class: [entries]}}"])
    problems: list[str] = []
    splits: dict[str, list[AnomalyRecord]] = {}
    for split, classes in meta.items():
        if not isinstance(classes, Mapping):
            problems.append(f"{source} split {split!r}: must map class names to lists of entries")
            continue
        records = splits.setdefault(split, [])
        for class_name, entries in classes.items():
            if not isinstance(entries, list):
                problems.append(f"{source} {split}/{class_name}: must be a list of entries")
                continue
            for index, entry in enumerate(entries):
                origin = f"{source} {split}/{class_name}[{index}]"
                entry_problems = _entry_problems(entry, origin, class_name)
                if entry_problems:
                    problems.extend(entry_problems)
                    continue
                label = int(entry["anomaly"])
                defect = entry.get("specie_name") or ("good" if label == 0 else "anomaly")
                records.append(
                    AnomalyRecord(entry["img_path"], entry.get("mask_path", ""), label, class_name, defect, origin)
                )
    problems.extend(duplicate_problems(splits, root))
    if problems:
        raise DatasetLayoutError(source, problems)
    return splits


def load_meta_file(meta_path: str) -> Any:
    """The parsed meta.json; `DatasetLayoutError` (one line each) for text that is not UTF-8 or not JSON, nesting
    too deep to parse, or keys repeated within an object."""
    with open(meta_path, "rb") as stream:
        raw = stream.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetLayoutError(meta_path, [f"not UTF-8 text ({error.reason} at byte {error.start})"]) from None
    duplicates: list[str] = []
    try:
        meta = json.loads(text, object_pairs_hook=pairs_without_duplicates(duplicates))
    except json.JSONDecodeError as error:
        raise DatasetLayoutError(meta_path, [f"not valid JSON: {error}"]) from None
    except RecursionError:
        raise DatasetLayoutError(meta_path, ["not a meta.json: nested too deeply to read"]) from None
    if duplicates:
        raise DatasetLayoutError(meta_path, duplicates)
    return meta


def read_meta_json(root: str, meta_path: str | None = None) -> dict[str, list[AnomalyRecord]]:
    """Records per split of `<root>/meta.json` (or `meta_path`), checked for structure but not against the files."""
    meta_path = meta_path or os.path.join(root, META_FILENAME)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"No meta.json at {meta_path}.")
    return parse_meta(load_meta_file(meta_path), meta_path, root)


def select_records(
    splits: Mapping[str, Sequence[AnomalyRecord]], split: str, classes: Sequence[str] | None, source: str
) -> list[AnomalyRecord]:
    """The records of one split, optionally of some classes only (in the order given); unknown names raise
    `UnknownSelectionError`."""
    if split not in splits:
        raise UnknownSelectionError(f"{source} has no split {split!r}; it has {', '.join(sorted(splits)) or 'none'}.")
    records = list(splits[split])
    if classes is None:
        return records
    known = list(dict.fromkeys(r.class_name for r in records))
    unknown = [name for name in classes if name not in known]
    if unknown:
        raise UnknownSelectionError(
            f"{source} split {split!r} has no class {', '.join(map(repr, unknown))}; it has {', '.join(known)}."
        )
    return [r for name in classes for r in records if r.class_name == name]


def load_meta_json(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    meta_path: str | None = None,
    check_files: bool = True,
    require_masks: bool | None = False,
    skip_invalid: bool = False,
    verify_images: bool = False,
    strict: bool = False,
) -> datasets.Dataset:
    """A dataset described by a meta.json, as a `datasets.Dataset` (columns: `crane_hf.data.records`).

    Args:
        root: the dataset root; meta.json paths are relative to it.
        split: "train", "test" or another split of the file. The zero-shot protocol trains on "test".
        classes: keep only these classes (default: all).
        meta_path: the index file, if not `<root>/meta.json`.
        check_files: check that every image and mask exists, lies inside the root and that masks have their
            image's size (reads file headers only).
        require_masks: refuse anomalous images without a mask (None: only in classes where other anomalous
            images have one, see `validate_records`).
        skip_invalid: leave offending entries out, with an `InvalidRecordWarning` each, instead of raising.
        verify_images: decode each image and mask once to find truncated or corrupt files (a full decode).
        strict: refuse offending entries even with `skip_invalid` (files meta.json does not list are not its own;
            see `file_accounting`).

    Raises:
        DatasetLayoutError: listing each offending entry (split, class, index, paths and the problem).
        UnknownSelectionError: an unknown split or class, naming the available ones.
    """
    meta_path = meta_path or os.path.join(root, META_FILENAME)
    records = select_records(read_meta_json(root, meta_path), split, classes, meta_path)
    records, normal_masks = masks_of_normal_entries(root, records)
    report_unused_files(root, normal_masks, strict)
    records = validate_records(
        root,
        records,
        meta_path,
        check_files=check_files,
        require_masks=require_masks,
        skip_invalid=skip_invalid and not strict,
        verify_images=verify_images,
    )
    return records_to_dataset(root, records)


def meta_from_records(splits: Mapping[str, Sequence[AnomalyRecord]]) -> dict[str, dict[str, list[dict]]]:
    """The meta.json structure of records per split (classes in first-seen order)."""
    meta: dict[str, dict[str, list[dict]]] = {}
    for split, records in splits.items():
        classes = meta.setdefault(split, {})
        for record in records:
            classes.setdefault(record.class_name, []).append(
                {
                    "img_path": record.image_path,
                    "mask_path": record.mask_path,
                    "cls_name": record.class_name,
                    "specie_name": record.defect_type,
                    "anomaly": int(record.label),
                }
            )
    return meta


def write_meta_json(
    root: str, splits: Mapping[str, Sequence[AnomalyRecord]], overwrite: bool = False, meta_path: str | None = None
) -> str:
    """Write records per split as `<root>/meta.json` (atomically; an existing file only with `overwrite`).

    Returns the path written.
    """
    meta_path = meta_path or os.path.join(root, META_FILENAME)
    atomic_write_text(meta_path, json.dumps(meta_from_records(splits), indent=4) + "\n", overwrite=overwrite)
    return meta_path


__all__ = [
    "META_FILENAME",
    "load_meta_json",
    "meta_from_records",
    "parse_meta",
    "read_meta_json",
    "select_records",
    "write_meta_json",
]
