"""Bilinear resizing of CLIP's patch position embeddings to another grid (spec section 2.1).

Always computed from the checkpoint's own table, never written back: the model's weights stay unchanged.
transformers' `interpolate_pos_encoding` is bicubic and is deliberately not used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resize_position_embeddings(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings [1 + gh*gw, C] for a `grid` (gh, gw) from a square table [1 + g*g, C].

    The class position is kept; the patch positions are resized bilinearly (align_corners=False, no antialias).
    """
    side = math.isqrt(table.shape[0] - 1)
    if side * side != table.shape[0] - 1:
        raise ValueError(f"Position table with {table.shape[0] - 1} patch positions is not a square grid.")
    if (side, side) == tuple(grid):
        return table
    patches = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)], dim=0)
