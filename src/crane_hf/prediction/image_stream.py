"""The images of a batch prediction, read, fingerprinted and preprocessed in DataLoader worker processes while the
model runs on the previous batch.

A *source* names its items and reads them: `FileSource` (image files, by path) and `DatasetSource` (the image
column of a `datasets.Dataset`, e.g. loaded from Parquet files, a folder saved with `save_to_disk` or the Hub).
`ImageStream` is the torch Dataset over the positions of one process's shard: each item is fingerprinted (SHA-256
of the encoded bytes: the file, or the dataset cell), compared with the fingerprint a resumed run already holds
for that position (equal: reported done, not decoded), decoded with the guards of `models/crane/image_reading.py`
and preprocessed exactly as the pipeline preprocesses (`model_inputs_for_image`). An item that cannot be read never
raises: it comes back with the reason, so one bad file cannot stop the stream. `image_loader` batches the stream
(`collate_images`), with pinned memory when the model is on a CUDA device so that copies to it can be
non-blocking.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..models.crane.image_reading import read_encoded_image, read_image_bytes
from ..models.crane.pipeline_zero_shot_anomaly_detection import model_inputs_for_image, pixel_fingerprint
from ..models.crane.reference_memory import SAME_PIXELS_REASON
from ..process_lifetime import end_with_parent
from ..training.fingerprints import file_sha256

READ_ERRORS = (ValueError, OSError, SyntaxError, Image.DecompressionBombError)


class FileSource:
    """Image files by path: item `i` is `paths[i]`."""

    def __init__(self, paths: Sequence[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index]

    def file(self, index: int) -> str:
        """The file of item `index`."""
        return self.paths[index]

    def sha256(self, index: int) -> str:
        """SHA-256 (hex) of item `index`'s file; `ValueError` with the reason when it cannot be read."""
        try:
            return file_sha256(self.paths[index])
        except OSError as error:
            raise ValueError(f"could not be read ({error.strerror or error})") from error

    def read(self, index: int, expected: str | None) -> tuple[str, Image.Image | None]:
        """(SHA-256 of the file, decoded image or None when it equals `expected`); `ValueError` with the reason.
        The file is read once: the SHA-256 is that of the bytes decoded, even if the file is rewritten meanwhile."""
        path = self.paths[index]
        data = _read_bytes(path)
        digest = hashlib.sha256(data).hexdigest()
        if digest == expected:
            return digest, None
        try:
            return digest, read_image_bytes(data, path)
        except READ_ERRORS as error:
            raise ValueError(str(error).removeprefix(f"{path}: ")) from error


def _read_bytes(path: str) -> bytes:
    """The bytes of the file `path`; `ValueError` with the reason when it cannot be read."""
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as error:
        raise ValueError(f"could not be read ({error.strerror or error})") from error


class DatasetSource:
    """The image column of a `datasets.Dataset`, read undecoded (the encoded bytes are fingerprinted and decoded
    here, with the guards of files). Items are named by the `image_path` column where the row has one, else
    `LABEL[row]`."""

    def __init__(self, dataset: Any, column: str = "image", label: str = "dataset"):
        import datasets

        if column not in dataset.column_names:
            raise ValueError(f"{label}: no column {column!r} (columns: {', '.join(dataset.column_names)})")
        if not isinstance(dataset.features[column], datasets.Image):
            raise ValueError(f"{label}: column {column!r} is not an image column ({dataset.features[column]})")
        self.dataset = dataset.cast_column(column, datasets.Image(decode=False)).with_format(None)
        self.column = column
        self.label = label
        self.names = self.dataset["image_path"] if "image_path" in self.dataset.column_names else None

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, index: int) -> str:
        """The row's `image_path`, or `LABEL[index]` when there is none (no such column, an empty cell)."""
        named = self.names[index] if self.names is not None else None
        return str(named) if named not in (None, "") else f"{self.label}[{index}]"

    def _cell(self, index: int) -> dict[str, Any]:
        cell = self.dataset[index][self.column]
        if not cell or not (cell.get("bytes") or cell.get("path")):
            raise ValueError("the row holds no image")
        return cell

    def file(self, index: int) -> str | None:
        """The file row `index`'s image is read from; None when the row holds its bytes."""
        cell = self._cell(index)
        return None if cell.get("bytes") else cell["path"]

    def sha256(self, index: int) -> str:
        """SHA-256 (hex) of row `index`'s encoded image (its bytes, or its file)."""
        cell = self._cell(index)
        try:
            return self._digest(cell)
        except READ_ERRORS as error:
            raise ValueError(str(error)) from error

    @staticmethod
    def _digest(cell: dict[str, Any]) -> str:
        return hashlib.sha256(cell["bytes"]).hexdigest() if cell.get("bytes") else file_sha256(cell["path"])

    def read(self, index: int, expected: str | None) -> tuple[str, Image.Image | None]:
        cell = self._cell(index)
        if not cell.get("bytes"):  # a file: read once, so that the SHA-256 is that of the bytes decoded
            cell = {"bytes": _read_bytes(cell["path"]), "path": cell["path"]}
        try:
            digest = self._digest(cell)
            if digest == expected:
                return digest, None
            return digest, read_encoded_image(cell)
        except READ_ERRORS as error:
            raise ValueError(str(error)) from error


@dataclass
class StreamItem:
    """One position of a shard after reading: `status` is "scored" (model inputs ready), "done" (a resumed run
    already holds its result) or "skipped" (`reason` says why)."""

    index: int
    path: str
    sha256: str | None
    status: str
    reason: str | None = None
    inputs: dict[str, Any] | None = None


class ImageStream(torch.utils.data.Dataset):
    """The items `positions` of `source` as model inputs (see the module docstring).

    `done` maps a position to the fingerprint of the result a resumed run holds for it. `image_processor`, `dtype`
    and `keep_image` are those of the pipeline (`model_inputs_for_image`). `reference_pixels`: the few-shot memory's
    `known_fingerprints`; an image whose decoded pixels have one of them is a reference image in other bytes, which
    would match itself in the memory: it is skipped (`SAME_PIXELS_REASON`).
    """

    def __init__(
        self,
        source: Any,
        positions: Sequence[int],
        image_processor: Any,
        dtype: torch.dtype | None,
        keep_image: bool,
        done: dict[int, str] | None = None,
        reference_pixels: frozenset[str] = frozenset(),
    ):
        self.source = source
        self.positions = positions
        self.image_processor = image_processor
        self.dtype = dtype
        self.keep_image = keep_image
        self.done = done or {}
        self.reference_pixels = reference_pixels

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> StreamItem:
        index = self.positions[item]
        path = self.source.name(index)
        digest = None
        try:
            digest, image = self.source.read(index, self.done.get(index))
            if image is None:
                return StreamItem(index, path, digest, "done")
            if self.reference_pixels and pixel_fingerprint(image) in self.reference_pixels:
                return StreamItem(index, path, digest, "skipped", SAME_PIXELS_REASON)
            inputs = model_inputs_for_image(self.image_processor, image, self.dtype, self.keep_image)
        except ValueError as error:
            return StreamItem(index, path, digest, "skipped", str(error))
        return StreamItem(index, path, digest, "scored", inputs=inputs)


def collate_images(items: list[StreamItem]) -> dict[str, Any]:
    """A batch: `items` in order, and the inputs of those to score stacked as the pipeline batches them
    (`pixel_values` [B, 3, S, S], `original_size` [B, 2]; `images`: uint8 [H, W, 3] arrays or None)."""
    scored = [item for item in items if item.status == "scored"]
    batch: dict[str, Any] = {"items": [StreamItem(**{**vars(item), "inputs": None}) for item in items]}
    if scored:
        batch["pixel_values"] = torch.cat([item.inputs["pixel_values"] for item in scored])
        batch["original_size"] = torch.cat([item.inputs["original_size"] for item in scored])
        batch["images"] = [item.inputs.get("image") for item in scored]
    return batch


INTERRUPTIONS = (signal.SIGINT, signal.SIGTERM)


def image_loader(stream: ImageStream, batch_size: int, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """Batches of `stream` in order, read by `workers` worker processes (0: in this process), two batches ahead
    per worker; `pin_memory` for non-blocking copies to a CUDA device. Iterate it with `batches`."""
    return torch.utils.data.DataLoader(
        stream,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        worker_init_fn=_worker_ends_with_parent if workers else None,
    )


def _worker_ends_with_parent(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the worker ends with the process that started it, even one killed with SIGKILL
    (`process_lifetime.end_with_parent`; the DataLoader's own watchdog remains)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        end_with_parent(parent.pid)


def batches(loader: torch.utils.data.DataLoader) -> Iterator[dict[str, Any]]:
    """The batches of `loader`. A SIGINT or SIGTERM that arrives while its workers start is held back and raised
    once they have started, so that an interruption never finds the DataLoader half-built (its clean-up would
    then fail with an AttributeError instead of stopping the workers)."""
    if threading.current_thread() is not threading.main_thread():
        yield from loader
        return
    pending: list[int] = []

    def hold(received: int, frame: Any) -> None:
        pending.append(received)

    previous = {number: signal.signal(number, hold) for number in INTERRUPTIONS}
    try:
        iterator = iter(loader)
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        if pending:
            signal.raise_signal(pending[0])
    yield from iterator


__all__ = ["DatasetSource", "FileSource", "ImageStream", "StreamItem", "batches", "collate_images", "image_loader"]
