"""Plain CLIP transformer blocks run with fused attention, on transformers' own `CLIPEncoderLayer` weights.

Crane needs the intermediate quantities of CLIP's blocks (q, k, v, the pre-norm input), so the towers are run
layer by layer here instead of through `CLIPVisionModel.forward`. The arithmetic is CLIP's: pre-LayerNorm,
multi-head attention with scale head_dim^-0.5, output projection, residual, LayerNorm, MLP, residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import QuickGELUActivation


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, C] -> [B, H, N, C/H]."""
    batch, tokens, channels = x.shape
    return x.view(batch, tokens, num_heads, channels // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> [B, N, H*d]."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def project_qkv(layer: nn.Module, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head q, k, v [B, H, N, d] of the normalized block input ``u`` [B, N, C] (biases included)."""
    attn = layer.self_attn
    return (
        split_heads(attn.q_proj(u), attn.num_heads),
        split_heads(attn.k_proj(u), attn.num_heads),
        split_heads(attn.v_proj(u), attn.num_heads),
    )


def clip_mlp(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP, fc2(act(fc1(x))), on x [B, N, C].

    When no gradient is recorded, CLIP's QuickGELU, x * sigmoid(1.702 x), is applied in place: the same values
    with one [B, N, I] buffer instead of three (a lower memory peak, fewer large allocations).
    """
    mlp = layer.mlp
    hidden = mlp.fc1(x)
    if hidden.requires_grad or not isinstance(mlp.activation_fn, QuickGELUActivation):
        return mlp.fc2(mlp.activation_fn(hidden))
    gate = torch.sigmoid_(1.702 * hidden)
    return mlp.fc2(hidden.mul_(gate))


def clip_block(layer: nn.Module, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """One ordinary CLIP encoder block on x [B, N, C]: x + Attn(LN1(x)), then + MLP(LN2(.))."""
    q, k, v = project_qkv(layer, layer.layer_norm1(x))
    attended = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    x = x + layer.self_attn.out_proj(merge_heads(attended))
    return x + clip_mlp(layer, layer.layer_norm2(x))
