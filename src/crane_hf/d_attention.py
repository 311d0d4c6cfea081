"""D-Attn (Crane+): attention weights from DINOv2 patch similarity applied to CLIP values (spec section 3).

For one CLIP layer l with input o_(l-1): u = LN1_l(o_(l-1)), v = value projection of u, class token dropped.
With f_i the DINOv2 patch features of the same image:

    sim_ij = cos(f_i, f_j);  m = mean_ij sim_ij (per image);  A_ij = gamma * (sim_ij - beta * m)
    A_ij = -inf where A_ij < 0, except on the diagonal;  W = softmax_j(A);  out_i = OutProj(sum_j W_ij v_j)

The weights are shared by every head, so the heads' values are attended together in one batched product.
Two required departures from the published code: m is taken per image (not over the batch), and the diagonal is
never masked, so a uniform image (every A_ij < 0) gives finite features instead of NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dino_similarity_attention(dino_patches: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Row-stochastic D-Attn weights [B, M, M] from DINOv2 patch features [B, M, C_dino]."""
    features = F.normalize(dino_patches.float(), dim=-1)
    similarity = features @ features.transpose(1, 2)
    mean = similarity.mean(dim=(1, 2), keepdim=True)
    logits = (similarity - mean * beta) * gamma
    diagonal = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill((logits < 0) & ~diagonal, float("-inf"))
    return torch.softmax(logits, dim=-1)


def dattn_features(
    layer: nn.Module,
    layer_input: torch.Tensor,
    dino_patches: torch.Tensor,
    clip_grid: tuple[int, int],
    dino_grid: tuple[int, int],
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """D-Attn token features [B, M, C] of CLIP `layer` from its input o_(l-1) [B, 1+N, C].

    The CLIP values are bilinearly resized from `clip_grid` to `dino_grid` when the two grids differ.
    """
    values = layer.self_attn.v_proj(layer.layer_norm1(layer_input))[:, 1:]
    if clip_grid != dino_grid:
        batch, _, channels = values.shape
        grid = values.transpose(1, 2).reshape(batch, channels, *clip_grid)
        grid = F.interpolate(grid, size=dino_grid, mode="bilinear", align_corners=False)
        values = grid.flatten(2).transpose(1, 2)
    weights = dino_similarity_attention(dino_patches, beta, gamma).to(values.dtype)
    return layer.self_attn.out_proj(weights @ values)
