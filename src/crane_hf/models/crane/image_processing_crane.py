"""CraneImageProcessor: images and masks in, model inputs out; anomaly maps back to each image (spec section 1).

Images: converted to RGB, resized to S x S with PIL's bicubic filter (no crop, aspect ratio not kept), scaled to
[0, 1] and normalized with CLIP's mean and std, exactly as the official code does for 8-bit RGB images.
Other inputs are converted first (documented in docs/architecture.md):

- gray, palette, CMYK, YCbCr and gray+alpha images: PIL's conversion to RGB; RGBA: alpha dropped (PIL's rule);
- 16-bit and 32-bit integer images (PIL "I;16"/"I", numpy uint16/int32): scaled by their type's maximum to
  [0, 1] and resized in floating point; float images and arrays must hold values in [0, 1] (an error names the
  range found otherwise; rescale first), NaN and infinities are refused;
- numpy arrays and torch tensors: [H, W], [H, W, C] or [C, H, W] with C in {1, 3, 4};
- PIL images: the EXIF orientation is applied first; multi-frame images (animated GIF, multi-page TIFF) are refused.

Masks (`mask_to_binary`), one rule for files, PIL images and arrays: a pixel is anomalous where any channel is
non-zero, palette resolved to its colours and alpha included; an alpha channel with the same value at every pixel
(e.g. fully opaque) draws nothing and is ignored, so that an opaque black-and-white RGBA mask is not all anomalous.
Masks stored in a lossy format (JPEG) carry compression noise around the edges: they are binarised at mid-range
instead (a value above half the type's maximum, 127 of 255), with a `LossyMaskWarning`. Then resized bilinearly
to S x S and binarized at 0.5.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .configuration_crane import MAX_IMAGE_SIZE
from .gaussian_smoothing import MAX_SMOOTHING_SIGMA, gaussian_smooth
from .image_reading import check_single_frame, read_image, read_image_url, upright
from .json_reading import DuplicateJSONKeyError, check_json_file

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | str (a local path or URL)
FLOAT_RANGE_TOLERANCE = 1e-3  # float images slightly outside [0, 1] from resampling are clipped, not refused
LOSSY_MASK_FORMATS = ("JPEG", "MPO", "JPEG2000")  # masks in these file formats are binarised at mid-range


def is_lossy_image(image: Image.Image) -> bool:
    """Whether a decoded image came from a lossy file: JPEG (MPO), JPEG 2000, or WebP holding lossy VP8 data
    (`image_reading` records it as `info["lossless"]`; a WebP image of unknown origin counts as lossy)."""
    if image.format == "WEBP":
        return not image.info.get("lossless", False)
    return image.format in LOSSY_MASK_FORMATS


class LossyMaskWarning(UserWarning):
    """Masks stored in a lossy format (JPEG) were binarised at mid-range; `files` names them."""

    def __init__(self, message: str, files: Sequence[str] = ()):
        super().__init__(message)
        self.files = list(files)


def _channels_last(array: np.ndarray, what: str) -> np.ndarray:
    """[H, W], [H, W, C] or [C, H, W] (C in 1, 3, 4) -> [H, W, C]."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"{what} must have 2 or 3 dimensions ([H, W], [H, W, C] or [C, H, W]), got {array.shape}.")
    if array.shape[-1] in (1, 3, 4):
        return array
    if array.shape[0] in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    raise ValueError(f"{what} has shape {array.shape}: expected 1, 3 or 4 channels first or last.")


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 [H, W, 3] for 8-bit images; float32 [H, W, 3] in [0, 1] for 16/32-bit and float images."""
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image).astype(np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) <= 65535 else 2**31 - 1
        return np.repeat((array / scale).clip(0, 1).astype(np.float32)[:, :, None], 3, axis=2)
    if image.mode == "F":
        array = _unit_range(np.asarray(image, dtype=np.float32), "float image")
        return np.repeat(array[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def _unit_range(array: np.ndarray, what: str) -> np.ndarray:
    """Float pixels as float32 in [0, 1]; NaN, infinities and values outside [0, 1] are refused."""
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains NaN or infinite values.")
    low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
    if low < -FLOAT_RANGE_TOLERANCE or high > 1.0 + FLOAT_RANGE_TOLERANCE:
        raise ValueError(
            f"{what} has values in [{low:.6g}, {high:.6g}]; float images must lie in [0, 1] "
            "(divide 8-bit data by 255, or normalize your data first)."
        )
    return array.astype(np.float32).clip(0, 1)


def image_to_rgb_array(image: ImageLike) -> np.ndarray:
    """An image as RGB [H, W, 3]: uint8 for 8-bit inputs, float32 in [0, 1] otherwise."""
    if isinstance(image, str):
        image = read_image_url(image) if image.startswith(("http://", "https://")) else read_image(image)
    if isinstance(image, Image.Image):
        check_single_frame(image, "image")
        return _pil_to_array(upright(image))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"Unsupported image type {type(image).__name__}; pass a PIL image, numpy array or tensor.")
    array = _channels_last(image, "image array")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.integer):
        maximum = 65535.0 if array.dtype in (np.uint16, np.int16) else float(np.iinfo(array.dtype).max)
        array = (array.astype(np.float64) / maximum).clip(0, 1).astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating):
        array = _unit_range(array, "image array")
    else:
        raise TypeError(f"Unsupported image array dtype {array.dtype}.")
    channels = array.shape[-1]
    if channels == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 4:
        array = array[:, :, :3]
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image has an empty side: {array.shape[:2]}.")
    return np.ascontiguousarray(array)


def resize_rgb(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of RGB [H, W, 3] to (height, width) with PIL; returns float32 in [0, 1]."""
    height, width = size
    if array.dtype == np.uint8:
        resized = Image.fromarray(array, mode="RGB").resize((width, height), Image.Resampling.BICUBIC)
        return np.asarray(resized, dtype=np.float32) / 255.0
    channels = [
        np.asarray(Image.fromarray(array[:, :, c], mode="F").resize((width, height), Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return np.stack(channels, axis=-1).clip(0, 1).astype(np.float32)


def _mask_channels(mask: Image.Image) -> tuple[np.ndarray, bool]:
    """The channels of a PIL mask, [H, W] or [H, W, C], and whether the last one is alpha (palette resolved)."""
    mode = mask.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        return np.asarray(mask), False
    if mode in ("LA", "RGBA", "RGB", "CMYK"):  # CMYK: its ink channels (no ink, white, is normal)
        return np.asarray(mask), mode in ("LA", "RGBA")
    if mode == "P" and "transparency" not in mask.info:
        return np.asarray(mask.convert("RGB")), False
    if mode in ("P", "PA", "La", "RGBa"):
        return np.asarray(mask.convert("RGBA")), True
    return np.asarray(mask.convert("RGB")), False  # YCbCr, LAB, HSV: their colours (black is normal)


def mask_to_binary(mask: ImageLike, lossy: bool | None = None, name: str = "mask") -> np.ndarray:
    """A ground-truth mask as bool [H, W] (the rule in the module docstring).

    Args:
        mask: a PIL image, a file path, or an array / tensor [H, W], [H, W, C] or [C, H, W] (C in 1, 3, 4; with 4
            channels the last is alpha).
        lossy: binarise at mid-range (compression noise) instead of at zero; default: whether the PIL image (or
            file) is in a lossy format (JPEG). The caller warns (see `CraneImageProcessor.preprocess`).
        name: what error messages call the mask.

    Raises:
        ValueError: a mask that is not 2-D after decoding, with NaN or infinite values, multi-frame, or lossy with
            non-zero values that never exceed mid-range (noise cannot be told from a defect).
    """
    if isinstance(mask, str):
        mask = read_image(mask)
    has_alpha = False
    if isinstance(mask, Image.Image):
        check_single_frame(mask, name)
        mask = upright(mask)
        lossy = is_lossy_image(mask) if lossy is None else lossy
        array, has_alpha = _mask_channels(mask)
    else:
        array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if array.ndim == 3:
            array = _channels_last(array, f"{name} array")
            has_alpha = array.shape[-1] == 4
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2-D array, got shape {array.shape}.")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    if has_alpha and array.size and array[..., -1].min() == array[..., -1].max():
        array = array[..., :-1]  # a constant alpha channel (e.g. fully opaque) draws nothing
    level = 0
    if lossy and np.issubdtype(array.dtype, np.integer):
        level = np.iinfo(array.dtype).max // 2  # mid-range: 127 of 255
    elif lossy:
        level = 0.5
    binary = array > level
    if binary.ndim == 3:
        binary = binary.any(axis=-1)
    if lossy and not binary.any() and (array > 0).any():
        raise ValueError(
            f"{name} is stored in a lossy format and has non-zero values, but none above mid-range (maximum "
            f"{array.max()}, mid-range {level}): compression noise cannot be told from a defect; save masks as PNG."
        )
    return binary


def resize_mask(binary: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a binary mask to (height, width), binarized at 0.5; float32 {0, 1}."""
    height, width = size
    image = Image.fromarray(binary.astype(np.uint8) * 255, mode="L")
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return (resized > 0.5).astype(np.float32)


def _checked_image_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 < value <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer in [1, {MAX_IMAGE_SIZE}], got {value!r}.")
    return int(value)


def _checked_channels(name: str, values: Any, positive: bool) -> list[float]:
    """Three finite per-channel numbers (RGB); positive ones for a standard deviation."""
    valid = isinstance(values, (list, tuple)) and len(values) == 3
    valid = valid and all(not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) for v in values)
    if not valid or (positive and min(values) <= 0):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise ValueError(f"{name} must be 3 {kind} (R, G, B), got {values!r}.")
    return [float(v) for v in values]


class CraneImageProcessor(BaseImageProcessor):
    r"""Image processor of Crane.

    Args:
        image_size (`int`): side S of the square model input. Paper: 518.
        image_mean, image_std (`list[float]`): normalization (CLIP's by default).
        smoothing_sigma (`float`): default Gaussian sigma of `post_process_anomaly_maps`. Paper: 4.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 518,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        smoothing_sigma: float = 4.0,
        **kwargs: Any,
    ):
        kwargs.pop("size", None)
        super().__init__(**kwargs)
        self.image_size = _checked_image_size(image_size)
        self.image_mean = _checked_channels("image_mean", image_mean, positive=False)
        self.image_std = _checked_channels("image_std", image_std, positive=True)
        if (
            isinstance(smoothing_sigma, bool)
            or not isinstance(smoothing_sigma, numbers.Real)
            or not 0 <= smoothing_sigma <= MAX_SMOOTHING_SIGMA
        ):
            limit = f"{MAX_SMOOTHING_SIGMA:g}"
            raise ValueError(f"smoothing_sigma must be a number in [0, {limit}], got {smoothing_sigma!r}.")
        self.smoothing_sigma = float(smoothing_sigma)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """`BaseImageProcessor.from_pretrained`; invalid values raise `ValueError` naming the file and the field, a
        local preprocessor_config.json repeating a key `DuplicateJSONKeyError` naming the file and the key."""
        local = os.path.join(os.fspath(pretrained_model_name_or_path), "preprocessor_config.json")
        if os.path.isfile(local):
            check_json_file(local)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except DuplicateJSONKeyError:
            raise
        except (ValueError, TypeError) as error:
            source = os.path.join(os.fspath(pretrained_model_name_or_path), "preprocessor_config.json")
            raise ValueError(f"{source}: {error}") from error

    @classmethod
    def from_crane_config(cls, config: Any) -> CraneImageProcessor:
        """The processor matching a `CraneConfig` (input size, CLIP normalization, smoothing sigma)."""
        return cls(
            image_size=config.image_size,
            image_mean=config.clip_image_mean,
            image_std=config.clip_image_std,
            smoothing_sigma=config.smoothing_sigma,
        )

    def preprocess(
        self,
        images: ImageLike | list[ImageLike],
        masks: ImageLike | list[ImageLike | None] | None = None,
        image_size: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Prepare images (and optional masks) for the model.

        Returns a `BatchFeature` with `pixel_values` [B, 3, S, S], `original_sizes` [B, 2] (height, width) and, when
        `masks` is given, `masks` [B, S, S] in {0, 1} (a `None` mask means a normal image: all zeros).
        """
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if not images:
            raise ValueError("No images to process.")
        size = int(image_size or self.image_size)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        pixel_values, original_sizes = [], []
        for image in images:
            rgb = image_to_rgb_array(image)
            original_sizes.append(rgb.shape[:2])
            pixel_values.append(((resize_rgb(rgb, (size, size)) - mean) / std).transpose(2, 0, 1))
        data: dict[str, Any] = {
            "pixel_values": np.stack(pixel_values).astype(np.float32),
            "original_sizes": np.asarray(original_sizes, dtype=np.int64),
        }
        if masks is not None:
            masks = [masks] if single else list(masks)
            if len(masks) != len(images):
                raise ValueError(f"Got {len(images)} images but {len(masks)} masks.")
            processed, lossy_masks = [], []
            for index, (mask, (height, width)) in enumerate(zip(masks, original_sizes)):
                if mask is None:
                    processed.append(np.zeros((size, size), dtype=np.float32))
                    continue
                if isinstance(mask, Image.Image) and is_lossy_image(mask):
                    lossy_masks.append(index)
                binary = mask_to_binary(mask, name=f"mask {index}")
                if binary.shape != (height, width):
                    raise ValueError(
                        f"mask {index} has size {binary.shape[1]}x{binary.shape[0]} but its image is {width}x{height}."
                    )
                processed.append(resize_mask(binary, (size, size)))
            data["masks"] = np.stack(processed)
            if lossy_masks:
                warnings.warn(
                    LossyMaskWarning(
                        f"masks {lossy_masks} are stored in a lossy format (JPEG, JPEG 2000, lossy WebP); "
                        "binarised at mid-range.",
                        [str(index) for index in lossy_masks],
                    ),
                    stacklevel=2,
                )
        return BatchFeature(data=data, tensor_type=return_tensors)

    def post_process_anomaly_maps(
        self,
        maps: torch.Tensor,
        sigma: float | None = 4.0,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Smooth anomaly maps [B, S, S] (Gaussian, scipy's rule) and resize each back to its original size.

        Args:
            maps: `anomaly_maps` of the model output.
            sigma: Gaussian sigma in pixels of the S x S map; `None` or 0 skips smoothing.
            target_sizes: (height, width) per map, e.g. the processor's `original_sizes`; `None` keeps S x S.

        Returns:
            float32 maps: a tensor [B, S, S] without `target_sizes`, else a list of [height, width] tensors.
        """
        if maps.dim() != 3:
            raise ValueError(f"maps must have shape [batch, height, width], got {list(maps.shape)}.")
        maps = maps.float()
        if sigma:
            maps = gaussian_smooth(maps, sigma)
        if target_sizes is None:
            return maps
        if len(target_sizes) != maps.shape[0]:
            raise ValueError(f"Got {maps.shape[0]} maps but {len(target_sizes)} target sizes.")
        sizes = [tuple(int(v) for v in target) for target in target_sizes]
        resized: list[torch.Tensor] = [maps[index] for index in range(maps.shape[0])]
        for size in set(sizes):  # one interpolation per distinct size: batched, on the maps' device
            if size == tuple(maps.shape[-2:]):
                continue
            indices = [index for index, other in enumerate(sizes) if other == size]
            batch = F.interpolate(maps[indices].unsqueeze(1), size=size, mode="bilinear", align_corners=False)
            for index, anomaly_map in zip(indices, batch[:, 0]):
                resized[index] = anomaly_map
        return resized


__all__ = ["CraneImageProcessor"]
