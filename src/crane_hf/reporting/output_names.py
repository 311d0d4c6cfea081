"""File names of the figures and report entries of a scored image: they keep the image's class and extension.

`crane-hf predict` names each scored image's outputs from one output name (today `00003_coins_test_scratch_000.png`,
see `crane_hf.predict`); the figure is that name plus ".png", so `000.png` and `000.jpg` of one folder never share a
figure and the figure says which file it shows.
"""

from __future__ import annotations

import os
import re

# Folders of the MVTec-AD / VisA / generic layouts that come right after the class folder.
SPLIT_FOLDERS = ("train", "test", "validation", "val", "ground_truth")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def figure_file_name(output_name: str) -> str:
    """The decision figure's file name for an image whose output name is `output_name` (as predict gives it).

    Path separators and characters outside [A-Za-z0-9._-] become "_"; ".png" is appended (the image's own extension
    stays in the name). Raises `ValueError` for an empty name or one made only of dots.
    """
    safe = _UNSAFE.sub("_", output_name.replace("\\", "/").replace("/", "_")).strip("_")
    if not safe.strip("."):
        raise ValueError(f"cannot name a figure after the output name {output_name!r}.")
    return safe + ".png"


def image_class(path: str) -> str:
    """The class of an image from its path: the folder before the split folder in the MVTec-AD / VisA / generic
    layouts (`.../coins/test/scratch/000.png` -> "coins"), else the image's folder name ("" for a bare file name)."""
    parts = [part for part in os.path.normpath(path).replace("\\", "/").split("/") if part not in ("", ".")]
    folders = parts[:-1]
    for index in range(len(folders) - 1, 0, -1):
        if folders[index].lower() in SPLIT_FOLDERS:
            return folders[index - 1]
    return folders[-1] if folders else ""
