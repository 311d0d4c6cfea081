"""The evaluation's batches: rows of a dataset as model inputs, where a row that cannot be read comes back as its
error message instead of stopping the run (used by `evaluate.py` and `few_shot.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class EvaluationItems(torch.utils.data.Dataset):
    """`ProcessedImages` of some rows; a row that cannot be read or processed comes back as its error message, so
    that one bad file never stops the evaluation. An anomalous row whose mask is empty, vanishes at S x S or marks
    every pixel carries the kind (`data.mask_checks.mask_problem`) as "mask_problem"."""

    def __init__(self, images: Any, rows: Sequence[int]):
        self.images = images
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        from ..data.mask_checks import mask_problem
        from ..training.data_loading import UnreadableRowError

        row = self.rows[position]
        try:
            item = self.images[row]
        except UnreadableRowError as error:
            return {"index": torch.tensor(row), "error": error.reason}
        if int(item["labels"]) == 1:
            try:
                item["mask_problem"] = mask_problem(self.images.dataset[row]["mask"], item["masks"])
            except (ValueError, OSError) as error:  # the file changed since it was read a moment ago
                return {"index": torch.tensor(row), "error": f"mask could not be read again: {error}"}
        return item


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [item for item in items if "error" not in item]
    batch: dict[str, Any] = {"errors": [(int(item["index"]), item["error"]) for item in items if "error" in item]}
    batch["mask_problems"] = [(int(item["index"]), item["mask_problem"]) for item in good if item.get("mask_problem")]
    if good:
        for key in ("pixel_values", "masks", "labels", "index"):
            batch[key] = torch.stack([item[key] for item in good])
    return batch


__all__ = ["EvaluationItems", "collate_items"]
