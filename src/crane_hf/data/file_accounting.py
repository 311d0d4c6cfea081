"""Every file under a class folder is either used or reported with the reason, so that nothing vanishes silently.

For the folder layouts (MVTec-AD, generic; `layouts.py`), after the records of a split are built, the files under
each class that no record uses are listed:

- in `<class>/<split>/`: files outside a defect folder, files in subfolders of a defect folder (images must lie
  directly in `<class>/<split>/<defect>/`), and files whose extension is not an image type;
- in `<class>/<ground_truth>/`: masks that match no image (name rule: the mask of `<stem>.<ext>` is
  `<stem><suffix>.<image ext>`), masks of an image that uses another mask, several masks with one name (which one
  is meant cannot be told), masks of a defect type with no image folder or of normal images, files in subfolders;
- files lying directly in `<class>/`, and files in other folders of `<class>/` (e.g. masks kept in
  `<class>/masks/<defect>/`: only `<class>/<ground_truth>/` holds masks).

Hidden files and folders (names starting with ".") are not data and are ignored. meta.json and VisA's CSV are
explicit indexes: the files they do not list are not reported (their folders often hold other files on purpose);
a mask they give to a normal entry is reported (`masks_of_normal_entries`).
Unused files are reported with one `UnusedFileWarning` each, or refused together with `strict=True`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence

from .records import IMAGE_EXTENSIONS, AnomalyRecord, DatasetLayoutError, is_image_file

SPLIT_FOLDERS = ("train", "test")  # the split folders of a class (`layouts.SPLITS`), each searched on its own


class UnusedFileWarning(UserWarning):
    """A file under a class folder that no record uses; `path` is the file, `reason` why it is not used."""

    def __init__(self, message: str, path: str, reason: str):
        super().__init__(message)
        self.path = path
        self.reason = reason


def _visible_files(folder: str) -> list[str]:
    """Every non-hidden file under `folder` (recursively, not through hidden folders), sorted, as paths."""
    found = []
    for current, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found.extend(os.path.join(current, name) for name in sorted(files) if not name.startswith("."))
    return found


def _relative(root: str, path: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _extension_reason(name: str) -> str:
    extension = os.path.splitext(name)[1] or "(none)"
    return f"not a supported image type (extension {extension}; images are {', '.join(IMAGE_EXTENSIONS)})"


def _placement_reason(parts: list[str], kind: str) -> str | None:
    """Why the file `<class>/<folder>/.../<name>` (split in `parts`) cannot be one of the `kind` ("images",
    "masks") of a defect folder, or None when it can."""
    if len(parts) == 3:
        return f"not inside a defect folder ({kind} go in {parts[0]}/{parts[1]}/<defect>/)"
    if len(parts) > 4:
        return f"in a subfolder of {'/'.join(parts[:3])}/; {kind} must lie directly in the defect folder"
    if not is_image_file(parts[-1]):
        return _extension_reason(parts[-1])
    return None


def _split_folder_leftovers(root: str, class_name: str, split: str, used: set[str]) -> list[tuple[str, str]]:
    leftovers = []
    for path in _visible_files(os.path.join(root, class_name, split)):
        relative = _relative(root, path)
        if relative not in used:  # every image file directly in a defect folder is a record
            leftovers.append((relative, _placement_reason(relative.split("/"), "images") or "not used"))
    return leftovers


def _mask_folder_leftovers(
    root: str,
    class_name: str,
    ground_truth: str,
    records: Sequence[AnomalyRecord],
    normal_names: Sequence[str],
    mask_suffixes: Sequence[str],
) -> list[tuple[str, str]]:
    used = {r.mask_path for r in records if r.mask_path}
    images = {}  # (defect, image stem) -> record, anomalous images of any split
    for record in records:
        if record.label == 1:
            images.setdefault((record.defect_type, os.path.splitext(os.path.basename(record.image_path))[0]), record)
    defects = {r.defect_type for r in records}
    normal = {name.lower() for name in normal_names}

    def why_unmatched(path: str, parts: list[str]) -> str:
        defect, stem = parts[2], os.path.splitext(parts[-1])[0]
        if defect.lower() in normal:
            return f"a mask of the normal images' folder {defect!r}: normal images have no mask"
        if defect not in defects:
            return f"no image folder {class_name}/<split>/{defect}/ for this defect type"
        if Counter(os.path.splitext(other)[0] for other in os.listdir(os.path.dirname(path)))[stem] > 1:
            return f"several masks are named {stem}.* in {'/'.join(parts[:3])}/; which one is meant is unclear"
        owners = [
            images[(defect, stem.removesuffix(suffix))]
            for suffix in mask_suffixes
            if stem.endswith(suffix) and (defect, stem.removesuffix(suffix)) in images
        ]
        if owners and owners[0].mask_path:
            return f"its image {owners[0].image_path} uses the mask {owners[0].mask_path}"
        names = " or ".join(f"<image stem>{suffix}.<ext>" for suffix in mask_suffixes)
        return f"matches no image of {class_name}/<split>/{defect}/ (a mask is named {names})"

    leftovers = []
    for path in _visible_files(os.path.join(root, class_name, ground_truth)):
        relative = _relative(root, path)
        if relative not in used:
            parts = relative.split("/")
            leftovers.append((relative, _placement_reason(parts, "masks") or why_unmatched(path, parts)))
    return leftovers


def _outside_known_folders(root: str, class_name: str, ground_truth: str) -> list[tuple[str, str]]:
    """Files of `<class>/` outside its split folders and its ground-truth folder (e.g. masks kept in
    `<class>/masks/<defect>/`, images lying directly in `<class>/`): no layout rule reads them."""
    class_dir = os.path.join(root, class_name)
    leftovers = []
    for name in sorted(os.listdir(class_dir)):
        path = os.path.join(class_dir, name)
        if name.startswith(".") or name in SPLIT_FOLDERS or name == ground_truth:
            continue
        if os.path.isfile(path):
            leftovers.append((_relative(root, path), f"not inside a split folder ({class_name}/<split>/)"))
        elif os.path.isdir(path):
            reason = (
                f"in {class_name}/{name}/, which is neither a split folder ({class_name}/train/, {class_name}/test/) "
                f"nor the masks folder {class_name}/{ground_truth}/"
            )
            leftovers.extend((_relative(root, found), reason) for found in _visible_files(path))
    return leftovers


def unused_class_files(
    root: str,
    classes: Iterable[str],
    split: str,
    records: Sequence[AnomalyRecord],
    normal_names: Sequence[str] = ("good",),
    mask_suffixes: Sequence[str] = ("_mask", ""),
    ground_truth: str = "ground_truth",
) -> list[tuple[str, str]]:
    """(path relative to `root`, reason) of every file under the class folders that no record uses.

    Args:
        split: the split loaded: its folder is searched; the ground-truth folders are shared by all splits.
        records: the records of every split of these classes (masks used by another split are used).
    """
    used = {r.image_path for r in records} | {r.mask_path for r in records if r.mask_path}
    leftovers = []
    for class_name in classes:
        leftovers.extend(_outside_known_folders(root, class_name, ground_truth))
        leftovers.extend(_split_folder_leftovers(root, class_name, split, used))
        class_records = [r for r in records if r.class_name == class_name]
        leftovers.extend(
            _mask_folder_leftovers(root, class_name, ground_truth, class_records, normal_names, mask_suffixes)
        )
    return leftovers


def masks_of_normal_entries(
    root: str, records: Sequence[AnomalyRecord]
) -> tuple[list[AnomalyRecord], list[tuple[str, str]]]:
    """Records of an index (meta.json, VisA CSV) with the masks of normal entries taken off, and those masks as
    (path relative to `root`, reason) leftovers: a normal image has no anomalous pixel, so its mask is not used,
    and a user who gave one should hear so rather than have it dropped silently."""
    kept, leftovers = [], []
    for record in records:
        if record.label == 0 and record.mask_path:
            reason = f"the mask of a normal entry ({record.origin or record.image_path}): normal images have no mask"
            leftovers.append((record.mask_path, reason))
            record = dataclasses.replace(record, mask_path="")
        kept.append(record)
    return kept, leftovers


def report_unused_files(root: str, leftovers: Sequence[tuple[str, str]], strict: bool = False) -> None:
    """One `UnusedFileWarning` per unused file, or with `strict` a `DatasetLayoutError` listing them all."""
    if strict and leftovers:
        raise DatasetLayoutError(
            f"{root} (strict: every file under a class must be used)", [f"{path}: {why}" for path, why in leftovers]
        )
    for relative, reason in leftovers:
        path = os.path.normpath(os.path.join(root, relative))
        warnings.warn(UnusedFileWarning(f"{path}: not used: {reason}", path, reason), stacklevel=3)


__all__ = ["UnusedFileWarning", "masks_of_normal_entries", "report_unused_files", "unused_class_files"]
