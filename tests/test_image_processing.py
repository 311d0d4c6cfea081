"""CraneImageProcessor: spec section 1 for images and masks, and post-processing of anomaly maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from transformers import AutoImageProcessor

from crane_hf import CraneConfig, CraneImageProcessor

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _rgb(height=40, width=60, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _official(image: Image.Image, size: int) -> np.ndarray:
    """The official transform: PIL bicubic resize to S x S, convert('RGB'), /255, CLIP normalization."""
    resized = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB"), dtype=np.float32)
    return ((resized / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def test_rgb_image_matches_the_official_transform():
    processor = CraneImageProcessor(image_size=56)
    image = Image.fromarray(_rgb())
    out = processor(image)
    assert out["pixel_values"].shape == (1, 3, 56, 56) and out["pixel_values"].dtype == torch.float32
    assert np.allclose(out["pixel_values"][0].numpy(), _official(image, 56), atol=1e-6)
    assert out["original_sizes"].tolist() == [[40, 60]]


def test_grayscale_matches_resizing_then_converting_as_the_official_code_does():
    gray = Image.fromarray(_rgb()[:, :, 0], mode="L")
    out = CraneImageProcessor(image_size=28)(gray)["pixel_values"][0].numpy()
    assert np.allclose(out, _official(gray, 28), atol=1e-6)


@pytest.mark.parametrize("layout", ["hwc", "chw", "tensor"])
def test_numpy_and_tensor_inputs_equal_the_pil_path(layout):
    array = _rgb()
    data = {"hwc": array, "chw": array.transpose(2, 0, 1), "tensor": torch.from_numpy(array.transpose(2, 0, 1))}[
        layout
    ]
    processor = CraneImageProcessor(image_size=28)
    assert torch.equal(processor(data)["pixel_values"], processor(Image.fromarray(array))["pixel_values"])


def test_rgba_drops_alpha_and_palette_is_converted():
    rgba = np.concatenate([_rgb(), np.full((40, 60, 1), 7, np.uint8)], axis=2)
    processor = CraneImageProcessor(image_size=28)
    expected = processor(Image.fromarray(_rgb()))["pixel_values"]
    assert torch.equal(processor(Image.fromarray(rgba, mode="RGBA"))["pixel_values"], expected)
    assert torch.equal(processor(rgba)["pixel_values"], expected)
    palette = Image.fromarray(_rgb()).convert("P")
    assert processor(palette)["pixel_values"].shape == (1, 3, 28, 28)


def test_sixteen_bit_images_keep_their_precision():
    values = np.linspace(0, 65535, 40 * 60).reshape(40, 60).astype(np.uint16)
    processor = CraneImageProcessor(image_size=20)
    from_array = processor(values)["pixel_values"]
    from_pil = processor(Image.fromarray(values))["pixel_values"]
    eight_bit = processor((values // 257).astype(np.uint8))["pixel_values"]
    assert torch.allclose(from_array, from_pil, atol=1e-5)
    assert torch.allclose(from_array, eight_bit, atol=0.02)  # same picture, finer steps
    assert len(torch.unique(from_array)) > len(torch.unique(eight_bit))


def test_float_images_must_be_in_unit_range():
    rows, cols = np.mgrid[0:30, 0:50] / 80.0
    array = np.stack([rows + cols, 1 - cols, rows], axis=-1).astype(np.float32)  # smooth picture in [0, 1]
    processor = CraneImageProcessor(image_size=28)
    out = processor(array)["pixel_values"]
    assert torch.allclose(out, processor((array * 255).round().astype(np.uint8))["pixel_values"], atol=0.02)
    with pytest.raises(ValueError, match=r"values in \[0, 255\]; float images must lie in \[0, 1\]"):
        processor(array * 255)
    nearly = processor(array * 1.0005)["pixel_values"]  # resampling overshoot is tolerated and clipped
    assert (
        torch.allclose(nearly, out, atol=0.01) and nearly.max() <= processor(np.ones_like(array))["pixel_values"].max()
    )
    with pytest.raises(ValueError, match="float image has values"):
        processor(Image.fromarray(array[:, :, 0] * 300, mode="F"))
    with pytest.raises(ValueError, match="NaN"):
        processor(np.full((10, 10, 3), np.nan, np.float32))


@pytest.mark.parametrize(("shape", "match"), [((10, 10, 2), "channels"), ((2, 3, 10, 10), "dimensions")])
def test_bad_array_shapes_are_refused(shape, match):
    with pytest.raises(ValueError, match=match):
        CraneImageProcessor(image_size=28)(np.zeros(shape, np.uint8))


def test_masks_are_binarized_resized_bilinearly_and_thresholded_at_half():
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 20:41] = 3  # any value > 0 is anomalous
    processor = CraneImageProcessor(image_size=28)
    out = processor([_rgb(), _rgb(seed=1)], masks=[mask, None])
    masks = out["masks"].numpy()
    assert masks.shape == (2, 28, 28)
    assert set(np.unique(masks)) <= {0.0, 1.0}
    assert masks[1].sum() == 0
    reference = Image.fromarray((mask > 0).astype(np.uint8) * 255).resize((28, 28), Image.Resampling.BILINEAR)
    assert np.array_equal(masks[0], (np.asarray(reference) / 255.0 > 0.5).astype(np.float32))


def test_mask_of_another_size_is_refused_with_its_index():
    with pytest.raises(ValueError, match="mask 0 has size 30x30 but its image is 60x40"):
        CraneImageProcessor(image_size=28)(_rgb(), masks=np.zeros((30, 30), np.uint8))


def test_post_processing_smooths_like_scipy_and_resizes_to_each_original_size():
    processor = CraneImageProcessor(image_size=56)
    maps = torch.rand(2, 56, 56, generator=torch.Generator().manual_seed(0))
    smoothed = processor.post_process_anomaly_maps(maps, sigma=4.0)
    expected = np.stack([gaussian_filter(m, sigma=4) for m in maps.numpy()])
    assert np.allclose(smoothed.numpy(), expected, atol=1e-5)
    resized = processor.post_process_anomaly_maps(maps, sigma=4.0, target_sizes=[(40, 60), (56, 56)])
    assert resized[0].shape == (40, 60) and resized[1].shape == (56, 56)
    assert torch.allclose(resized[1], smoothed[1])
    unsmoothed = processor.post_process_anomaly_maps(maps, sigma=None)
    assert torch.equal(unsmoothed, maps)


def test_post_processing_resizes_maps_of_equal_target_size_together_like_one_at_a_time():
    processor = CraneImageProcessor(image_size=56)
    maps = torch.rand(4, 56, 56, generator=torch.Generator().manual_seed(1))
    sizes = [(40, 60), (56, 56), (40, 60), (17, 90)]
    resized = processor.post_process_anomaly_maps(maps, sigma=None, target_sizes=torch.tensor(sizes))
    for anomaly_map, size, result in zip(maps, sizes, resized):
        alone = torch.nn.functional.interpolate(anomaly_map[None, None], size=size, mode="bilinear")[0, 0]
        assert result.shape == size and torch.equal(result, alone)


def test_save_and_load_through_auto_image_processor(tmp_path):
    processor = CraneImageProcessor.from_crane_config(CraneConfig(image_size=336, smoothing_sigma=2.0))
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, CraneImageProcessor)
    assert (loaded.image_size, loaded.smoothing_sigma) == (336, 2.0)
    assert loaded.image_mean == processor.image_mean
