"""Gaussian smoothing of anomaly maps on the maps' own device, equal to `scipy.ndimage.gaussian_filter`.

scipy's defaults are reproduced: a separable kernel of radius int(truncate * sigma + 0.5) with truncate = 4 and
"reflect" borders (d c b a | a b c d | d c b a), which torch's padding modes do not offer, so borders are built
with an index gather.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Largest sigma accepted (pixels of the S x S map, S <= 2048): its kernel spans 2 * 4 * 256 + 1 = 2049 pixels.
MAX_SMOOTHING_SIGMA = 256.0


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized 1-D Gaussian weights [2r + 1] with r = int(truncate * sigma + 0.5)."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).to(dtype)


def _reflect_indices(length: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-`length` axis padded by `radius` on both sides with scipy's "reflect" rule."""
    positions = torch.arange(-radius, length + radius, device=device) % (2 * length)
    return torch.where(positions >= length, 2 * length - 1 - positions, positions)


def _smooth_rows(rows: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate each row of `rows` [R, L] with `kernel` [2r + 1] under scipy's "reflect" rule: [R, L].

    One depthwise (grouped) 1-D convolution for all rows; far faster on the CPU than a one-channel 2-D convolution.
    """
    count, length = rows.shape
    padded = rows.index_select(-1, _reflect_indices(length, kernel.numel() // 2, rows.device))
    if torch.compiler.is_exporting():  # an exported graph's row count follows its dynamic batch: rows as the batch
        return F.conv1d(padded.unsqueeze(1), kernel.view(1, 1, -1))[:, 0]
    weight = kernel.view(1, 1, -1).expand(count, 1, -1).contiguous()
    return F.conv1d(padded.unsqueeze(0), weight, groups=count)[0]


def gaussian_smooth(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Smooth maps [..., H, W] with a Gaussian of `sigma` pixels; returns the same shape, float32 or float64.

    Separable: every row, then every column, of every map in one batched call each (no per-map loop). Raises
    `ValueError` for a sigma that is not finite or exceeds `MAX_SMOOTHING_SIGMA` (before allocating anything).
    """
    if not math.isfinite(sigma) or sigma > MAX_SMOOTHING_SIGMA:
        raise ValueError(f"smoothing sigma {sigma} must be finite and at most {MAX_SMOOTHING_SIGMA:g}.")
    if sigma <= 0:
        return maps
    dtype = maps.dtype if maps.dtype in (torch.float32, torch.float64) else torch.float32
    shape = maps.shape
    height, width = shape[-2], shape[-1]
    kernel = gaussian_kernel1d(sigma, truncate, dtype).to(maps.device)
    x = _smooth_rows(maps.to(dtype).reshape(-1, width), kernel).view(-1, height, width)
    x = _smooth_rows(x.transpose(1, 2).reshape(-1, height), kernel).view(-1, width, height)
    return x.transpose(1, 2).reshape(shape)
