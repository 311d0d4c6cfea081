"""Records of the industrial datasets in their public folder layouts: MPDD, BTAD, KSDD, DAGM and DTD-Synthetic.

Each `*_records(root)` returns records per split with paths relative to `root` (the folder the archive was
extracted to); `meta_writers.py` checks them and writes meta.json. docs/data.md shows each layout.
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from .layouts import scan_class_folders
from .records import AnomalyRecord, DatasetLayoutError, list_images

Splits = dict[str, list[AnomalyRecord]]
KSDD_CLASS = "electrical commutators"


def mpdd_records(root: str) -> Splits:
    """MPDD: MVTec-AD's layout (`<class>/{train,test}/<defect>`, masks `ground_truth/<defect>/<stem>_mask.png`)."""
    return scan_class_folders(root, normal_names=("good",), mask_suffixes=("_mask", ""))


def btad_records(root: str) -> Splits:
    """BTAD (BTech_Dataset_transformed): classes 01, 02, 03; normal images in `ok`, defective in `ko`; masks in
    `ground_truth/ko/` with the image's stem (.png or .bmp)."""
    return scan_class_folders(root, normal_names=("ok",), mask_suffixes=("", "_mask"))


def dtd_records(root: str) -> Splits:
    """DTD-Synthetic: `<texture>/train/good`, `<texture>/test/{good,bad}`, masks `ground_truth/bad/<stem>.png`."""
    return scan_class_folders(root, normal_names=("good",), mask_suffixes=("", "_mask"))


def _mask_is_empty(path: str) -> bool:
    with Image.open(path) as mask:
        return not np.asarray(mask.convert("L")).any()


def _labelled_folder_records(root: str, folder: str, suffix: str) -> tuple[list[AnomalyRecord], list[str]]:
    """Images of `folder` each beside a label image `<stem><suffix>.<ext>`; defective iff the label is not all
    zero. Returns the records and the images without a label."""
    names = list_images(os.path.join(root, folder))
    labels = {os.path.splitext(n)[0]: n for n in names if os.path.splitext(n)[0].endswith(suffix)}
    records, problems = [], []
    for name in names:
        stem = os.path.splitext(name)[0]
        if stem.endswith(suffix):
            continue
        label_name = labels.get(stem + suffix)
        if label_name is None:
            problems.append(f"{root}: {folder}/{name} has no label image {folder}/{stem}{suffix}.*")
            continue
        defective = not _mask_is_empty(os.path.join(root, folder, label_name))
        records.append(
            AnomalyRecord(
                image_path=f"{folder}/{name}",
                mask_path=f"{folder}/{label_name}" if defective else "",
                label=int(defective),
                class_name=KSDD_CLASS,
                defect_type="defect" if defective else "good",
                origin=f"{root}: {folder}/{name}",
            )
        )
    return records, problems


def _labelled_splits(root: str, folders: dict[str, str], suffix: str) -> Splits:
    """Records per split from label-image folders ({folder: split}); raises naming every image without a label."""
    splits: Splits = {}
    problems: list[str] = []
    for folder, split in folders.items():
        records, missing = _labelled_folder_records(root, folder, suffix)
        splits.setdefault(split, []).extend(records)
        problems.extend(missing)
    if problems:
        raise DatasetLayoutError(root, problems)
    return splits


def ksdd_records(root: str) -> Splits:
    """KolektorSDD (`kos01` .. `kos50` folders; all images in the test split) or KolektorSDD2 (`train`, `test`).

    Both mark every image with a label image; an all-zero label means a defect-free image.
    """
    part_folders = sorted(
        name for name in os.listdir(root) if re.fullmatch(r"kos\d+", name) and os.path.isdir(os.path.join(root, name))
    )
    if part_folders:  # KolektorSDD: kosNN/PartN.jpg with kosNN/PartN_label.bmp; no train split
        return _labelled_splits(root, dict.fromkeys(part_folders, "test"), "_label")
    ksdd2_splits = [split for split in ("train", "test") if os.path.isdir(os.path.join(root, split))]
    if ksdd2_splits:  # KolektorSDD2: <split>/<id>.png with <split>/<id>_GT.png
        return _labelled_splits(root, {split: split for split in ksdd2_splits}, "_GT")
    raise DatasetLayoutError(root, ["neither KolektorSDD (kos01 .. kos50 folders) nor KolektorSDD2 (train/, test/)"])


def dagm_records(root: str) -> Splits:
    """DAGM 2007: `ClassN/{Train,Test}/NNNN.PNG`; defective images have `ClassN/<split>/Label/NNNN_label.PNG`."""
    classes = sorted(
        (name for name in os.listdir(root) if re.fullmatch(r"Class\d+", name)), key=lambda n: int(n[len("Class") :])
    )
    if not classes:
        raise DatasetLayoutError(root, ["no Class1 .. Class10 folders"])
    splits: Splits = {}
    for class_name in classes:
        for split_folder in ("Train", "Test"):
            folder = os.path.join(root, class_name, split_folder)
            if not os.path.isdir(folder):
                continue
            labels = {os.path.splitext(n)[0]: n for n in list_images(os.path.join(folder, "Label"))}
            for name in list_images(folder):
                stem = os.path.splitext(name)[0]
                label_name = labels.get(f"{stem}_label")
                splits.setdefault(split_folder.lower(), []).append(
                    AnomalyRecord(
                        image_path=f"{class_name}/{split_folder}/{name}",
                        mask_path=f"{class_name}/{split_folder}/Label/{label_name}" if label_name else "",
                        label=int(label_name is not None),
                        class_name=class_name,
                        defect_type="defect" if label_name else "good",
                        origin=f"{root}: {class_name}/{split_folder}/{name}",
                    )
                )
    return splits


__all__ = ["btad_records", "dagm_records", "dtd_records", "ksdd_records", "mpdd_records"]
