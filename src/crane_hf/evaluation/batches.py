"""The evaluation's batches: rows of a dataset as model inputs, where a row that cannot be read comes back as its
error message instead of stopping the run (used by `evaluate.py` and `few_shot.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class EvaluationItems(torch.utils.data.Dataset):
    """`ProcessedImages` of some rows; a row that cannot be read or processed comes back as its error message, so
    that one bad file never stops the evaluation."""

    def __init__(self, images: Any, rows: Sequence[int]):
        self.images = images
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        from ..training.data_loading import UnreadableRowError

        row = self.rows[position]
        try:
            return self.images[row]
        except UnreadableRowError as error:
            return {"index": torch.tensor(row), "error": error.reason}


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [item for item in items if "error" not in item]
    batch: dict[str, Any] = {"errors": [(int(item["index"]), item["error"]) for item in items if "error" in item]}
    if good:
        for key in ("pixel_values", "masks", "labels", "index"):
            batch[key] = torch.stack([item[key] for item in good])
    return batch


__all__ = ["EvaluationItems", "collate_items"]
