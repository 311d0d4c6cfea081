"""Finding and reading image files for batch commands: unreadable files are reported, never fatal."""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

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


def read_image(path: str, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image; raises `ValueError` naming the file and the problem.

    Images with more than `max_pixels` pixels (default: PIL's decompression-bomb limit, about 89 megapixels) are
    refused from their header, before anything is decoded.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if limit and width * height > limit:
                    raise ValueError(
                        f"{path}: refused, {width} x {height} = {width * height:,} pixels exceeds the limit of "
                        f"{limit:,} (a possible decompression bomb)"
                    )
                image.load()
                return image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"{path}: refused, too many pixels to decode safely ({error})") from error
    except UnidentifiedImageError as error:
        raise ValueError(f"{path}: not a readable image file") from error
    except ValueError as error:
        if str(error).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: could not be decoded ({error})") from error
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path}: could not be decoded ({error})") from error
