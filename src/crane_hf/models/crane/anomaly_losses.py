"""Crane's training loss (spec section 6): 2 * focal + 2 * dice, summed over the maps, plus 0.2 * image CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LABEL_SMOOTHING = 1e-5


def focal_loss(probs: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean over pixels of -(1 - p_t)^gamma log p_t.

    Args:
        probs: two-channel probabilities [B, 2, H, W] (normal, anomalous).
        masks: binary ground truth [B, H, W].
    """
    one_hot = torch.stack([1.0 - masks, masks], dim=1).clamp(LABEL_SMOOTHING, 1.0 - LABEL_SMOOTHING)
    p_t = (one_hot * probs).sum(dim=1) + LABEL_SMOOTHING
    return (-((1.0 - p_t) ** gamma) * p_t.log()).mean()


def dice_loss(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Batch mean of 1 - (2 sum(q m) + 1) / (sum q + sum m + 1) with q = (1 - P_normal + P_anomalous) / 2."""
    q = ((1.0 - probs[:, 0] + probs[:, 1]) / 2.0).flatten(1)
    m = masks.flatten(1)
    dice = (2.0 * (q * m).sum(dim=1) + 1.0) / (q.sum(dim=1) + m.sum(dim=1) + 1.0)
    return (1.0 - dice).mean()


def patch_probabilities(patch_logits: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Softmax of patch logits [B, N, 2] as a nearest-upsampled map [B, 2, H, W] (the training-loss upsampling)."""
    probs = patch_logits.softmax(dim=-1).transpose(1, 2).reshape(patch_logits.shape[0], 2, *grid)
    return F.interpolate(probs, size=size, mode="nearest")


def crane_loss(
    patch_logits: list[torch.Tensor],
    grid: tuple[int, int],
    masks: torch.Tensor,
    image_logits: torch.Tensor,
    labels: torch.Tensor,
    focal_weight: float = 2.0,
    dice_weight: float = 2.0,
    image_weight: float = 0.2,
    map_counts: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Total loss and its components.

    Args:
        patch_logits: per-map patch logits, each [B, N, 2].
        grid: patch grid (gh, gw) with gh * gw = N.
        masks: binary masks [B, H, W].
        image_logits: image logits at the training temperature, [B, 2].
        labels: image labels [B] (0 normal, 1 anomalous).
        map_counts: how many configured maps each map stands for (`CraneConfig.map_slots`); its focal and dice
            terms count that often, as the same map repeated would. Default: once each.
    """
    size = tuple(masks.shape[-2:])
    focal = image_logits.new_zeros(())
    dice = image_logits.new_zeros(())
    counts = map_counts if map_counts is not None else [1] * len(patch_logits)
    if len(counts) != len(patch_logits):
        raise ValueError(f"map_counts has {len(counts)} entries for {len(patch_logits)} maps.")
    for logits, count in zip(patch_logits, counts):
        probs = patch_probabilities(logits.float(), grid, size)
        focal = focal + count * focal_loss(probs, masks)
        dice = dice + count * dice_loss(probs, masks)
    image_ce = F.cross_entropy(image_logits.float(), labels.long())
    total = focal_weight * focal + dice_weight * dice + image_weight * image_ce
    return {"loss": total, "focal_loss": focal, "dice_loss": dice, "image_loss": image_ce}
