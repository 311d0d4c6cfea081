"""D-Attn (Crane+): attention weights from DINOv2 patch similarity applied to CLIP values (spec section 3).

For one CLIP layer l with input o_(l-1): u = LN1_l(o_(l-1)), v = value projection of u, class token dropped.
With f_i the DINOv2 patch features of the same image:

    sim_ij = cos(f_i, f_j);  m = mean_ij sim_ij (per image);  A_ij = gamma * (sim_ij - beta * m)
    A_ij = -inf where A_ij < 0, except on the diagonal;  W = softmax_j(A);  out_i = OutProj(sum_j W_ij v_j)

The weights depend only on DINOv2, so they are computed once per forward and shared by every feature layer and
every head: the heads' values are attended together in one [M, M] x [M, C] product per image (per image so that
the result does not depend on the batch, `reproducibility.py`).
Two required departures from the published code: m is taken per image (not over the batch), and the diagonal is
never masked, so a uniform image (every A_ij < 0) gives finite features instead of NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .reproducibility import per_sample


def dino_similarity_attention(dino_patches: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Row-stochastic D-Attn weights [B, M, M] (float32) from DINOv2 patch features [B, M, C_dino].

    Built in place on the one [B, M, M] similarity buffer (the DINOv2 features are frozen, nothing needs their
    gradient), so the peak is two M x M matrices per image: the logits and the softmax.
    """
    features = F.normalize(dino_patches.float(), dim=-1)
    logits = per_sample(lambda f: f @ f.transpose(1, 2), features)
    mean = per_sample(lambda similarity: similarity.mean(dim=(1, 2), keepdim=True), logits)
    logits = logits.sub_(mean * beta).mul_(gamma)
    # Boolean, so exact; an AND with the off-diagonal (not a fill of the diagonal view) so that it also exports.
    off_diagonal = ~torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    masked = (logits < 0).logical_and_(off_diagonal)
    return torch.softmax(logits.masked_fill_(masked, float("-inf")), dim=-1)


def dattn_features(
    layer: nn.Module,
    layer_input: torch.Tensor,
    weights: torch.Tensor,
    clip_grid: tuple[int, int],
    dino_grid: tuple[int, int],
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """D-Attn token features [B, M, C] of CLIP `layer` from its input o_(l-1) [B, 1+N, C].

    Args:
        weights: D-Attn weights [B, M, M] (`dino_similarity_attention`), M = cells of `dino_grid`.
        values: the layer's value projection of LN1(o_(l-1)) [B, 1+N, C] when already computed (E-Attn layers
            compute it); otherwise it is computed from `layer_input`.

    The CLIP values are bilinearly resized from `clip_grid` to `dino_grid` when the two grids differ.
    """
    values = dattn_values(layer, layer_input, clip_grid, dino_grid, values)
    return layer.self_attn.out_proj(per_sample(torch.matmul, weights.to(values.dtype), values))


def dattn_values(
    layer: nn.Module,
    layer_input: torch.Tensor,
    clip_grid: tuple[int, int],
    dino_grid: tuple[int, int],
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """The patch values [B, M, C] D-Attn attends over: the layer's value projection of LN1(o_(l-1)) (or `values`
    [B, 1+N, C] when given), class token dropped, bilinearly resized from `clip_grid` to `dino_grid` if they differ."""
    if values is None:
        values = layer.self_attn.v_proj(layer.layer_norm1(layer_input))
    values = values[:, 1:]
    if clip_grid != dino_grid:
        batch, _, channels = values.shape
        grid = values.transpose(1, 2).reshape(batch, channels, *clip_grid)
        grid = F.interpolate(grid, size=dino_grid, mode="bilinear", align_corners=False)
        values = grid.flatten(2).transpose(1, 2)
    return values
