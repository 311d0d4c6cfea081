"""E-Attn: the self-correlation attention stream of Crane's last vision layers (spec section 2.3).

In each E-Attn layer, with u = LN1(o) and per-head q, k, v of u:

    a_orig = softmax(s q k^T) v                      (CLIP's own attention, feeds the o stream)
    a_self = sum over the E-Attn type's pairs, e.g. softmax(s q q^T) v + softmax(s k k^T) v + softmax(s v v^T) v
    o <- o + OutProj(a_orig);  o <- o + MLP(LN2(o))
    e <- e + OutProj(a_self)                         (no MLP; e never feeds back into o)

All attentions go through fused `torch.nn.functional.scaled_dot_product_attention`, one call per softmax term on
the projections' own strided views, so neither an N x N attention matrix nor a stacked copy of q, k, v is built
(stacking the terms into one call measured slower on the CPU: the copies cost more than the call saves).
In the last layer only the class token of o is needed (its patch tokens feed nothing), so `class_token_only`
computes CLIP's attention and MLP for that token alone (the MLP alone when D-Attn reads the layer's o stream after
its attention, `keep_o_mid`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .clip_layers import clip_mlp, merge_heads, project_qkv
from .reproducibility import per_sample

# Each E-Attn type as the (query, key) pairs of its softmax terms; "(q+k+v)^2" is handled separately.
SELF_CORRELATION_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "qq+kk+vv": (("q", "q"), ("k", "k"), ("v", "v")),
    "qq+kk": (("q", "q"), ("k", "k")),
    "qq": (("q", "q"),),
    "kk": (("k", "k"),),
    "vv": (("v", "v"),),
}


def dual_stream_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eattn_type: str, class_token_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP attention and E-Attn self-correlation of per-head q, k, v [B, H, N, d].

    Returns ``(a_orig, a_self)``, both [B, H, N, d] (a_orig [B, H, 1, d] for the first query alone when
    `class_token_only`).
    """
    if class_token_only:  # one query per image: image by image, so the batch cannot change its bits
        a_orig = per_sample(F.scaled_dot_product_attention, q[:, :, :1], k, v)
    else:
        a_orig = F.scaled_dot_product_attention(q, k, v)
    if eattn_type == "(q+k+v)^2":
        # Keys of width 3d against values of width d would send SDPA to its math fallback, which builds the N x N
        # matrix; values zero-padded to 3d keep the fused kernels, and the padding's outputs are dropped.
        qkv = torch.cat([q, k, v], dim=-1)
        scale = q.shape[-1] ** -0.5 / math.sqrt(3.0)
        padded = F.pad(v, (0, qkv.shape[-1] - v.shape[-1]))
        return a_orig, F.scaled_dot_product_attention(qkv, qkv, padded, scale=scale)[..., : v.shape[-1]]
    if eattn_type not in SELF_CORRELATION_PAIRS:
        raise ValueError(f"Unknown E-Attn type {eattn_type!r}.")
    named = {"q": q, "k": k, "v": v}
    terms = [F.scaled_dot_product_attention(named[a], named[b], v) for a, b in SELF_CORRELATION_PAIRS[eattn_type]]
    return a_orig, sum(terms[1:], terms[0])


class EAttnLayerOutput(NamedTuple):
    """The streams after one E-Attn layer, and what D-Attn of that layer can reuse.

    o: o stream [B, N, C] ([B, 1, C] with `class_token_only`); e: e stream [B, N, C];
    o_mid: o + OutProj(a_orig), the o stream between attention and MLP (None with `class_token_only`, unless
    `keep_o_mid`);
    values: the value projection of LN1(o_in), all tokens [B, N, C] (a view, heads merged).
    """

    o: torch.Tensor
    e: torch.Tensor
    o_mid: torch.Tensor | None
    values: torch.Tensor


def eattn_block(
    layer: nn.Module,
    o: torch.Tensor,
    e: torch.Tensor,
    eattn_type: str,
    class_token_only: bool = False,
    keep_o_mid: bool = False,
) -> EAttnLayerOutput:
    """One E-Attn layer on the o and e streams [B, N, C].

    ``o_mid = o + OutProj(a_orig)`` is returned because the published code's D-Attn reads it (docs/parity.md).
    With `class_token_only`, the o stream leaving the layer is computed for the class token alone (for the last
    layer); with `keep_o_mid` too, CLIP's attention still runs for every token so that ``o_mid`` is complete, and
    only the MLP is limited to the class token.
    """
    q, k, v = project_qkv(layer, layer.layer_norm1(o))
    a_orig, a_self = dual_stream_attention(q, k, v, eattn_type, class_token_only and not keep_o_mid)
    out_proj = layer.self_attn.out_proj
    if class_token_only and keep_o_mid:
        o_mid = o + out_proj(merge_heads(a_orig))
        o_next = per_sample(lambda token: token + clip_mlp(layer, layer.layer_norm2(token)), o_mid[:, :1])
    elif class_token_only:  # one row per image: computed image by image so the batch cannot change its bits

        def class_token_update(token: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
            mid = token + out_proj(merge_heads(attended))
            return mid + clip_mlp(layer, layer.layer_norm2(mid))

        o_next, o_mid = per_sample(class_token_update, o[:, :1], a_orig), None
    else:
        o_mid = o + out_proj(merge_heads(a_orig))
        o_next = o_mid + clip_mlp(layer, layer.layer_norm2(o_mid))
    e_next = e + out_proj(merge_heads(a_self))
    return EAttnLayerOutput(o_next, e_next, o_mid, merge_heads(v))
