"""Property-based tests of the image processor: random sizes, dtypes and value ranges never crash or give NaN."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from crane_hf import CraneImageProcessor

PROCESSOR = CraneImageProcessor(image_size=28)
SIZES = st.integers(min_value=1, max_value=64)
DTYPES = st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_])


@st.composite
def images(draw):
    height, width = draw(SIZES), draw(SIZES)
    channels = draw(st.sampled_from([None, 1, 3, 4]))
    dtype = np.dtype(draw(DTYPES))
    shape = (height, width) if channels is None else (height, width, channels)
    if draw(st.booleans()) and channels is not None:
        shape = (channels, height, width)
    if dtype.kind == "f":
        elements = st.floats(0.0, 1.0, width=32)
    elif dtype.kind == "b":
        elements = st.booleans()
    else:
        info = np.iinfo(dtype)
        elements = st.integers(max(info.min, 0), info.max)
    return draw(arrays(dtype, shape, elements=elements))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images())
def test_any_valid_image_gives_finite_pixel_values(image):
    out = PROCESSOR(image)
    pixels = out["pixel_values"]
    assert pixels.shape == (1, 3, 28, 28) and pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all()
    low = (0 - np.array(PROCESSOR.image_mean)) / np.array(PROCESSOR.image_std)
    high = (1 - np.array(PROCESSOR.image_mean)) / np.array(PROCESSOR.image_std)
    for channel in range(3):
        assert low[channel] - 1e-5 <= pixels[0, channel].min() and pixels[0, channel].max() <= high[channel] + 1e-5


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([np.uint8, np.uint16, np.float32, np.bool_]))
def test_any_mask_becomes_binary_at_the_model_size(height, width, dtype):
    rng = np.random.default_rng(height * 100 + width)
    mask = (rng.random((height, width)) > 0.7).astype(dtype)
    out = PROCESSOR(np.zeros((height, width, 3), np.uint8), masks=mask)
    assert out["masks"].shape == (1, 28, 28)
    assert set(torch.unique(out["masks"]).tolist()) <= {0.0, 1.0}


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 50), st.integers(1, 50), st.floats(0.0, 8.0))
def test_post_processing_keeps_maps_in_unit_range(height, width, sigma):
    maps = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(height + width))
    resized = PROCESSOR.post_process_anomaly_maps(maps, sigma=sigma, target_sizes=[(height, width)])[0]
    assert resized.shape == (height, width)
    assert torch.isfinite(resized).all() and resized.min() >= -1e-6 and resized.max() <= 1.0 + 1e-6
