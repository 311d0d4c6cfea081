"""E-Attn: the self-correlation attention stream of Crane's last vision layers (spec section 2.3).

In each E-Attn layer, with u = LN1(o) and per-head q, k, v of u:

    a_orig = softmax(s q k^T) v                      (CLIP's own attention, feeds the o stream)
    a_self = sum over the E-Attn type's pairs, e.g. softmax(s q q^T) v + softmax(s k k^T) v + softmax(s v v^T) v
    o <- o + OutProj(a_orig);  o <- o + MLP(LN2(o))
    e <- e + OutProj(a_self)                         (no MLP; e never feeds back into o)

All attentions go through `torch.nn.functional.scaled_dot_product_attention`; a_orig and the self-correlation
terms share one call (stacked along the batch axis), so no N x N attention matrix is materialized here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .clip_layers import merge_heads, project_qkv

# Each E-Attn type as the (query, key) pairs of its softmax terms; "(q+k+v)^2" is handled separately.
SELF_CORRELATION_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "qq+kk+vv": (("q", "q"), ("k", "k"), ("v", "v")),
    "qq+kk": (("q", "q"), ("k", "k")),
    "qq": (("q", "q"),),
    "kk": (("k", "k"),),
    "vv": (("v", "v"),),
}


def dual_stream_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eattn_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP attention and E-Attn self-correlation of per-head q, k, v [B, H, N, d].

    Returns ``(a_orig, a_self)``, both [B, H, N, d].
    """
    if eattn_type == "(q+k+v)^2":
        a_orig = F.scaled_dot_product_attention(q, k, v)
        qkv = torch.cat([q, k, v], dim=-1)
        scale = q.shape[-1] ** -0.5 / math.sqrt(3.0)
        return a_orig, F.scaled_dot_product_attention(qkv, qkv, v, scale=scale)
    if eattn_type not in SELF_CORRELATION_PAIRS:
        raise ValueError(f"Unknown E-Attn type {eattn_type!r}.")
    named = {"q": q, "k": k, "v": v}
    pairs = (("q", "k"), *SELF_CORRELATION_PAIRS[eattn_type])
    batch = q.shape[0]
    queries = torch.cat([named[a] for a, _ in pairs], dim=0)
    keys = torch.cat([named[b] for _, b in pairs], dim=0)
    values = v.repeat(len(pairs), 1, 1, 1)
    attended = F.scaled_dot_product_attention(queries, keys, values)
    a_orig = attended[:batch]
    a_self = attended[batch : 2 * batch]
    for term in range(2, len(pairs)):
        a_self = a_self + attended[term * batch : (term + 1) * batch]
    return a_orig, a_self


def eattn_block(
    layer: nn.Module, o: torch.Tensor, e: torch.Tensor, eattn_type: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One E-Attn layer on the o and e streams [B, N, C].

    Returns ``(o_next, e_next, o_mid)`` where ``o_mid = o + OutProj(a_orig)`` is the o stream between the block's
    attention and its MLP (the published code's D-Attn reads it, see docs/parity.md).
    """
    q, k, v = project_qkv(layer, layer.layer_norm1(o))
    a_orig, a_self = dual_stream_attention(q, k, v, eattn_type)
    out_proj = layer.self_attn.out_proj
    o_mid = o + out_proj(merge_heads(a_orig))
    o_next = o_mid + layer.mlp(layer.layer_norm2(o_mid))
    e_next = e + out_proj(merge_heads(a_self))
    return o_next, e_next, o_mid
