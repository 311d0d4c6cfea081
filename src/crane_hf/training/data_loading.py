"""What the training loop iterates over: images (or their cached backbone outputs) in an order fixed by (seed, epoch).

- `ProcessedImages`: rows of an anomaly `datasets.Dataset` prepared by `CraneImageProcessor` (spec section 1).
- `EpochShuffleSampler`: a permutation drawn from (seed, epoch) alone, so that a run resumed at an epoch boundary
  sees the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch

from ..models.crane.image_processing_crane import CraneImageProcessor
from ..models.crane.image_reading import read_encoded_image


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


__all__ = ["EpochShuffleSampler", "ProcessedImages", "epoch_permutation"]
