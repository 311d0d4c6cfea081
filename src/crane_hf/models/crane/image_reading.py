"""Finding and reading image files for batch commands: unreadable files are reported, never fatal."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

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
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such image file")
    return _decode(path, path, max_pixels)


def read_image_bytes(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """`read_image` for an encoded image held in memory; `name` (e.g. a dataset row) stands for the file in errors."""
    return _decode(io.BytesIO(data), name, max_pixels)


def read_encoded_image(value: Mapping[str, Any], max_pixels: int | None = None) -> Image.Image:
    """Decode an undecoded `datasets.Image` value (`{"path": ..., "bytes": ...}`) as `read_image` does."""
    if value.get("bytes"):
        return read_image_bytes(value["bytes"], value.get("path") or "image bytes", max_pixels)
    if value.get("path"):
        return read_image(value["path"], max_pixels)
    raise ValueError("image value holds neither bytes nor a file path")


def image_file_size(path: str, max_pixels: int | None = None, verify: bool = False) -> tuple[int, int]:
    """(width, height) of an image file from its header, refused as in `read_image` when it has too many pixels.

    With `verify`, the pixels are also decoded once (and dropped), so that truncated or corrupt data is found too;
    otherwise nothing is decoded. Raises `ValueError` naming the file and the problem.
    """
    with _image_errors(path), _open_guarded(path, path, max_pixels) as image:
        if verify:
            image.load()
        return image.size


def _decode(source: str | IO[bytes], name: str, max_pixels: int | None) -> Image.Image:
    with _image_errors(name), _open_guarded(source, name, max_pixels) as image:
        image.load()
        return image.copy()


def _open_guarded(source: str | IO[bytes], name: str, max_pixels: int | None) -> Image.Image:
    """The opened (not decoded) image; `ValueError` when its header claims more than `max_pixels` pixels."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    image = Image.open(source)
    width, height = image.size
    if limit and width * height > limit:
        image.close()
        raise ValueError(
            f"{name}: refused, {width} x {height} = {width * height:,} pixels exceeds the limit of {limit:,} "
            "(a possible decompression bomb)"
        )
    return image


@contextlib.contextmanager
def _image_errors(name: str) -> Iterator[None]:
    """Turn PIL's errors (and its decompression-bomb warning) into `ValueError`s that start with `name`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"{name}: refused, too many pixels to decode safely ({error})") from error
    except UnidentifiedImageError as error:
        raise ValueError(f"{name}: not a readable image file") from error
    except ValueError as error:
        if str(error).startswith(f"{name}: "):
            raise
        raise ValueError(f"{name}: could not be decoded ({error})") from error
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{name}: could not be decoded ({error})") from error
