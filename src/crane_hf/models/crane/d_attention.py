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

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .reproducibility import per_sample


def dino_similarity_attention(dino_patches: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Row-stochastic D-Attn weights [B, M, M] (float32) from DINOv2 patch features [B, M, C_dino].

    Built in place on the one [B, M, M] similarity buffer (the DINOv2 features are frozen, nothing needs their
    gradient), so the peak is two M x M matrices per image: the logits and the softmax. While a graph is traced
    for export, or inside `float64_dattn()`, the weights are `dino_similarity_attention_float64` instead.
    """
    # Under torch.compile the context flag is not read (Dynamo cannot trace ContextVar.get): eager float32 there.
    if torch.compiler.is_exporting() or (not torch.compiler.is_compiling() and _FLOAT64.get()):
        return dino_similarity_attention_float64(dino_patches, beta, gamma)
    logits = _logits_float32(dino_patches, beta, gamma)
    # Boolean, so exact; an AND with the off-diagonal (not a fill of the diagonal view) so that it also exports.
    off_diagonal = ~torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    masked = (logits < 0).logical_and_(off_diagonal)
    return torch.softmax(logits.masked_fill_(masked, float("-inf")), dim=-1)


def dino_similarity_attention_float64(dino_patches: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """`dino_similarity_attention` with the similarity, the mask decision and the softmax in float64.

    The mask is a hard threshold at A_ij = 0: a logit within float32 rounding of 0 (about 2e-6 at 518 pixels) is
    decided by the order in which a kernel sums the similarity, and one flipped decision moves that patch's map by
    up to about 2e-3. In float64 the decision is the exact-arithmetic one for the given (float32) features, the
    same in every runtime that computes float64 (ONNX Runtime does; OpenVINO's CPU plugin computes float64 as
    float32). An exported graph computes this (docs/export.md), and the export's verification compares the graph
    with the model computing this too. Cheap next to the backbones ([M, C] x [C, M] per image).

    Args:
        dino_patches: [B, M, C_dino], any float dtype.
    Returns:
        float32 [B, M, M], rows summing to 1.
    """
    logits = _logits_float64(dino_patches, beta, gamma)
    off_diagonal = ~torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    masked = (logits < 0) & off_diagonal
    return torch.softmax(logits.masked_fill(masked, float("-inf")), dim=-1).float()


def _logits_float32(dino_patches: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """A [B, M, M] float32, as the eager model computes it: image by image, in place on one buffer."""
    features = F.normalize(dino_patches.float(), dim=-1)
    logits = per_sample(lambda f: f @ f.transpose(1, 2), features)
    mean = per_sample(lambda similarity: similarity.mean(dim=(1, 2), keepdim=True), logits)
    return logits.sub_(mean * beta).mul_(gamma)


def _logits_float64(dino_patches: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """A [B, M, M] float64 from the features cast to float64."""
    features = F.normalize(dino_patches.double(), dim=-1)
    logits = features @ features.transpose(1, 2)
    return (logits - logits.mean(dim=(1, 2), keepdim=True) * beta) * gamma


def float32_mask_flips(dino_patches: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Per image, int64 [B]: the off-diagonal D-Attn mask decisions (A_ij < 0) that the eager float32 computation
    (`dino_similarity_attention`) takes differently from float64 (`dino_similarity_attention_float64`) on
    `dino_patches` [B, M, C_dino]: logits within float32 rounding of 0."""
    single = _logits_float32(dino_patches, beta, gamma) < 0
    double = _logits_float64(dino_patches, beta, gamma) < 0
    off_diagonal = ~torch.eye(single.shape[-1], dtype=torch.bool, device=single.device)
    return ((single != double) & off_diagonal).sum(dim=(1, 2))


_FLOAT64: contextvars.ContextVar[bool] = contextvars.ContextVar("float64_dattn", default=False)


@contextlib.contextmanager
def float64_dattn() -> Iterator[None]:
    """Within this block, the model's D-Attn weights are `dino_similarity_attention_float64` (as in an exported
    graph). The eager float32 computation, outside it, is unchanged."""
    token = _FLOAT64.set(True)
    try:
        yield
    finally:
        _FLOAT64.reset(token)


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
