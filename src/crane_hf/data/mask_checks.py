"""Ground-truth masks that are almost always data errors, found and named (never silently counted).

Three kinds, for anomalous images with a mask file (decoded by `mask_to_binary`, the one rule for masks):

- "empty_mask": the mask marks no pixel (an all-zero file, often a mask saved in the wrong channel or the wrong
  file). The pixel metrics count the image's pixels as all normal.
- "mask_vanishes": the mask marks pixels, but none is left at the S x S size the pixel metrics are computed at
  (resized bilinearly and binarized at 0.5, spec section 1): a defect under about one pixel of S x S.
- "full_mask": the mask marks every pixel (often an inverted mask, or the image saved as its mask). The pixel
  metrics count the image's pixels as all anomalous.

Neither the spec nor the published evaluation leaves such images out: `crane-hf evaluate` keeps them in the metrics,
as the published code does, and names them in one warning line per kind and in `metrics.json` ("warnings"). The
dataset loaders find empty and full masks when asked to decode every file (`verify_images=True`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SHOWN_FILES = 20  # files named in one warning line; the count gives the rest

MASK_PROBLEMS = {
    "empty_mask": (
        "anomalous image(s) have a mask that marks no pixel",
        "their pixels count as normal in the pixel metrics (as the published evaluation counts them)",
    ),
    "mask_vanishes": (
        "anomalous image(s) have a mask whose pixels all vanish at the metrics' size",
        "their pixels count as normal in the pixel metrics (as the published evaluation counts them)",
    ),
    "full_mask": (
        "mask(s) mark every pixel as anomalous",
        "their pixels count as anomalous in the pixel metrics (as the published evaluation counts them)",
    ),
}


class SuspiciousMaskWarning(UserWarning):
    """Masks of one kind of `MASK_PROBLEMS`, named in one line.

    Attributes:
        kind: "empty_mask", "mask_vanishes" or "full_mask".
        files: every mask file of that kind (the message names the first `SHOWN_FILES`).
    """

    def __init__(self, message: str, kind: str, files: Sequence[str]):
        super().__init__(message)
        self.kind = kind
        self.files = list(files)


def shown_files(files: Sequence[str], limit: int = SHOWN_FILES) -> str:
    """The first `limit` of `files`, comma-separated, and how many more there are ("a, b and 3 more")."""
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(files[:limit]) + more


def full_size_mask_problem(binary: np.ndarray) -> str | None:
    """ "empty_mask" or "full_mask" for a decoded bool mask [H, W] of an anomalous image, else None."""
    if not binary.any():
        return "empty_mask"
    return "full_mask" if binary.all() else None


def mask_problem(encoded_mask: Mapping[str, Any] | None, processed: Any) -> str | None:
    """The kind of `MASK_PROBLEMS` of an anomalous image's mask, else None.

    Args:
        encoded_mask: the undecoded mask (`{"path", "bytes"}`, a `datasets.Image(decode=False)` value) or None when
            the image has no mask (image-level data: not a problem here).
        processed: the mask at S x S, {0, 1} (numpy array or tensor), as `CraneImageProcessor` made it. Only when it
            is all 0 or all 1 is the file decoded again, to tell the kinds apart.
    """
    if encoded_mask is None:
        return None
    processed = np.asarray(processed)
    if processed.any() and not processed.all():
        return None
    from ..models.crane.image_processing_crane import mask_to_binary
    from ..models.crane.image_reading import read_encoded_image

    found = full_size_mask_problem(mask_to_binary(read_encoded_image(encoded_mask)))
    if found is None and not processed.any():
        return "mask_vanishes"
    return found


def mask_problem_warnings(
    found: Mapping[str, Sequence[str]], what: str, size: int | None = None
) -> list[SuspiciousMaskWarning]:
    """One `SuspiciousMaskWarning` per kind with files in `found` (kind -> mask files), in `MASK_PROBLEMS` order;
    `what` names the data ("evaluate", "dataset ROOT split test"), `size` the metrics' S."""
    result = []
    for kind, (problem, consequence) in MASK_PROBLEMS.items():
        files = list(found.get(kind, ()))
        if not files:
            continue
        where = f" ({size} x {size})" if kind == "mask_vanishes" and size else ""
        message = f"{what}: {len(files)} {problem}{where}; {consequence}: {shown_files(files)}"
        result.append(SuspiciousMaskWarning(message, kind, files))
    return result


__all__ = [
    "MASK_PROBLEMS",
    "SuspiciousMaskWarning",
    "full_size_mask_problem",
    "mask_problem",
    "mask_problem_warnings",
    "shown_files",
]
