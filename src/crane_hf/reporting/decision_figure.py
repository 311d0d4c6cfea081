"""Decision figures a person can read: image | anomaly map with a colour bar | decision, with the verdict written on.

    figure = decision_figure(image, anomaly_map, score=0.71, image_threshold=0.5, pixel_threshold=0.6,
                             name="coins/test/scratch/000.png")
    save_decision_figure("000.png.png", image, anomaly_map, ...)   # or render_decision_figure(...) -> PIL image

The panels:
1. the image as given;
2. the anomaly map in the "inferno" colour map with a colour bar; the colour scale is the absolute pixel score [0, 1]
   by default, so colours compare across images, or (`color_scale="image"`) stretched to this map's range, which the
   panel's title then states; the pixel threshold is marked on the colour bar;
3. the decision: the image in grey, the pixels whose score is at or above the pixel threshold tinted red and the
   threshold's contour in yellow, titled with the fraction of such pixels. "At or above" is exact, as `crane-hf
   predict` and the pipeline compare: float32 scores widened to float64, the threshold not rounded to float32.
The title holds the file name, the verdict (score >= image threshold: ANOMALOUS, else OK), the score and the image
threshold.

matplotlib draws on its Agg canvas directly (`matplotlib.figure.Figure`, no pyplot state), so figures render on
machines without a display and from several threads. This module imports only numpy, Pillow and matplotlib (no
other part of crane_hf): the Gradio app copies it into a Hugging Face Space as it is.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

COLOR_SCALES = ("absolute", "image")
COLOR_MAP = "inferno"
ANOMALOUS_COLOR = "#c62828"
NORMAL_COLOR = "#2e7d32"
CONTOUR_COLOR = "#ffd600"
PIXEL_TINT = (0.95, 0.1, 0.1, 0.55)  # RGBA of the pixels at or above the pixel threshold
_DISPLAY_PIXELS = 640  # longest side drawn in a panel; larger images and maps are resampled before plotting
_NAME_CHARACTERS = 90  # longer names are shortened in the middle


def verdict(score: float, image_threshold: float) -> str:
    """Returns "ANOMALOUS" when `score >= image_threshold` (the pipeline's `is_anomalous`), else "OK"."""
    return "ANOMALOUS" if score >= image_threshold else "OK"


def decision_digits(score: float, image_threshold: float, digits: int = 3) -> int:
    """Decimal places (at least `digits`) at which `score` and `image_threshold`, both written with them, agree with
    the verdict: a score below the threshold is never written equal to it (0.49996 at 0.5 is "0.49996", not "0.500",
    which a reader applying score >= threshold would call anomalous). Rounding keeps order, so a score at or above
    the threshold is never written below it."""
    score, image_threshold = float(score), float(image_threshold)
    while digits < 17 and score < image_threshold and f"{score:.{digits}f}" == f"{image_threshold:.{digits}f}":
        digits += 1
    return digits


def display_rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a PIL image as the pipeline scores it (`CraneImageProcessor`), for showing it: the EXIF
    orientation applied; 16-bit and 32-bit integer images ("I;16", "I") scaled by 65535 (or 2**31 - 1 when a value
    exceeds 65535) and float images ("F", values in [0, 1]) by 1, then to 8 bits, rather than clipped by
    `convert("RGB")` (which shows most 16-bit images white); other modes (palette, grey, RGBA...) by `convert("RGB")`.
    """
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            values = values / (
                65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else 2**31 - 1
            )
        gray = (np.nan_to_num(values).clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def _rgb_uint8(image: Any) -> np.ndarray:
    """RGB uint8 [H, W, 3] from a PIL image or a uint8 [H, W] / [H, W, 3|4] array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or a uint8 array, got an array of {array.dtype}.")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return array[:, :, :3]
    raise ValueError(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {array.shape}.")


def at_or_above(values: np.ndarray, threshold: float) -> np.ndarray:
    """`values >= threshold` on float64 copies of the values, so that a float32 map is not compared with the
    threshold rounded to float32 (NumPy's rule for a Python float beside a float32 array); the same comparison as
    `crane_hf.models.crane.thresholds.at_or_above`, which this module cannot import (a Space copies it alone)."""
    return np.asarray(values, dtype=np.float64) >= float(threshold)


def _check_unit(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number.") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} must be a finite number in [0, 1].")
    return value


def _short_name(name: str) -> str:
    if len(name) <= _NAME_CHARACTERS:
        return name
    keep = (_NAME_CHARACTERS - 3) // 2
    return f"{name[:keep]}...{name[-keep:]}"


def _display_copies(rgb: np.ndarray, anomaly_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image (bicubic) and the map (bilinear) resampled so that their longest side is at most _DISPLAY_PIXELS."""
    height, width = anomaly_map.shape
    scale = _DISPLAY_PIXELS / max(height, width)
    if scale >= 1.0:
        return rgb, anomaly_map
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small_rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))
    small_map = np.asarray(Image.fromarray(anomaly_map, mode="F").resize(size, Image.Resampling.BILINEAR))
    return small_rgb, small_map


def _figure_layout(height: int, width: int, panel_inches: float, dpi: int) -> tuple[Figure, list[Any]]:
    """A figure on an Agg canvas with the image, map, colour bar and decision axes placed by hand (in inches).

    Placing the axes directly costs a fraction of matplotlib's constrained layout, which matters at one figure per
    scored image."""
    panel_width = panel_inches * min(max(width / height, 0.8), 1.6)  # titles need room; imshow letterboxes
    margin, gap, bar_gap, bar_width, bar_labels, title, header = 0.08, 0.12, 0.08, 0.16, 0.85, 0.32, 0.62
    total_width = 2 * margin + 3 * panel_width + gap + bar_gap + bar_width + bar_labels
    total_height = margin + panel_inches + title + header
    figure = Figure(figsize=(total_width, total_height), dpi=dpi)
    FigureCanvasAgg(figure)
    lefts = [margin, margin + panel_width + gap, total_width - margin - panel_width]
    bar_left = lefts[1] + panel_width + bar_gap

    def rect(left: float, width_inches: float, height_inches: float = panel_inches) -> list[float]:
        bottom = margin + (panel_inches - height_inches) / 2
        return [left / total_width, bottom / total_height, width_inches / total_width, height_inches / total_height]

    axes = [figure.add_axes(rect(left, panel_width)) for left in lefts]
    for item in axes:
        item.set_xticks([])
        item.set_yticks([])
    bar_axes = figure.add_axes(rect(bar_left, bar_width, 0.9 * panel_inches))
    return figure, [axes[0], axes[1], bar_axes, axes[2]]


def decision_figure(
    image: Any,
    anomaly_map: Any,
    *,
    score: float,
    image_threshold: float,
    pixel_threshold: float,
    name: str,
    color_scale: str = "absolute",
    panel_inches: float = 3.2,
    dpi: int = 100,
) -> Figure:
    """The three-panel figure of one scored image (see the module docstring).

    Args:
        image: PIL image or uint8 array [H, W] / [H, W, 3] / [H, W, 4] (alpha dropped), the scored image.
        anomaly_map: float array [H, W] of pixel scores in [0, 1] at the image's size (the pipeline's `anomaly_map`).
        score: image anomaly score in [0, 1]; image_threshold: decision threshold on it, in [0, 1].
        pixel_threshold: threshold of the decision panel, in [0, 1].
        name: shown in the title (a file name, keep its folder and extension so that the figure says what it shows).
        color_scale: "absolute" (colours span [0, 1]) or "image" (colours span this map's minimum to maximum).
        panel_inches, dpi: panel height in inches and resolution; the default makes a figure of about 1100 x 420
            pixels for a square image.

    Returns:
        a `matplotlib.figure.Figure` on an Agg canvas; its title (`figure.get_suptitle()`) holds the name, verdict,
        score and image threshold.

    Raises:
        ValueError: a map that is not 2-D, holds NaN or infinity, or differs in size from the image; a score or
            threshold that is not a finite number in [0, 1]; an unknown `color_scale`.
    """
    if color_scale not in COLOR_SCALES:
        raise ValueError(f"color_scale must be one of {COLOR_SCALES}, got {color_scale!r}.")
    score = _check_unit("score", score)
    image_threshold = _check_unit("image_threshold", image_threshold)
    pixel_threshold = _check_unit("pixel_threshold", pixel_threshold)
    rgb = _rgb_uint8(image)
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D [H, W], got shape {values.shape}.")
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: the anomaly map holds NaN or infinite values; nothing is drawn from it.")
    if rgb.shape[:2] != values.shape:
        raise ValueError(
            f"{name}: the image is {rgb.shape[1]}x{rgb.shape[0]} but the map is {values.shape[1]}x{values.shape[0]}."
        )
    fraction = float(at_or_above(values, pixel_threshold).mean())
    low, high = float(values.min()), float(values.max())
    shown_rgb, shown_map = _display_copies(rgb, values)

    figure, (image_axes, map_axes, bar_axes, decision_axes) = _figure_layout(*shown_map.shape, panel_inches, dpi)

    image_axes.imshow(shown_rgb, interpolation="antialiased")
    image_axes.set_title(f"image ({rgb.shape[1]} x {rgb.shape[0]})", fontsize=10)

    if color_scale == "absolute":
        vmin, vmax, scale_text = 0.0, 1.0, "absolute scale 0-1"
    else:
        vmin, vmax = low, high if high > low else low + 1e-6
        scale_text = f"stretched to {low:.3f}-{high:.3f}"
    heat = map_axes.imshow(shown_map, cmap=COLOR_MAP, vmin=vmin, vmax=vmax, interpolation="antialiased")
    map_axes.set_title(f"anomaly map ({scale_text})", fontsize=10)
    bar = figure.colorbar(heat, cax=bar_axes)
    bar.ax.tick_params(labelsize=8)
    marked = vmin <= pixel_threshold <= vmax
    if marked:
        bar.ax.axhline(pixel_threshold, color=CONTOUR_COLOR, linewidth=2.5)
    bar.set_label(
        f"pixel score ({'yellow line: ' if marked else ''}pixel threshold {pixel_threshold:.3f})", fontsize=8
    )

    gray = shown_rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    decision_axes.imshow(gray, cmap="gray", vmin=0.0, vmax=255.0, interpolation="antialiased")
    above = at_or_above(shown_map, pixel_threshold)
    tint = np.zeros((*above.shape, 4), dtype=np.float32)
    tint[above] = PIXEL_TINT
    decision_axes.imshow(tint, interpolation="nearest")
    if min(shown_map.shape) >= 2 and shown_map.min() < pixel_threshold <= shown_map.max():  # contour needs 2 x 2
        decision_axes.contour(shown_map, levels=[pixel_threshold], colors=[CONTOUR_COLOR], linewidths=1.2)
    decision_axes.set_title(f"pixels >= {pixel_threshold:.3f}: {100 * fraction:.1f}%", fontsize=10)

    decided = verdict(score, image_threshold)
    digits = decision_digits(score, image_threshold)
    figure.suptitle(
        f"{_short_name(name)}\n{decided}   score {score:.{digits}f}   (image threshold {image_threshold:.{digits}f})",
        color=ANOMALOUS_COLOR if decided == "ANOMALOUS" else NORMAL_COLOR,
        fontsize=12,
        fontweight="bold",
        parse_math=False,  # a file name is text: "$x^2$" is not mathematics, and "$\\bad$" would raise
        y=1.0 - 0.06 / figure.get_figheight(),
        va="top",
    )
    return figure


def figure_to_image(figure: Figure) -> Image.Image:
    """The figure drawn on its Agg canvas, as an RGB PIL image."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[:, :, :3].copy(), mode="RGB")


def render_decision_figure(image: Any, anomaly_map: Any, **kwargs: Any) -> Image.Image:
    """`decision_figure(image, anomaly_map, **kwargs)` as an RGB PIL image."""
    return figure_to_image(decision_figure(image, anomaly_map, **kwargs))


def save_decision_figure(path: str | os.PathLike, image: Any, anomaly_map: Any, **kwargs: Any) -> None:
    """`decision_figure(image, anomaly_map, **kwargs)` written to `path` as PNG.

    The PNG's text chunks repeat what the figure says, for programs: "Source" (the name), "Verdict", "Score",
    "Image threshold", "Pixel threshold", "Image size" ("WxH" of the scored image) and "Color scale"."""
    from PIL.PngImagePlugin import PngInfo

    figure = decision_figure(image, anomaly_map, **kwargs)
    height, width = np.asarray(anomaly_map).shape[-2:]
    info = PngInfo()
    for key, value in (
        ("Source", kwargs["name"]),
        ("Verdict", verdict(float(kwargs["score"]), float(kwargs["image_threshold"]))),
        ("Score", repr(float(kwargs["score"]))),  # unrounded: a program re-deriving the verdict gets this one
        ("Image threshold", repr(float(kwargs["image_threshold"]))),
        ("Pixel threshold", repr(float(kwargs["pixel_threshold"]))),
        ("Image size", f"{width}x{height}"),
        ("Color scale", kwargs.get("color_scale", "absolute")),
    ):
        info.add_itxt(key, str(value))
    figure_to_image(figure).save(path, format="PNG", pnginfo=info)
