"""Records of the medical datasets in their public folder layouts: HeadCT, BrainMRI, Br35H (image labels only) and
ISIC, CVC-ColonDB, CVC-ClinicDB, TN3K (every image shows a lesion; masks segment it).

Each `*_records(root)` returns records per split with paths relative to `root`; `meta_writers.py` checks them and
writes meta.json. Class names follow the zero-shot literature (AnomalyCLIP, AdaCLIP, Crane): "brain", "skin",
"colon", "thyroid". docs/data.md shows each layout.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence

from .records import AnomalyRecord, DatasetLayoutError, list_images

Splits = dict[str, list[AnomalyRecord]]


def _folder_labelled_records(
    root: str, folders: dict[str, int], class_name: str, prefix: str = ""
) -> list[AnomalyRecord]:
    """Image-level records: every image of `<prefix><folder>` gets that folder's label (0 normal, 1 anomalous)."""
    records = []
    for folder, label in folders.items():
        relative = f"{prefix}{folder}"
        for name in list_images(os.path.join(root, relative)):
            records.append(
                AnomalyRecord(
                    image_path=f"{relative}/{name}",
                    mask_path="",
                    label=label,
                    class_name=class_name,
                    defect_type=folder,
                    origin=f"{root}: {relative}/{name}",
                )
            )
    return records


def _paired_records(
    root: str, image_dir: str, mask_dir: str, class_name: str, mask_suffixes: Sequence[str] = ("",)
) -> list[AnomalyRecord]:
    """Lesion images of `image_dir`, each with the mask of the same stem (plus a suffix) in `mask_dir`.

    An image without a mask keeps mask_path "" so that the check names it.
    """
    masks = {os.path.splitext(n)[0].lower(): n for n in list_images(os.path.join(root, mask_dir))}
    records = []
    for name in list_images(os.path.join(root, image_dir)):
        stem = os.path.splitext(name)[0]
        mask = next((masks[(stem + s).lower()] for s in mask_suffixes if (stem + s).lower() in masks), None)
        records.append(
            AnomalyRecord(
                image_path=f"{image_dir}/{name}",
                mask_path=f"{mask_dir}/{mask}" if mask else "",
                label=1,
                class_name=class_name,
                defect_type="lesion",
                origin=f"{root}: {image_dir}/{name}",
            )
        )
    return records


def _first_existing(root: str, candidates: Sequence[str], what: str) -> str:
    for candidate in candidates:
        if os.path.isdir(os.path.join(root, candidate)):
            return candidate
    raise DatasetLayoutError(root, [f"no {what} folder (looked for {', '.join(map(repr, candidates))})"])


def headct_records(root: str) -> Splits:
    """Head CT - hemorrhage (Kaggle): `labels.csv` (columns id, hemorrhage) and `head_ct/head_ct/NNN.png`.

    Image `id` is the file whose stem is the id (zero-padded "000" or not); hemorrhage 1 is anomalous.
    """
    csv_path = os.path.join(root, "labels.csv")
    if not os.path.isfile(csv_path):
        raise DatasetLayoutError(root, ["no labels.csv (columns: id, hemorrhage)"])
    folder = _first_existing(root, ["head_ct/head_ct", "head_ct", "images", "."], "head_ct image")
    by_number = {}
    for name in list_images(os.path.join(root, folder)):
        stem = os.path.splitext(name)[0]
        if stem.isdigit():
            by_number[int(stem)] = name
    records, problems = [], []
    with open(csv_path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream, skipinitialspace=True)
        header = [name.strip() for name in reader.fieldnames or []]
        if not {"id", "hemorrhage"} <= set(header):
            raise DatasetLayoutError(csv_path, [f"expected columns id and hemorrhage, got {header}"])
        for line, row in enumerate(reader, start=2):
            row = {key.strip(): (value or "").strip() for key, value in row.items() if key}
            origin = f"{csv_path} line {line}"
            if not row["id"].isdigit() or row["hemorrhage"] not in ("0", "1"):
                problems.append(f"{origin}: id must be an integer and hemorrhage 0 or 1, got {row}")
                continue
            name = by_number.get(int(row["id"]))
            if name is None:
                problems.append(f"{origin}: no image {int(row['id']):03d}.png in {os.path.join(root, folder)}")
                continue
            label = int(row["hemorrhage"])
            path = name if folder == "." else f"{folder}/{name}"
            records.append(AnomalyRecord(path, "", label, "brain", "hemorrhage" if label else "good", origin))
    if problems:
        raise DatasetLayoutError(csv_path, problems)
    return {"test": records}


def brainmri_records(root: str) -> Splits:
    """Brain MRI Images for Brain Tumor Detection (Kaggle): `brain_tumor_dataset/{yes,no}/` (or `yes/`, `no/` at
    the top level); "yes" is anomalous (tumor)."""
    prefix = "brain_tumor_dataset/" if os.path.isdir(os.path.join(root, "brain_tumor_dataset")) else ""
    _first_existing(root, [f"{prefix}yes"], "yes")
    return {"test": _folder_labelled_records(root, {"no": 0, "yes": 1}, "brain", prefix)}


def br35h_records(root: str) -> Splits:
    """Br35H (Kaggle, Brain Tumor Detection 2020): `yes/` (tumor) and `no/`; the unlabelled `pred/` is skipped."""
    _first_existing(root, ["yes"], "yes")
    return {"test": _folder_labelled_records(root, {"no": 0, "yes": 1}, "brain")}


ISIC_SPLITS = {"training": "train", "validation": "validation", "test": "test"}


def isic_records(root: str) -> Splits:
    """ISIC lesion segmentation (2016 Part 1, 2017 Part 1, 2018 Task 1): image folders named like
    `ISBI2016_ISIC_Part1_Test_Data`, `ISIC-2017_Test_v2_Data` or `ISIC2018_Task1-2_Test_Input`, and mask folders
    with the same split word and "GroundTruth"; mask of `ISIC_0000003.jpg` is `ISIC_0000003_Segmentation.png`
    (or `_segmentation.png`). Superpixel files are skipped. Training/Validation/Test become train/validation/test.
    """
    folders = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
    splits: Splits = {}
    for folder in folders:
        lowered = folder.lower()
        split_word = next((w for w in ISIC_SPLITS if w in lowered), None)
        if split_word is None or "groundtruth" in lowered or not re.search(r"(data|input)$", lowered):
            continue
        ground_truth = [
            n
            for n in folders
            if "groundtruth" in n.lower() and split_word in n.lower() and not re.search(r"(part|task)[23]", n.lower())
        ]
        if not ground_truth:
            raise DatasetLayoutError(root, [f"{folder}: no {split_word} GroundTruth folder next to it"])
        records = _paired_records(root, folder, ground_truth[0], "skin", ("_segmentation", "_Segmentation"))
        splits.setdefault(ISIC_SPLITS[split_word], []).extend(
            r for r in records if not r.image_path.lower().endswith(("_superpixels.png", ".txt"))
        )
    if not splits:
        raise DatasetLayoutError(root, ["no ISIC image folders (e.g. ISBI2016_ISIC_Part1_Test_Data)"])
    return splits


def colondb_records(root: str) -> Splits:
    """CVC-ColonDB as distributed for polyp segmentation: `images/` and `masks/` with matching file names."""
    image_dir = _first_existing(root, ["images"], "images")
    return {"test": _paired_records(root, image_dir, _first_existing(root, ["masks"], "masks"), "colon")}


def clinicdb_records(root: str) -> Splits:
    """CVC-ClinicDB: `Original/` and `Ground Truth/` (TIFF; also under `PNG/` or `TIF/` in some copies), or
    `images/` and `masks/`; masks have the image's file name."""
    pairs = [("images", "masks"), ("Original", "Ground Truth"), ("PNG/Original", "PNG/Ground Truth")]
    pairs.append(("TIF/Original", "TIF/Ground Truth"))
    for image_dir, mask_dir in pairs:
        if os.path.isdir(os.path.join(root, image_dir)):
            return {"test": _paired_records(root, image_dir, _first_existing(root, [mask_dir], "mask"), "colon")}
    raise DatasetLayoutError(root, [f"no image folder (looked for {', '.join(p[0] for p in pairs)})"])


def tn3k_records(root: str) -> Splits:
    """TN3K thyroid nodules: `test-image/` + `test-mask/` (test) and `trainval-image/` + `trainval-mask/` (train),
    masks with the image's file name."""
    splits: Splits = {}
    for split, prefix in (("train", "trainval"), ("test", "test")):
        if os.path.isdir(os.path.join(root, f"{prefix}-image")):
            mask_dir = _first_existing(root, [f"{prefix}-mask"], f"{prefix}-mask")
            splits[split] = _paired_records(root, f"{prefix}-image", mask_dir, "thyroid")
    if not splits:
        raise DatasetLayoutError(root, ["no test-image or trainval-image folder"])
    return splits


__all__ = [
    "br35h_records",
    "brainmri_records",
    "clinicdb_records",
    "colondb_records",
    "headct_records",
    "isic_records",
    "tn3k_records",
]
