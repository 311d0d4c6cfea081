"""Datasets stored in folder layouts: MVTec-AD, VisA (its split CSV) and a generic layout for custom data.

MVTec-AD and the generic layout::

    <root>/<class>/train/good/*.png                 normal training images
    <root>/<class>/test/good/*.png                  normal test images
    <root>/<class>/test/<defect>/*.png              anomalous test images
    <root>/<class>/ground_truth/<defect>/<stem>_mask.png   their masks

MVTec-AD names every mask `<image stem>_mask.png`; the generic layout also accepts `<image stem>.<any image
extension>`, any image extension for the images, and anomalous images in the train split.

VisA: `<root>/split_csv/1cls.csv` with columns object, split, label (normal / anomaly), image, mask; paths
relative to the root (as distributed with the dataset).
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Sequence

import datasets

from .file_accounting import SPLIT_FOLDERS, masks_of_normal_entries, report_unused_files, unused_class_files
from .meta_json import select_records
from .records import (
    AnomalyRecord,
    DatasetLayoutError,
    UnknownSelectionError,
    duplicate_problems,
    list_images,
    records_to_dataset,
    validate_records,
)

SPLITS = SPLIT_FOLDERS
VISA_SPLIT_CSV = os.path.join("split_csv", "1cls.csv")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def find_class_folders(root: str, splits: Sequence[str] = SPLITS) -> list[str]:
    """Sorted names of the class folders of `root`: those holding a `train` or `test` folder."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Dataset root {root} does not exist or is not a folder.")
    return sorted(
        name
        for name in os.listdir(root)
        if not name.startswith(".") and any(os.path.isdir(os.path.join(root, name, split)) for split in splits)
    )


def _mask_index(folder: str) -> dict[str, str]:
    """Mask file stem -> file name, for the image files in `folder`; a stem shared by several files (000_mask.png
    and 000_mask.bmp) is left out: which of them is the mask cannot be told (`file_accounting` reports both)."""
    names = list_images(folder)
    stems = Counter(os.path.splitext(name)[0] for name in names)
    return {os.path.splitext(name)[0]: name for name in names if stems[os.path.splitext(name)[0]] == 1}


def scan_class_folders(
    root: str,
    classes: Sequence[str] | None = None,
    splits: Sequence[str] = SPLITS,
    normal_names: Sequence[str] = ("good",),
    mask_suffixes: Sequence[str] = ("_mask", ""),
    ground_truth: str = "ground_truth",
) -> dict[str, list[AnomalyRecord]]:
    """Records per split of a `<class>/<split>/<defect>/` layout; masks in `<class>/<ground_truth>/<defect>/`.

    Args:
        classes: class folders to read (default: every folder holding a train or test folder).
        normal_names: defect folder names that hold normal images ("good" for MVTec-AD, "ok" for BTAD).
        mask_suffixes: the mask of image `<stem>.<ext>` is `<stem><suffix>.<any image ext>`, suffixes tried in order.

    An anomalous image whose mask is not found gets mask_path "" (`validate_records(require_masks=True)`
    reports it; so does `require_masks=None` when its defect's ground-truth folder holds masks: `mask_expected`).
    """
    found = find_class_folders(root, splits)
    if not found and find_class_folders(root):
        present = [s for s in SPLITS if any(os.path.isdir(os.path.join(root, c, s)) for c in find_class_folders(root))]
        raise UnknownSelectionError(
            f"{root} has no split {', '.join(map(repr, splits))}; it has {', '.join(present)}."
        )
    classes = list(classes) if classes is not None else found
    unknown = [name for name in classes if name not in found]
    if unknown or not classes:
        expected = "<class>/train/good and <class>/test/<defect> folders"
        problem = f"no class folder {', '.join(map(repr, unknown))}" if unknown else "no class folders"
        raise DatasetLayoutError(str(root), [f"{problem} (expected {expected}); found {found or 'none'}"])
    normal = {name.lower() for name in normal_names}
    result: dict[str, list[AnomalyRecord]] = {split: [] for split in splits}
    for class_name in classes:
        for split in splits:
            split_dir = os.path.join(root, class_name, split)
            if not os.path.isdir(split_dir):
                continue
            for defect in sorted(os.listdir(split_dir)):
                defect_dir = os.path.join(split_dir, defect)
                if defect.startswith(".") or not os.path.isdir(defect_dir):
                    continue
                label = 0 if defect.lower() in normal else 1
                mask_dir = os.path.join(root, class_name, ground_truth, defect)
                masks = _mask_index(mask_dir) if label else {}
                has_masks = bool(label and list_images(mask_dir))
                for name in list_images(defect_dir):
                    stem = os.path.splitext(name)[0]
                    mask = next((masks[stem + s] for s in mask_suffixes if stem + s in masks), None)
                    result[split].append(
                        AnomalyRecord(
                            image_path=f"{class_name}/{split}/{defect}/{name}",
                            mask_path=f"{class_name}/{ground_truth}/{defect}/{mask}" if mask else "",
                            label=label,
                            class_name=class_name,
                            defect_type=defect,
                            origin=f"{root}: {class_name}/{split}/{defect}/{name}",
                            mask_expected=has_masks,
                        )
                    )
    return result


def load_class_folders(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    normal_names: Sequence[str] = ("good",),
    mask_suffixes: Sequence[str] = ("_mask", ""),
    require_masks: bool | None = True,
    check_files: bool = True,
    skip_invalid: bool = False,
    verify_images: bool = False,
    strict: bool = False,
) -> datasets.Dataset:
    """The generic layout (module docstring) as a `datasets.Dataset` (columns: `crane_hf.data.records`).

    Options as in `load_meta_json`. Every file under a class folder that is not used (outside a defect folder, in a
    subfolder of one, not an image type, a mask matching no image...) is reported with one
    `file_accounting.UnusedFileWarning` each, or, with `strict`, refused with the rest (`file_accounting`).

    Raises:
        DatasetLayoutError: no class folders, an anomalous image without a mask (unless `require_masks=False`),
            unreadable files or masks whose size differs from their image's, each named; with `strict`, also
            every unused file.
        UnknownSelectionError: no class folder has the split.
    """
    records = scan_class_folders(root, classes, (split,), normal_names, mask_suffixes)[split]
    class_names = list(classes) if classes is not None else find_class_folders(root, (split,))
    elsewhere = []  # records of the other splits: the ground-truth folders serve them too
    for other in SPLITS:
        having = [c for c in class_names if other != split and os.path.isdir(os.path.join(root, c, other))]
        if having:
            elsewhere.extend(scan_class_folders(root, having, (other,), normal_names, mask_suffixes)[other])
    leftovers = unused_class_files(root, class_names, split, records + elsewhere, normal_names, mask_suffixes)
    records = validate_records(
        root,
        records,
        str(root),
        check_files=check_files,
        require_masks=require_masks,
        skip_invalid=skip_invalid and not strict,
        verify_images=verify_images,
    )
    report_unused_files(root, leftovers, strict)
    return records_to_dataset(root, records)


def load_mvtec(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    check_files: bool = True,
    skip_invalid: bool = False,
    verify_images: bool = False,
    strict: bool = False,
) -> datasets.Dataset:
    """MVTec-AD (and datasets in its exact layout, e.g. MPDD) from its folders; masks named `<stem>_mask.png`."""
    return load_class_folders(
        root,
        split,
        classes,
        ("good",),
        ("_mask",),
        require_masks=True,
        check_files=check_files,
        skip_invalid=skip_invalid,
        verify_images=verify_images,
        strict=strict,
    )


def read_visa_csv(root: str, csv_path: str | None = None) -> dict[str, list[AnomalyRecord]]:
    """Records per split of VisA's split CSV (`split_csv/1cls.csv` by default)."""
    csv_path = csv_path or os.path.join(root, VISA_SPLIT_CSV)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"No VisA split file at {csv_path}.")
    with open(csv_path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [column for column in VISA_COLUMNS if column not in header]
        if missing:
            raise DatasetLayoutError(csv_path, [f"missing column(s) {', '.join(missing)} (header: {header})"])
        rows = [{key.strip(): (value or "").strip() for key, value in row.items() if key} for row in reader]
    problems = []
    splits: dict[str, list[AnomalyRecord]] = {}
    for line, row in enumerate(rows, start=2):
        origin = f"{csv_path} line {line}"
        if row["label"] not in ("normal", "anomaly"):
            problems.append(f"{origin}: field 'label' must be 'normal' or 'anomaly', got {row['label']!r}")
            continue
        label = int(row["label"] == "anomaly")
        splits.setdefault(row["split"], []).append(
            AnomalyRecord(
                image_path=row["image"],
                mask_path=row["mask"],  # a normal row's mask is reported by `load_visa`, not dropped
                label=label,
                class_name=row["object"],
                defect_type="anomaly" if label else "good",
                origin=origin,
            )
        )
    problems.extend(duplicate_problems(splits, root))
    if problems:
        raise DatasetLayoutError(csv_path, problems)
    return splits


def load_visa(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    csv_path: str | None = None,
    check_files: bool = True,
    skip_invalid: bool = False,
    verify_images: bool = False,
    strict: bool = False,
) -> datasets.Dataset:
    """VisA from its split CSV as a `datasets.Dataset` (columns: `crane_hf.data.records`); `strict` refuses
    offending entries even with `skip_invalid`."""
    csv_path = csv_path or os.path.join(root, VISA_SPLIT_CSV)
    records = select_records(read_visa_csv(root, csv_path), split, classes, csv_path)
    records, normal_masks = masks_of_normal_entries(root, records)
    report_unused_files(root, normal_masks, strict)
    records = validate_records(
        root,
        records,
        csv_path,
        check_files=check_files,
        require_masks=True,
        skip_invalid=skip_invalid and not strict,
        verify_images=verify_images,
    )
    return records_to_dataset(root, records)


def has_class_folders(root: str) -> bool:
    """Whether `root` looks like the MVTec-AD / generic layout (a class folder with train or test images)."""
    for name in find_class_folders(root):
        for split in SPLITS:
            split_dir = os.path.join(root, name, split)
            if os.path.isdir(split_dir) and any(
                list_images(os.path.join(split_dir, d)) for d in os.listdir(split_dir)
            ):
                return True
    return False


__all__ = [
    "VISA_SPLIT_CSV",
    "find_class_folders",
    "has_class_folders",
    "load_class_folders",
    "load_mvtec",
    "load_visa",
    "read_visa_csv",
    "scan_class_folders",
]
