"""Checking and converting metric inputs (numpy arrays, torch tensors or nested lists) to numpy arrays.

Every error names the argument and the problem (shape, dtype or value), so bad data never reaches the metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(value: Any, name: str) -> np.ndarray:
    """Convert `value` to a numpy array without importing torch (tensors are detached and moved to the CPU).

    bfloat16 tensors, which numpy cannot hold, become float32 (exactly).
    """
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return tensor.numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} could not be converted to a numpy array: {error}") from error
    return array


def _check_numeric(array: np.ndarray, name: str) -> None:
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers (bool, int or float), got dtype {array.dtype}.")


def _check_finite(array: np.ndarray, name: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = "NaN" if np.isnan(array).any() else "infinite"
        raise ValueError(f"{name} contains {bad} values; all values must be finite numbers.")


def _check_binary(array: np.ndarray, name: str) -> np.ndarray:
    """Return `array` as bool after checking that it only holds 0 and 1."""
    if array.dtype == np.bool_:
        return array
    if not np.isin(array, (0, 1)).all():
        values = np.unique(array[~np.isin(array, (0, 1))])[:5]
        raise ValueError(f"{name} must be binary (only 0 and 1), found other values such as {values.tolist()}.")
    return array.astype(bool)


def validate_image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check image-level inputs; returns labels as bool [N] and scores as given [N] (numeric, finite)."""
    labels_array = to_numpy(labels, "labels")
    scores_array = to_numpy(scores, "scores")
    _check_numeric(labels_array, "labels")
    _check_numeric(scores_array, "scores")
    if labels_array.ndim != 1:
        raise ValueError(f"labels must be a 1-D array [N], got shape {tuple(labels_array.shape)}.")
    if scores_array.ndim != 1:
        raise ValueError(f"scores must be a 1-D array [N], got shape {tuple(scores_array.shape)}.")
    if len(labels_array) != len(scores_array):
        raise ValueError(
            f"labels and scores must have the same length, got {len(labels_array)} labels "
            f"and {len(scores_array)} scores."
        )
    _check_finite(labels_array, "labels")
    _check_finite(scores_array, "scores")
    return _check_binary(labels_array, "labels"), scores_array


def validate_pixel_inputs(masks: Any, maps: Any, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Check pixel-level inputs; returns masks as bool [N,H,W] and maps as given [N,H,W] (numeric, finite)."""
    if (masks is None) != (maps is None):
        missing, given = ("masks", "maps") if masks is None else ("maps", "masks")
        raise ValueError(f"{given} was given without {missing}; pixel metrics need both masks and maps.")
    masks_array = to_numpy(masks, "masks")
    maps_array = to_numpy(maps, "maps")
    _check_numeric(masks_array, "masks")
    _check_numeric(maps_array, "maps")
    for name, array in (("masks", masks_array), ("maps", maps_array)):
        if array.ndim != 3:
            hint = " (squeeze the channel axis of [N,1,H,W] arrays)" if array.ndim == 4 else ""
            raise ValueError(f"{name} must be a 3-D array [N,H,W]{hint}, got shape {tuple(array.shape)}.")
        if array.shape[0] != num_images:
            raise ValueError(
                f"{name} must have one [H,W] map per image: {num_images} labels but {name} has shape "
                f"{tuple(array.shape)}."
            )
    if masks_array.shape != maps_array.shape:
        raise ValueError(
            f"masks and maps must have the same shape, got {tuple(masks_array.shape)} and {tuple(maps_array.shape)}."
        )
    _check_finite(masks_array, "masks")
    _check_finite(maps_array, "maps")
    return _check_binary(masks_array, "masks"), maps_array
