"""Reading image files and encoded images with a decompression-bomb guard; every problem is a `ValueError` that
names the file (the pipeline, the commands and the dataset loaders all read images through here).

Every image file is read by one rule, whichever way it arrives (path, bytes, `datasets` value):

- images whose header claims more than the decompression-bomb limit are refused before decoding;
- multi-frame files (animated GIF/PNG/WebP, multi-page TIFF) are refused by name: scoring frame one of many would
  be a silent choice. MPO files (JPEG with attached thumbnails or views, as some cameras write) are read as their
  primary image, as every JPEG reader does;
- the EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), so a photo is scored upright, its mask is
  rotated with it, and the same picture gives the same map by path, bytes, URL (`read_image_url` decodes what it
  downloads with `read_image_bytes`) or PIL object (`CraneImageProcessor` applies it);
- the decoded image keeps its file `format` ("JPEG", "PNG", ...), so that a lossy mask can be recognised;
- URLs (`read_image_url`, with the standard library's HTTP client, so that the model folder needs nothing more) have
  a default timeout that also bounds the whole download, and a byte limit; only http(s) is spoken, and a redirect
  to any other scheme (ftp://, file://, data:) is refused.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import IO, Any

from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
# File formats whose first frame is the image itself, the other frames being attached thumbnails or views.
PRIMARY_FRAME_FORMATS = ("MPO",)


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


DEFAULT_URL_TIMEOUT = 10.0  # seconds without an answer before a URL is given up
DEFAULT_URL_MAX_BYTES = 64 * 2**20  # largest image body read from a URL


def read_image_url(
    url: str, timeout: float | None = None, max_bytes: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Download and decode an http(s) image as `read_image` decodes files (the same decompression-bomb guard, EXIF
    orientation and refusal of multi-frame images).

    `timeout` (default `DEFAULT_URL_TIMEOUT` seconds) bounds the connection, each read and the whole download;
    bodies over `max_bytes` (default `DEFAULT_URL_MAX_BYTES`) are refused, from Content-Length when the server
    sends it. Raises `ValueError` naming the URL and the problem.
    """
    import http.client
    import time
    import urllib.error
    import urllib.request

    timeout = DEFAULT_URL_TIMEOUT if timeout is None else float(timeout)
    max_bytes = DEFAULT_URL_MAX_BYTES if max_bytes is None else int(max_bytes)
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url}: only http:// and https:// URLs are read")
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "crane-hf"})
        with _http_only_opener(url).open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ValueError(f"{url}: refused, {int(declared):,} bytes exceeds the limit of {max_bytes:,} bytes")
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = response.read1(min(1 << 16, max_bytes + 1 - size))  # what has arrived: deadline checked
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ValueError(f"{url}: refused, the body exceeds the limit of {max_bytes:,} bytes")
    except urllib.error.HTTPError as error:
        raise ValueError(f"{url}: could not be downloaded (HTTP error {error.code}: {error.reason})") from error
    except TimeoutError as error:
        raise ValueError(f"{url}: no complete answer within {timeout:g} s") from error
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise ValueError(f"{url}: no complete answer within {timeout:g} s") from error
        raise ValueError(f"{url}: could not be downloaded ({error.reason})") from error
    except (OSError, http.client.HTTPException) as error:
        raise ValueError(f"{url}: could not be downloaded ({error})") from error
    return read_image_bytes(b"".join(chunks), url, max_pixels)


def _http_only_opener(url: str) -> Any:
    """A urllib opener that speaks http(s) only: no file://, ftp:// or data: handler, and a redirect to any other
    scheme is refused (`ValueError` naming `url` and the target), where urllib's default opener follows ftp://."""
    import urllib.parse
    import urllib.request

    class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
        def http_error_302(self, req, fp, code, msg, headers):
            location = headers.get("location") or headers.get("uri")
            target = urllib.parse.urljoin(req.full_url, location) if location else ""
            if target and urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
                raise ValueError(f"{url}: refused, it redirects to {target} (only http:// and https:// are followed)")
            return super().http_error_302(req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        HttpOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def read_encoded_image(value: Mapping[str, Any], max_pixels: int | None = None) -> Image.Image:
    """Decode an undecoded `datasets.Image` value (`{"path": ..., "bytes": ...}`) as `read_image` does."""
    if value.get("bytes"):
        return read_image_bytes(value["bytes"], value.get("path") or "image bytes", max_pixels)
    if value.get("path"):
        return read_image(value["path"], max_pixels)
    raise ValueError("image value holds neither bytes nor a file path")


def image_file_size(path: str, max_pixels: int | None = None, verify: bool = False) -> tuple[int, int]:
    """(width, height) of an image file as `read_image` returns it (EXIF orientation applied), from its header;
    refused as in `read_image` when it has too many pixels or several frames.

    With `verify`, the pixels are also decoded once (and dropped), so that truncated or corrupt data is found too;
    otherwise nothing is decoded. Raises `ValueError` naming the file and the problem.
    """
    return image_file_header(path, max_pixels, verify)[0]


def image_file_header(path: str, max_pixels: int | None = None, verify: bool = False) -> tuple[tuple[int, int], str]:
    """((width, height), format) of an image file, as `image_file_size` (e.g. ((640, 480), "JPEG"))."""
    with _image_errors(path), _open_guarded(path, path, max_pixels) as image:
        if verify:
            image.load()
        width, height = image.size
        size = (height, width) if _orientation(image, header_only=not verify) in (5, 6, 7, 8) else (width, height)
        return size, image.format or ""


def _orientation(image: Image.Image, header_only: bool = False) -> int:
    """The EXIF orientation (1 to 8; 1 when absent). `header_only`: never decode for it (a PNG whose eXIf chunk
    follows the pixel data reads as 1 then)."""
    if header_only and image.format == "PNG" and "exif" not in image.info:
        return 1  # PIL would decode the whole file to look for a late eXIf chunk
    return int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)


def upright(image: Image.Image) -> Image.Image:
    """`image` with its EXIF orientation applied (the image itself when it has none); `format` is kept."""
    if _orientation(image) == 1:
        return image
    turned = ImageOps.exif_transpose(image)
    turned.format = image.format
    return turned


def _decode(source: str | IO[bytes], name: str, max_pixels: int | None) -> Image.Image:
    with _image_errors(name), _open_guarded(source, name, max_pixels) as image:
        image.load()
        decoded = upright(image)
        decoded = decoded.copy() if decoded is image else decoded
        decoded.format = image.format  # "JPEG", "PNG", ...: lossy masks are recognised by it
        if "lossless" in image.info:  # WebP: lossy (VP8) or lossless (VP8L) data
            decoded.info["lossless"] = image.info["lossless"]
        return decoded


def check_single_frame(image: Image.Image, name: str) -> None:
    """Refuse a multi-frame image (animated GIF/PNG/WebP, multi-page TIFF) with `ValueError` naming it."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format not in PRIMARY_FRAME_FORMATS:
        raise ValueError(
            f"{name}: refused, a multi-frame image ({frames} frames, {image.format}); only single images are "
            "scored: save the frame you mean as its own file"
        )


def _open_guarded(source: str | IO[bytes], name: str, max_pixels: int | None) -> Image.Image:
    """The opened (not decoded) image; `ValueError` when its header claims more than `max_pixels` pixels or when it
    has several frames."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    image = Image.open(source)
    width, height = image.size
    if limit and width * height > limit:
        image.close()
        raise ValueError(
            f"{name}: refused, {width} x {height} = {width * height:,} pixels exceeds the limit of {limit:,} "
            "(a possible decompression bomb)"
        )
    try:
        check_single_frame(image, name)
    except ValueError:
        image.close()
        raise
    if image.format == "WEBP" and image.fp is not None:
        image.info["lossless"] = not webp_is_lossy(image.fp)
    return image


def webp_is_lossy(stream: IO[bytes]) -> bool:
    """Whether the WebP file in `stream` holds lossy (VP8) image data rather than lossless (VP8L) data, read from its
    RIFF chunks (Pillow does not say); the stream's position is kept. A file whose chunks cannot be read counts as
    lossy (its masks are then binarised at mid-range, which a clean 0/255 mask survives unchanged)."""
    position = stream.tell()
    try:
        stream.seek(0)
        header = stream.read(12)
        if header[:4] != b"RIFF" or header[8:12] != b"WEBP":
            return True
        while True:
            chunk = stream.read(8)
            if len(chunk) < 8:
                return True
            fourcc, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if fourcc == b"VP8 ":
                return True
            if fourcc == b"VP8L":
                return False
            stream.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to an even size
    finally:
        stream.seek(position)


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
