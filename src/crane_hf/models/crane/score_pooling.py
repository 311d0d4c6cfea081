"""Score-based pooling: the image feature from the patches the model finds anomalous (spec section 5).

Fbar = mean over maps of the normalized patch features               [B, N, D]
w_n  = softmax(mean over maps of the patch logits)[n, anomalous]     [B, N]
g    = normalize(sum_n w_n Fbar_n)
image feature = normalize(alpha * g + (1 - alpha) * c)               (c: normalized global embedding)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .reproducibility import per_sample


def mean_over_maps(values: torch.Tensor, map_counts: Sequence[int] | None = None) -> torch.Tensor:
    """Mean over the leading (map) axis of `values` [M, ...], map m counted `map_counts[m]` times.

    One computed map that stands for several configured maps (`CraneConfig.map_slots`) is weighted by how many it
    stands for, which equals the plain mean over the configured maps. Without counts (or all 1): `values.mean(0)`.
    """
    if map_counts is None or all(count == 1 for count in map_counts):
        return values.mean(dim=0)
    if len(map_counts) != values.shape[0]:
        raise ValueError(f"map_counts has {len(map_counts)} entries for {values.shape[0]} maps.")
    if len(map_counts) == 1:
        return values[0]
    weights = values.new_tensor(map_counts).view(-1, *([1] * (values.dim() - 1)))
    return (values * weights).sum(dim=0) / sum(map_counts)


def score_based_pooling(
    patch_features: torch.Tensor,
    patch_logits: torch.Tensor,
    global_embeds: torch.Tensor,
    alpha: float,
    map_counts: Sequence[int] | None = None,
) -> torch.Tensor:
    """Normalized image features [B, D].

    Args:
        patch_features: normalized patch features of every map, [M, B, N, D].
        patch_logits: patch logits of every map, [M, B, N, 2].
        global_embeds: normalized global image embeddings, [B, D].
        alpha: weight of the pooled feature against the global embedding.
        map_counts: how many configured maps each map stands for (`mean_over_maps`); default once each.
    """
    mean_features = mean_over_maps(patch_features, map_counts)
    weights = mean_over_maps(patch_logits, map_counts).softmax(dim=-1)[..., 1:]
    # A sum over the patches of each image, image by image so that the batch cannot change its bits.
    pooled = F.normalize(per_sample(lambda f, w: (f * w).sum(dim=1), mean_features, weights), dim=-1)
    return F.normalize(alpha * pooled + (1.0 - alpha) * global_embeds, dim=-1)
