"""What the training loop iterates over: images (or their cached backbone outputs) in an order fixed by (seed, epoch).

- `ProcessedImages`: rows of an anomaly `datasets.Dataset` prepared by `CraneImageProcessor` (spec section 1).
- `EpochShuffleSampler`: a permutation drawn from (seed, epoch) alone, so that a run resumed at an epoch boundary
  sees the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import numpy as np
import torch

from .image_processing_crane import CraneImageProcessor


class ProcessedImages(torch.utils.data.Dataset):
    """Model inputs of each row of an anomaly dataset (columns of `crane_hf.data.records`).

    Items: `pixel_values` [3, S, S], `masks` [S, S] in {0, 1} (zeros for normal images), `labels` (0 / 1) and
    `index` (the row).
    """

    def __init__(self, dataset: datasets.Dataset, processor: CraneImageProcessor):
        self.dataset = dataset
        self.processor = processor

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.dataset[int(index)]
        try:
            processed = self.processor([row["image"]], masks=[row["mask"]])
        except (ValueError, TypeError, OSError) as error:
            raise ValueError(f"Cannot prepare {row['image_path']} (row {index}): {error}") from error
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
