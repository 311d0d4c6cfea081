"""Reading image files and encoded images with a decompression-bomb guard; every problem is a `ValueError` that
names the file (the pipeline, the commands and the dataset loaders all read images through here)."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import IO, Any

from PIL import Image, UnidentifiedImageError


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
