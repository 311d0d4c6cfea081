"""Score-based pooling: the image feature from the patches the model finds anomalous (spec section 5).

Fbar = mean over maps of the normalized patch features               [B, N, D]
w_n  = softmax(mean over maps of the patch logits)[n, anomalous]     [B, N]
g    = normalize(sum_n w_n Fbar_n)
image feature = normalize(alpha * g + (1 - alpha) * c)               (c: normalized global embedding)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reproducibility import per_sample


def score_based_pooling(
    patch_features: torch.Tensor, patch_logits: torch.Tensor, global_embeds: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Normalized image features [B, D].

    Args:
        patch_features: normalized patch features of every map, [M, B, N, D].
        patch_logits: patch logits of every map, [M, B, N, 2].
        global_embeds: normalized global image embeddings, [B, D].
        alpha: weight of the pooled feature against the global embedding.
    """
    mean_features = patch_features.mean(dim=0)
    weights = patch_logits.mean(dim=0).softmax(dim=-1)[..., 1:]
    # A sum over the patches of each image, image by image so that the batch cannot change its bits.
    pooled = F.normalize(per_sample(lambda f, w: (f * w).sum(dim=1), mean_features, weights), dim=-1)
    return F.normalize(alpha * pooled + (1.0 - alpha) * global_embeds, dim=-1)
