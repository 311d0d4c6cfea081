"""One annotated image of an anomaly-detection dataset, its checks, and the `datasets.Dataset` built from many.

Every loader of `crane_hf.data` (meta.json, MVTec-AD, VisA, the generic folder layout) produces `AnomalyRecord`s;
`validate_records` checks them against the files and `records_to_dataset` turns them into a `datasets.Dataset`
with the columns

    image        datasets.Image (the file path; decoded lazily on access)
    mask         datasets.Image or None (None for normal images and images without a mask)
    label        ClassLabel: 0 "normal", 1 "anomalous"
    class_name   str
    defect_type  str ("good" for normal images unless the dataset names it otherwise)
    image_path   str, the path relative to the dataset root (as in meta.json)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import datasets

from ..io.image_files import IMAGE_EXTENSIONS
from ..models.crane.image_processing_crane import LOSSY_MASK_FORMATS, LossyMaskWarning, mask_to_binary
from ..models.crane.image_reading import image_file_header, webp_is_lossy
from .mask_checks import full_size_mask_problem, mask_problem_warnings, shown_files

LABEL_NAMES = ["normal", "anomalous"]
MAX_REPORTED_PROBLEMS = 20

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "label": datasets.ClassLabel(names=LABEL_NAMES),
        "class_name": datasets.Value("string"),
        "defect_type": datasets.Value("string"),
        "image_path": datasets.Value("string"),
    }
)


class DatasetLayoutError(ValueError):
    """A dataset's files or annotations are inconsistent; the message lists each offending entry."""

    def __init__(self, what: str, problems: Sequence[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(f"{what}: {self.problems[0]}")
            return
        shown = self.problems[:MAX_REPORTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        lines = [f"{what}: {len(self.problems)} problem(s):", *(f"  - {p}" for p in shown)]
        if more:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines))


class UnknownSelectionError(ValueError, KeyError):
    """A split or class that the dataset does not have; the message names it and the available ones.

    A `ValueError` for command lines and a `KeyError` for code that looks names up."""

    __str__ = BaseException.__str__  # the message as written, not quoted like a KeyError's


@dataclass(frozen=True)
class AnomalyRecord:
    """One image of a dataset.

    Args:
        image_path: path of the image relative to the dataset root ("/" separators).
        mask_path: path of the ground-truth mask relative to the root, or "" when there is none.
        label: 0 normal, 1 anomalous.
        class_name: the object or texture class.
        defect_type: the defect folder / type ("good" for normal images).
        origin: where the record came from, for error messages (e.g. "meta.json test/bottle[3]").
        mask_expected: the layout has masks for this image's defect type (a ground-truth folder holding masks), so
            an anomalous image without one is a missing mask, not an image-level label.
    """

    image_path: str
    mask_path: str
    label: int
    class_name: str
    defect_type: str
    origin: str = ""
    mask_expected: bool = False

    def describe(self) -> str:
        where = self.origin or f"class {self.class_name!r}"
        return f"{where} (img_path={self.image_path!r}, mask_path={self.mask_path!r})"


def is_image_file(name: str) -> bool:
    """Whether a file name has one of the image extensions (case-insensitive) and is not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str) -> list[str]:
    """Sorted names of the image files directly in `folder` (empty when it does not exist)."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if is_image_file(name) and os.path.isfile(f"{folder}/{name}"))


def relative_to_root(root: str, path: str) -> str | None:
    """`path` (relative to `root`, or absolute) as a normalized path relative to `root`; None if it leaves root.

    A path leaves the root lexically ("..", absolute paths elsewhere) or through a symbolic link (a linked class
    folder or file whose real location is outside the root's real location); a root reached through a symbolic
    link is fine.
    """
    root = os.path.abspath(root)
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
    if not _is_inside(root, full) or not _is_inside(os.path.realpath(root), os.path.realpath(full)):
        return None
    return os.path.relpath(full, root).replace(os.sep, "/")


def _is_inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def record_problems(
    root: str, record: AnomalyRecord, check_files: bool = True, verify_images: bool = False
) -> list[str]:
    """Everything wrong with one record: bad label, paths that leave the root, missing or unreadable files (images
    over `Image.MAX_IMAGE_PIXELS` are refused from their header, never decoded), masks whose size differs from their
    image's. With `verify_images`, each image and mask is also decoded once, which finds truncated or corrupt data."""
    return _check_record(root, record, check_files, verify_images)[0]


def _check_record(
    root: str, record: AnomalyRecord, check_files: bool = True, verify_images: bool = False
) -> tuple[list[str], str, str | None]:
    """`record_problems`, the file format of the record's mask ("" when it has none or it was not read) and, with
    `verify_images`, an anomalous record's mask problem (`mask_checks.full_size_mask_problem`: empty or full)."""
    problems = []
    if record.label not in (0, 1):
        problems.append(f"{record.describe()}: field 'anomaly' must be 0 or 1, got {record.label!r}")
    paths = {"img_path": record.image_path, "mask_path": record.mask_path}
    for field, path in paths.items():
        if field == "mask_path" and not path:
            continue
        if not path:
            problems.append(f"{record.describe()}: field {field!r} is empty")
        elif relative_to_root(root, path) is None:
            problems.append(f"{record.describe()}: {field} {path!r} leaves the dataset root {os.path.abspath(root)}")
    if not problems and record.mask_path and _file_key(root, record.mask_path) == _file_key(root, record.image_path):
        problems.append(f"{record.describe()}: the mask is the image itself")
    if problems or not check_files:
        return problems, "", None
    sizes, mask_format = {}, ""
    for field, path in paths.items():
        if not path:
            continue
        full = os.path.join(root, path)
        kind = "image" if field == "img_path" else "mask"
        if not os.path.isfile(full):
            # a named pipe (reading it would block), a device, a folder or a link to nothing is not "not found"
            what = "is not a regular file (a named pipe, device, folder or link to nothing)"
            what = what if os.path.lexists(full) else "file not found"
            problems.append(f"{record.describe()}: {kind} {what}: {full}")
            continue
        try:
            sizes[field], file_format = image_file_header(full, verify=verify_images)
        except ValueError as error:
            problems.append(f"{record.describe()}: {kind} {error}")
            continue
        if field == "mask_path":
            mask_format = file_format
    if len(sizes) == 2 and sizes["img_path"] != sizes["mask_path"]:
        (iw, ih), (mw, mh) = sizes["img_path"], sizes["mask_path"]
        problems.append(f"{record.describe()}: mask is {mw}x{mh} but its image is {iw}x{ih}")
    mask_problem = None
    if verify_images and not problems and record.label == 1 and record.mask_path:
        full = os.path.join(root, record.mask_path)
        try:
            mask_problem = full_size_mask_problem(mask_to_binary(full, name=f"mask {full}"))
        except ValueError as error:  # e.g. a lossy mask whose values never pass mid-range
            problems.append(f"{record.describe()}: {error}")
    return problems, mask_format, mask_problem


def _file_key(root: str | None, path: str) -> str:
    """What identifies the file `path` names: its real path under `root` (relative and absolute spellings, "./",
    ".." and symbolic links resolved), or without a root its normalized spelling."""
    if root is None or not path:
        return os.path.normpath(path).replace(os.sep, "/") if path else ""
    return os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))


def duplicate_problems(splits: dict[str, Sequence[AnomalyRecord]], root: str | None = None) -> list[str]:
    """An image listed twice in one split, or listed in two splits with different labels or masks, named.

    With `root`, paths are compared as the files they reach under it (a relative path, an absolute path inside the
    root and a path through a symbolic link to the same file are one image); without, after normalization
    ("a/./b.png" is "a/b.png").
    """
    problems = []
    seen: dict[str, AnomalyRecord] = {}  # image file -> its first record in any split
    seen_in_split: dict[tuple[str, str], AnomalyRecord] = {}
    for split, records in splits.items():
        for record in records:
            key = _file_key(root, record.image_path)
            first = seen_in_split.get((split, key))
            if first is not None:
                labels = {first.label, record.label}
                what = "listed as normal and as anomalous" if len(labels) == 2 else "listed twice"
                problems.append(f"image {record.image_path!r} is {what}: {first.origin} and {record.origin}")
                continue
            seen_in_split[(split, key)] = record
            other = seen.setdefault(key, record)
            same_mask = _file_key(root, other.mask_path) == _file_key(root, record.mask_path)
            if other is not record and (other.label != record.label or not same_mask):
                problems.append(
                    f"image {record.image_path!r} has contradictory annotations: {other.origin} "
                    f"(anomaly {other.label}, mask {other.mask_path!r}) and {record.origin} (anomaly {record.label}, "
                    f"mask {record.mask_path!r})"
                )
    return problems


def _lossy_mask_file(path: str, file_format: str) -> bool:
    """Whether the mask file at `path` (of `file_format`, from its header) is stored lossily (JPEG, JPEG 2000,
    WebP with lossy VP8 data)."""
    if file_format == "WEBP":
        with open(path, "rb") as stream:
            return webp_is_lossy(stream)
    return file_format in LOSSY_MASK_FORMATS


class InvalidRecordWarning(UserWarning):
    """A dataset entry was left out (`skip_invalid=True`); the message names the entry and the problem.

    Attributes:
        image_path: the entry's image file (joined to the dataset root) or "" when the entry has none.
        reason: the problem, without the entry's description.
    """

    def __init__(self, message: str, image_path: str = "", reason: str = ""):
        super().__init__(message)
        self.image_path = image_path
        self.reason = reason or message


def validate_records(
    root: str,
    records: Iterable[AnomalyRecord],
    what: str,
    check_files: bool = True,
    require_masks: bool | None = False,
    skip_invalid: bool = False,
    verify_images: bool = False,
) -> list[AnomalyRecord]:
    """Check every record (see `record_problems`) and raise one `DatasetLayoutError` listing all problems.

    Args:
        require_masks: also refuse anomalous images without a mask (pixel-level training needs them). None: refuse
            them in the classes where other anomalous images have a mask (a segmentation dataset with missing
            masks, whose pixel metrics would count those images as all normal) and where the layout has masks for
            the image's defect type (`AnomalyRecord.mask_expected`), accept them elsewhere (image-level datasets).
        skip_invalid: instead of raising, leave the offending records out and issue one `InvalidRecordWarning`
            per problem (batch commands use this to finish on the good records and report the bad ones).
        verify_images: decode every image and mask once (finds truncated files; costs a full decode), instead of
            reading file headers only.

    Masks stored in a lossy format (JPEG, JPEG 2000, lossy WebP) are kept (they are binarised at mid-range when
    decoded) and named in one `LossyMaskWarning` (its `files` lists them all).
    """
    records = list(records)
    masked_classes = {r.class_name for r in records if r.label == 1 and r.mask_path}
    kept, problems, lossy = [], [], []
    suspicious: dict[str, list[str]] = {}  # mask problem -> mask files (verify_images only)
    for record in records:
        found, mask_format, mask_problem = _check_record(root, record, check_files, verify_images)
        expected = record.class_name in masked_classes or record.mask_expected
        required = expected if require_masks is None else require_masks
        if required and record.label == 1 and not record.mask_path:
            why = ""
            if require_masks is None and record.mask_expected:
                why = f" (no mask of that name in the ground-truth folder of defect {record.defect_type!r})"
            elif not require_masks:
                why = f" (other anomalous images of class {record.class_name!r} have masks)"
            found.append(f"{record.describe()}: anomalous image without a mask{why}")
        problems.extend((record, problem) for problem in found)
        if not found:
            kept.append(record)
            if record.label == 1 and _lossy_mask_file(os.path.join(root, record.mask_path), mask_format):
                lossy.append(os.path.normpath(os.path.join(root, record.mask_path)))
            if mask_problem:
                suspicious.setdefault(mask_problem, []).append(os.path.normpath(os.path.join(root, record.mask_path)))
    if problems and not skip_invalid:
        raise DatasetLayoutError(what, [problem for _, problem in problems])
    for record, problem in problems:
        image_path = os.path.normpath(os.path.join(root, record.image_path)) if record.image_path else ""
        reason = problem.removeprefix(f"{record.describe()}: ")
        warnings.warn(InvalidRecordWarning(problem, image_path, reason), stacklevel=2)
    for warning in mask_problem_warnings(suspicious, what):
        warnings.warn(warning, stacklevel=2)
    if lossy:
        shown = shown_files(lossy, MAX_REPORTED_PROBLEMS)
        warnings.warn(
            LossyMaskWarning(
                f"{what}: {len(lossy)} mask(s) are stored in a lossy format (JPEG, JPEG 2000, lossy WebP), whose "
                "compression noise would "
                f"grow the defects; they are binarised at mid-range (above 127 of 255): {shown}",
                lossy,
            ),
            stacklevel=2,
        )
    return kept


def records_to_dataset(root: str, records: Sequence[AnomalyRecord]) -> datasets.Dataset:
    """A `datasets.Dataset` (columns in the module docstring) whose image and mask columns hold absolute paths."""
    root = os.path.abspath(root)

    def absolute(path: str) -> str:
        return os.path.normpath(os.path.join(root, path))

    columns = {
        "image": [absolute(r.image_path) for r in records],
        "mask": [absolute(r.mask_path) if r.mask_path and r.label == 1 else None for r in records],
        "label": [int(r.label) for r in records],
        "class_name": [r.class_name for r in records],
        "defect_type": [r.defect_type for r in records],
        "image_path": [relative_to_root(root, r.image_path) for r in records],
    }
    return datasets.Dataset.from_dict(columns, features=FEATURES)


__all__ = [
    "FEATURES",
    "IMAGE_EXTENSIONS",
    "LABEL_NAMES",
    "AnomalyRecord",
    "DatasetLayoutError",
    "InvalidRecordWarning",
    "LossyMaskWarning",
    "UnknownSelectionError",
    "duplicate_problems",
    "is_image_file",
    "list_images",
    "records_to_dataset",
    "relative_to_root",
    "validate_records",
]
