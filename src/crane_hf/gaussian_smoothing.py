"""Gaussian smoothing of anomaly maps on the maps' own device, equal to `scipy.ndimage.gaussian_filter`.

scipy's defaults are reproduced: a separable kernel of radius int(truncate * sigma + 0.5) with truncate = 4 and
"reflect" borders (d c b a | a b c d | d c b a), which torch's padding modes do not offer, so borders are built
with an index gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def gaussian_smooth(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Smooth maps [..., H, W] with a Gaussian of `sigma` pixels; returns the same shape, float32 or float64."""
    if sigma <= 0:
        return maps
    dtype = maps.dtype if maps.dtype in (torch.float32, torch.float64) else torch.float32
    shape = maps.shape
    x = maps.to(dtype).reshape(-1, 1, shape[-2], shape[-1])
    kernel = gaussian_kernel1d(sigma, truncate, dtype).to(maps.device)
    radius = kernel.numel() // 2
    x = x.index_select(-1, _reflect_indices(shape[-1], radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = x.index_select(-2, _reflect_indices(shape[-2], radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.reshape(shape)
