"""Finding the image files a user named for a batch command: files, folders, glob patterns; inputs that match
nothing are reported, never fatal."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm")


@dataclass
class SkippedFile:
    path: str
    reason: str


def _images_in(folder: str) -> list[str]:
    return sorted(
        os.path.join(root, name)
        for root, _, files in os.walk(folder)
        for name in files
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )


def collect_image_paths(inputs: Iterable[str]) -> tuple[list[str], list[SkippedFile]]:
    """Expand files, folders (recursively, image extensions only) and glob patterns, in a stable order.

    Returns the image paths (each once) and the inputs that matched nothing.
    """
    paths: list[str] = []
    missing: list[SkippedFile] = []
    for entry in inputs:
        matches = [entry] if os.path.exists(entry) else sorted(glob.glob(entry, recursive=True))
        found = []
        for match in matches:
            found.extend(_images_in(match) if os.path.isdir(match) else [match] if os.path.isfile(match) else [])
        if not found:
            reason = (
                "folder holds no image files" if os.path.isdir(entry) else "no such file, folder or matching pattern"
            )
            missing.append(SkippedFile(entry, reason))
        paths.extend(found)
    unique = list(dict.fromkeys(os.path.normpath(p) for p in paths))
    return unique, missing
