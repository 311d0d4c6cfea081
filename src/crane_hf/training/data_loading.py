"""What the training loop iterates over: images (or their cached backbone outputs) in an order fixed by (seed, epoch).

- `ProcessedImages`: rows of an anomaly `datasets.Dataset` prepared by `CraneImageProcessor` (spec section 1).
- `EpochShuffleSampler`: a permutation drawn from (seed, epoch) alone, so that a run resumed at an epoch boundary
  sees the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch

from ..models.crane.image_processing_crane import CraneImageProcessor, LossyMaskWarning
from ..models.crane.image_reading import read_encoded_image
from .fingerprints import combine_digests, row_digest


def undecoded(dataset: datasets.Dataset) -> datasets.Dataset:
    """`dataset` with its image and mask columns left as `{"path", "bytes"}` values, so that reading a row decodes
    nothing; `read_encoded_image` then decodes them with the batch commands' checks (named errors, bomb guard)."""
    for column in ("image", "mask"):
        if not (isinstance(dataset.features[column], datasets.Image) and not dataset.features[column].decode):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def image_file(record: dict[str, Any]) -> str:
    """The image file of an undecoded row (its path, or `image_path` when the image is held as bytes)."""
    return (record["image"] or {}).get("path") or record["image_path"]


class UnreadableRowError(ValueError):
    """A row whose image or mask cannot be decoded or processed: its `row`, `image_path` and `reason`."""

    def __init__(self, row: int, image_path: str, reason: str):
        super().__init__(f"Cannot prepare {image_path} (row {row}): {reason}")
        self.row, self.image_path, self.reason = row, image_path, reason


class ProcessedImages(torch.utils.data.Dataset):
    """Model inputs of each row of an anomaly dataset (columns of `crane_hf.data.records`).

    Items: `pixel_values` [3, S, S], `masks` [S, S] in {0, 1} (zeros for normal images), `labels` (0 / 1) and
    `index` (the row). Images are decoded with `read_encoded_image` (named errors, decompression-bomb guard); a row
    that cannot be read raises `UnreadableRowError`.
    """

    def __init__(self, dataset: datasets.Dataset, processor: CraneImageProcessor):
        self.dataset = undecoded(dataset)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.dataset[int(index)]
        try:
            image = read_encoded_image(row["image"])
            mask = None if row["mask"] is None else read_encoded_image(row["mask"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LossyMaskWarning)  # the dataset loaders named these files once
                processed = self.processor([image], masks=[mask])
        except (ValueError, TypeError, OSError) as error:
            path = image_file(row)
            raise UnreadableRowError(int(index), path, str(error).removeprefix(f"{path}: ")) from error
        return {
            "pixel_values": processed["pixel_values"][0],
            "masks": processed["masks"][0],
            "labels": torch.tensor(int(row["label"])),
            "index": torch.tensor(int(index)),
        }


@dataclass
class RowCheck:
    """What `check_rows` found in some rows of a `ProcessedImages`.

    Attributes:
        digests: row -> `fingerprints.row_digest` of the readable rows.
        unreadable: (row, image path, reason) of the rows that cannot be prepared.
        anomalous: rows labelled anomalous.
        empty_masks: image paths of anomalous rows whose mask has no anomalous pixel at the model's input size.
    """

    digests: dict[int, str] = field(default_factory=dict)
    unreadable: list[tuple[int, str, str]] = field(default_factory=list)
    anomalous: list[int] = field(default_factory=list)
    empty_masks: list[str] = field(default_factory=list)

    def merge(self, other: RowCheck) -> RowCheck:
        self.digests.update(other.digests)
        self.unreadable.extend(other.unreadable)
        self.anomalous.extend(other.anomalous)
        self.empty_masks.extend(other.empty_masks)
        return self


class _CheckedRows(torch.utils.data.Dataset):
    """Each row prepared exactly as training prepares it, reduced to what `RowCheck` keeps."""

    def __init__(self, images: ProcessedImages, rows: Sequence[int]):
        self.images = images
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> RowCheck:
        row = self.rows[position]
        found = RowCheck()
        try:
            item = self.images[row]
            record = self.images.dataset[row]
            found.digests[row] = row_digest(record)
        except UnreadableRowError as error:
            found.unreadable.append((row, error.image_path, error.reason))
            return found
        except OSError as error:  # the file vanished or cannot be read for hashing
            found.unreadable.append((row, image_file(self.images.dataset[row]), str(error)))
            return found
        if int(item["labels"]) == 1:
            found.anomalous.append(row)
            if not bool(item["masks"].any()):
                found.empty_masks.append(image_file(record))
        return found


def check_rows(images: ProcessedImages, rows: Sequence[int], num_workers: int = 0, batch_size: int = 8) -> RowCheck:
    """Prepare every row of `rows` once, as the training loop will (decoding, conversion, masks at the input size),
    before any training step: unreadable rows, anomalous images and empty masks are collected, and each readable
    row's content digest (`fingerprints.row_digest`) is computed. Runs on `num_workers` data loader workers."""
    loader = torch.utils.data.DataLoader(
        _CheckedRows(images, rows), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    result = RowCheck()
    for batch in loader:
        for found in batch:
            result.merge(found)
    return result


def dataset_fingerprint(dataset: datasets.Dataset) -> str:
    """The content fingerprint of an anomaly dataset: `fingerprints.combine_digests` of every row's
    `fingerprints.row_digest`, in order (the image and mask columns are read undecoded). `crane-hf train` computes
    the same value from the digests `check_rows` collects."""
    dataset = undecoded(dataset)
    return combine_digests([row_digest(dataset[index]) for index in range(len(dataset))])


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """The order of `size` items in `epoch`: a function of (seed, epoch) only."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(size)


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """Indices in the order `epoch_permutation(size, seed, epoch)`; `set_epoch` picks the epoch (accelerate calls
    it through the prepared data loader)."""

    def __init__(self, size: int, seed: int):
        self.size = int(size)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_permutation(self.size, self.seed, self.epoch).tolist())

    def __len__(self) -> int:
        return self.size


__all__ = [
    "EpochShuffleSampler",
    "ProcessedImages",
    "RowCheck",
    "check_rows",
    "dataset_fingerprint",
    "epoch_permutation",
]
