"""Heatmap overlays: an anomaly map blended on its image, with the decision threshold's contour.

Pure numpy and PIL (no plotting library), so the pipeline can render overlays wherever it runs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .thresholds import at_or_above

# Control points of a perceptually ordered dark-blue -> cyan -> yellow -> red colormap (value, R, G, B).
_COLORMAP_POINTS = np.array(
    [
        [0.00, 0.05, 0.03, 0.35],
        [0.25, 0.05, 0.45, 0.85],
        [0.50, 0.20, 0.85, 0.75],
        [0.75, 0.98, 0.85, 0.15],
        [1.00, 0.85, 0.05, 0.05],
    ]
)
CONTOUR_COLOR = (255, 255, 255)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] [H, W] to RGB uint8 [H, W, 3] (values outside are clipped)."""
    clipped = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
    channels = [np.interp(clipped, _COLORMAP_POINTS[:, 0], _COLORMAP_POINTS[:, c]) for c in (1, 2, 3)]
    return (np.stack(channels, axis=-1) * 255.0 + 0.5).astype(np.uint8)


def threshold_contour(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean [H, W]: pixels at or above `threshold` (`thresholds.at_or_above`) that touch a pixel below it
    (4-neighbourhood)."""
    inside = at_or_above(anomaly_map, threshold)
    padded = np.pad(inside, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside & ~interior


def render_overlay(
    image: Image.Image | np.ndarray, anomaly_map: np.ndarray, threshold: float | None = None, alpha: float = 0.5
) -> Image.Image:
    """The image with the colorized map blended at `alpha` and, if given, the threshold contour in white.

    Args:
        image: RGB image (PIL or uint8 array [H, W, 3]) of the same size as `anomaly_map`.
        anomaly_map: float map [H, W] in [0, 1].
        threshold: pixel threshold whose contour is drawn.
    """
    base = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if base.dtype != np.uint8 or base.ndim != 3 or base.shape[2] != 3:
        raise ValueError(f"image must be RGB uint8 [H, W, 3], got {base.dtype} {base.shape}.")
    if base.shape[:2] != anomaly_map.shape:
        raise ValueError(
            f"image is {base.shape[1]}x{base.shape[0]} but the map is {anomaly_map.shape[1]}x{anomaly_map.shape[0]}."
        )
    blended = (1.0 - alpha) * base.astype(np.float32) + alpha * colorize(anomaly_map).astype(np.float32)
    out = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    if threshold is not None:
        out[threshold_contour(anomaly_map, threshold)] = CONTOUR_COLOR
    return Image.fromarray(out, mode="RGB")
