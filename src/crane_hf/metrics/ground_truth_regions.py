"""Connected ground-truth regions of binary masks, as MVTec-AD's evaluation code defines them (8-connectivity)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 3 x 3 neighbourhood inside each image (8-connectivity, like MVTec-AD's `label(mask, np.ones((3, 3)))` and
# skimage.measure.label's default full connectivity), and no connection between consecutive images of a batch.
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


def positive_pixel_region_areas(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 8-connected regions of `masks` [B,H,W] (bool), each image on its own.

    Returns the area (pixel count) of the region of every positive pixel, in `masks[masks]` order [P], and the
    number of regions over the batch.
    """
    labeled, num_regions = ndimage.label(masks, structure=_EIGHT_CONNECTED_PER_IMAGE)
    if num_regions == 0:
        return np.empty(0, dtype=np.int64), 0
    region_labels = labeled[masks]
    areas = np.bincount(region_labels, minlength=num_regions + 1)
    return areas[region_labels].astype(np.int64), int(num_regions)
