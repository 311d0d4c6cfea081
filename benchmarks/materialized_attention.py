"""E-Attn and D-Attn with every attention matrix materialized, as the published Crane code computes them.

Benchmark reference only (`benchmarks/inference.py`): the same spec semantics as `crane_hf` (per-image D-Attn
mean, diagonal kept), but each softmax(x y^T) is built as a [B, H, N, N] tensor, the self-correlation weights are
summed as matrices and then applied to v, and the D-Attn weights are repeated for every head ([B * H, N, N]),
softmaxed and multiplied with each head's values.
`materialized_attention()` swaps these functions into a `CraneForAnomalyDetection` for the duration of a block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

import crane_hf.models.crane.e_attention
import crane_hf.models.crane.modeling_crane
from crane_hf.models.crane.clip_layers import merge_heads, split_heads
from crane_hf.models.crane.d_attention import dattn_values
from crane_hf.models.crane.e_attention import SELF_CORRELATION_PAIRS


def attention_weights(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * query key^T) as a materialized [..., N, N] tensor."""
    return (query @ key.transpose(-2, -1) * scale).softmax(dim=-1)


def materialized_dual_stream_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eattn_type: str, class_token_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`crane_hf.models.crane.e_attention.dual_stream_attention` with explicit [B, H, N, N] weight matrices.

    The published code has no class-token shortcut: it always computes CLIP's attention for every token.
    """
    scale = q.shape[-1] ** -0.5
    a_orig = attention_weights(q, k, scale) @ v
    if class_token_only:
        a_orig = a_orig[:, :, :1]
    if eattn_type == "(q+k+v)^2":
        qkv = torch.cat([q, k, v], dim=-1)
        return a_orig, attention_weights(qkv, qkv, scale / math.sqrt(3.0)) @ v
    named = {"q": q, "k": k, "v": v}
    weights = None
    for a, b in SELF_CORRELATION_PAIRS[eattn_type]:
        term = attention_weights(named[a], named[b], scale)
        weights = term if weights is None else weights + term
    return a_orig, weights @ v


def materialized_dattn_logits(dino_patches: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Masked D-Attn logits [B, M, M] (not yet softmaxed), each step a new float32 matrix."""
    features = F.normalize(dino_patches.float(), dim=-1)
    similarity = features @ features.transpose(1, 2)
    logits = gamma * (similarity - beta * similarity.mean(dim=(1, 2), keepdim=True))
    diagonal = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    return logits.masked_fill((logits < 0) & ~diagonal, float("-inf"))


def materialized_dattn_features(
    layer: nn.Module,
    layer_input: torch.Tensor,
    logits: torch.Tensor,
    clip_grid: tuple[int, int],
    dino_grid: tuple[int, int],
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """D-Attn as the published code runs it: the logits repeated for every head, softmaxed, one bmm per head."""
    values = dattn_values(layer, layer_input, clip_grid, dino_grid, values)
    batch, tokens, _ = values.shape
    heads = layer.self_attn.num_heads
    per_head = split_heads(values, heads).reshape(batch * heads, tokens, -1)
    weights = logits.to(values.dtype).unsqueeze(1).repeat(1, heads, 1, 1).reshape(batch * heads, tokens, tokens)
    attended = torch.bmm(weights.softmax(dim=-1), per_head)
    return layer.self_attn.out_proj(merge_heads(attended.reshape(batch, heads, tokens, -1)))


@contextlib.contextmanager
def materialized_attention() -> Iterator[None]:
    """Within the block, every `CraneForAnomalyDetection` runs E-Attn and D-Attn with materialized matrices."""
    modeling = crane_hf.models.crane.modeling_crane
    saved = (
        crane_hf.models.crane.e_attention.dual_stream_attention,
        modeling.dino_similarity_attention,
        modeling.dattn_features,
    )
    crane_hf.models.crane.e_attention.dual_stream_attention = materialized_dual_stream_attention
    modeling.dino_similarity_attention = materialized_dattn_logits
    modeling.dattn_features = materialized_dattn_features
    try:
        yield
    finally:
        crane_hf.models.crane.e_attention.dual_stream_attention = saved[0]
        modeling.dino_similarity_attention, modeling.dattn_features = saved[1:]
