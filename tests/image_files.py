"""Writing tiny image and mask files for miniature copies of dataset layouts."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def write_image(path: str, size: tuple[int, int] = (20, 16), value: int = 128, mode: str = "RGB") -> str:
    """A flat image of `size` (width, height) at `path` (format from the extension); returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    width, height = size
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)
    return path


def write_mask(path: str, size: tuple[int, int] = (20, 16), defect: bool = True) -> str:
    """A grayscale mask of `size` (width, height) with a 4 x 4 defect square unless `defect` is False."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    width, height = size
    array = np.zeros((height, width), dtype=np.uint8)
    if defect:
        array[2:6, 2:6] = 255
    Image.fromarray(array, mode="L").save(path)
    return path
