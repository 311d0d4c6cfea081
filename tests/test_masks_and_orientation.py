"""Masks are read by one rule whatever their encoding (files, PIL images, arrays), lossy masks are binarised at
mid-range with a warning, EXIF orientation is applied to images and masks whichever way they arrive, and
multi-frame images are refused by name everywhere."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import threading
import warnings

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from crane_hf import CraneImageProcessor
from crane_hf.commands.cli import main
from crane_hf.data import LossyMaskWarning, SuspiciousMaskWarning, load_anomaly_dataset
from crane_hf.models.crane.image_processing_crane import mask_to_binary
from crane_hf.models.crane.image_reading import image_file_size, read_image, read_image_bytes
from crane_hf.training.data_loading import ProcessedImages

from .image_files import write_image

SIZE = (20, 16)  # width, height
DEFECT = (slice(3, 11), slice(5, 15))  # 8 x 10 = 80 pixels


def _defect(value, channels: int | None) -> np.ndarray:
    shape = (SIZE[1], SIZE[0]) if channels is None else (SIZE[1], SIZE[0], channels)
    array = np.zeros(shape, dtype=np.uint8)
    array[DEFECT] = value
    return array


def _palette_mask() -> Image.Image:
    image = Image.fromarray(_defect(1, None), mode="P")
    image.putpalette([0, 0, 0, 0, 0, 1] + [0] * 762)  # index 1 is the colour (0, 0, 1)
    return image


def _opaque_rgba(value) -> np.ndarray:
    array = _defect(value, 4)
    array[..., 3] = 255  # a fully opaque background: its alpha draws nothing
    return array


def _alpha_only() -> np.ndarray:
    array = np.zeros((SIZE[1], SIZE[0], 4), dtype=np.uint8)
    array[(*DEFECT, 3)] = 255  # drawn only in the alpha channel
    return array


def _la() -> np.ndarray:
    array = np.zeros((SIZE[1], SIZE[0], 2), dtype=np.uint8)
    array[..., 1] = 255
    array[(*DEFECT, 0)] = 3
    return array


MASKS = {  # name: (PIL image to save as PNG, or an array with its PIL mode)
    "rgb_100.png": lambda: Image.fromarray(_defect((1, 0, 0), 3)),
    "rgb_001.png": lambda: Image.fromarray(_defect((0, 0, 1), 3)),
    "rgba_0011_opaque.png": lambda: Image.fromarray(_opaque_rgba((0, 0, 1, 255)), "RGBA"),
    "rgba_alpha_only.png": lambda: Image.fromarray(_alpha_only(), "RGBA"),
    "palette_index1_is_001.png": _palette_mask,
    "gray_alpha.png": lambda: Image.fromarray(_la(), "LA"),
    "gray_1.png": lambda: Image.fromarray(_defect(1, None), "L"),
    "sixteen_bit.png": lambda: Image.fromarray(_defect(1, None).astype(np.uint16)),
    "one_bit.png": lambda: Image.fromarray(_defect(255, None)).convert("1"),
    "tiff_rgb.tif": lambda: Image.fromarray(_defect((0, 1, 0), 3)),
    "cmyk_ink.tif": lambda: Image.fromarray(_defect((0, 0, 0, 255), 4), "CMYK"),  # white paper, black ink
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_every_encoding_of_an_80_pixel_mask_reads_80_pixels(tmp_path, name):
    image = MASKS[name]()
    path = tmp_path / name
    image.save(path)
    expected = np.zeros((SIZE[1], SIZE[0]), dtype=bool)
    expected[DEFECT] = True
    from_file = mask_to_binary(str(path))
    assert from_file.sum() == 80 and np.array_equal(from_file, expected)
    assert np.array_equal(mask_to_binary(Image.open(path)), expected)  # a PIL image as opened
    assert np.array_equal(mask_to_binary(read_image(str(path))), expected)  # as the batch commands decode it
    if image.mode in ("RGB", "RGBA", "L"):
        assert np.array_equal(mask_to_binary(np.asarray(image)), expected)  # the same mask as an array


def test_arrays_follow_the_same_rule_channels_first_and_alpha():
    assert mask_to_binary(np.moveaxis(_opaque_rgba((0, 0, 1, 255)), -1, 0)).sum() == 80
    assert mask_to_binary(_alpha_only()).sum() == 80
    assert mask_to_binary(np.zeros((4, 4, 4), dtype=np.uint8) + np.uint8(255)).sum() == 16  # white opaque: all
    faint = np.zeros((SIZE[1], SIZE[0]), dtype=np.float32)
    faint[DEFECT] = 0.01
    assert mask_to_binary(faint).sum() == 80


def test_the_dataset_path_reads_the_same_mask(tmp_path):
    root = tmp_path / "data"
    for index in range(2):
        write_image(str(root / "part" / "test" / "good" / f"{index}.png"), SIZE)
    write_image(str(root / "part" / "test" / "stain" / "000.png"), SIZE)
    (root / "part" / "ground_truth" / "stain").mkdir(parents=True)
    _palette_mask().save(root / "part" / "ground_truth" / "stain" / "000_mask.png")
    dataset = load_anomaly_dataset(str(root), "test")
    processor = CraneImageProcessor(image_size=SIZE[0] * 2)
    item = ProcessedImages(dataset, processor)[[row["label"] for row in dataset].index(1)]
    expected = processor([np.zeros((SIZE[1], SIZE[0], 3), np.uint8)], masks=[_defect(255, None)])["masks"][0]
    assert item["masks"].sum() > 0 and np.array_equal(item["masks"].numpy(), expected.numpy())


def _jpeg_mask(path) -> np.ndarray:
    """An irregular defect (a disc and a bar) saved as JPEG; returns the true binary mask."""
    yy, xx = np.mgrid[:64, :64]
    truth = ((yy - 30) ** 2 + (xx - 27) ** 2 < 13**2) | ((yy > 50) & (yy < 54) & (xx > 5) & (xx < 60))
    Image.fromarray((truth * 255).astype(np.uint8)).save(path, quality=75)
    return truth


def test_jpeg_masks_are_binarised_at_mid_range_with_a_warning(tmp_path):
    path = tmp_path / "mask.jpg"
    truth = _jpeg_mask(path)
    decoded = np.asarray(Image.open(path))
    assert (decoded > 0).sum() > 1.3 * truth.sum()  # compression noise: "any value > 0" would grow the defect
    binary = mask_to_binary(str(path))
    assert abs(int(binary.sum()) - int(truth.sum())) <= 0.05 * truth.sum()
    assert (binary & truth).sum() / (binary | truth).sum() > 0.95
    processor = CraneImageProcessor(image_size=64)
    with pytest.warns(LossyMaskWarning, match="lossy"):
        processor([np.zeros((64, 64, 3), np.uint8)], masks=[Image.open(path)])


def test_a_lossy_mask_with_values_only_below_mid_range_is_refused(tmp_path):
    path = tmp_path / "faint.jpg"
    array = np.zeros((32, 32), np.uint8)
    array[5:20, 7:25] = 3
    Image.fromarray(array).save(path, quality=95)
    with pytest.raises(ValueError, match="none above mid-range"):
        mask_to_binary(str(path))


def test_loaders_and_evaluate_name_the_lossy_masks(tmp_path, tiny_model_dir, capsys):
    root = tmp_path / "data"
    write_image(str(root / "part" / "test" / "good" / "0.png"), (64, 64))
    write_image(str(root / "part" / "test" / "stain" / "000.png"), (64, 64))
    (root / "part" / "ground_truth" / "stain").mkdir(parents=True)
    mask_path = root / "part" / "ground_truth" / "stain" / "000_mask.jpg"
    _jpeg_mask(mask_path)
    with pytest.warns(LossyMaskWarning) as caught:
        load_anomaly_dataset(str(root), "test")
    assert [str(mask_path)] == [f for w in caught for f in w.message.files]
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_model_dir, "--data", str(root), "--output", str(out), "--quiet"]) == 0
    assert str(mask_path) in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["lossy_masks"] == [str(mask_path)]


def test_loaders_verifying_images_name_empty_and_full_masks_once_per_kind(tmp_path):
    root = tmp_path / "data"
    for index in range(2):
        write_image(str(root / "part" / "test" / "good" / f"{index}.png"), SIZE)
    truth = root / "part" / "ground_truth"
    masks = {
        "blue": _defect((0, 0, 1, 255), 4),  # a defect in the blue channel, opaque: not empty (any channel counts)
        "black": np.dstack([np.zeros((SIZE[1], SIZE[0], 3), np.uint8), np.full((SIZE[1], SIZE[0]), 255, np.uint8)]),
        "blank": np.zeros((SIZE[1], SIZE[0]), np.uint8),
        "inverted": np.full((SIZE[1], SIZE[0]), 255, np.uint8),
    }
    for name, array in masks.items():
        write_image(str(root / "part" / "test" / name / "000.png"), SIZE)
        (truth / name).mkdir(parents=True)
        Image.fromarray(array).save(truth / name / "000_mask.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(load_anomaly_dataset(str(root), "test")) == 6
    assert not [w for w in caught if isinstance(w.message, SuspiciousMaskWarning)]  # headers only: nothing decoded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(load_anomaly_dataset(str(root), "test", verify_images=True)) == 6  # kept, as published
    found = [w.message for w in caught if isinstance(w.message, SuspiciousMaskWarning)]
    black, blank, inverted = (str(truth / name / "000_mask.png") for name in ("black", "blank", "inverted"))
    assert [(w.kind, w.files) for w in found] == [("empty_mask", [black, blank]), ("full_mask", [inverted])]
    assert str(found[0]).endswith(
        "2 anomalous image(s) have a mask that marks no pixel; their pixels count as normal in the pixel metrics (as "
        f"the published evaluation counts them): {black}, {blank}"
    )
    assert str(found[1]).endswith(
        f"1 mask(s) mark every pixel as anomalous; their pixels count as anomalous in the "
        f"pixel metrics (as the published evaluation counts them): {inverted}"
    )


# ------------------------------------------------------------------ EXIF orientation


def _rotated_jpeg(path, orientation: int = 6) -> np.ndarray:
    """A square JPEG with a bright defect in the top-left corner of its stored pixels and an EXIF orientation; returns
    the stored pixels as any JPEG decoder gives them."""
    pixels = np.full((48, 48, 3), 90, dtype=np.uint8)
    pixels[4:16, 4:20] = 250
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as stored:
        return np.asarray(stored.convert("RGB"))


def test_exif_orientation_is_applied_to_files_and_bytes(tmp_path):
    path = tmp_path / "photo.jpg"
    stored = _rotated_jpeg(path, orientation=6)  # 6: display rotated 90 degrees clockwise
    upright = np.rot90(stored, k=-1)
    assert np.array_equal(np.asarray(read_image(str(path))), upright)
    assert np.array_equal(np.asarray(read_image_bytes(path.read_bytes(), "photo")), upright)
    non_square = tmp_path / "wide.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8  # rotated 90 degrees: 40 x 10 stored, 10 x 40 displayed
    Image.new("RGB", (40, 10)).save(non_square, exif=exif.tobytes())
    assert image_file_size(str(non_square)) == (10, 40) and read_image(str(non_square)).size == (10, 40)


def test_exif_oriented_image_and_its_mask_overlap_in_a_dataset(tmp_path):
    root = tmp_path / "data"
    (root / "part" / "test" / "good").mkdir(parents=True)
    (root / "part" / "test" / "dent").mkdir(parents=True)
    (root / "part" / "ground_truth" / "dent").mkdir(parents=True)
    write_image(str(root / "part" / "test" / "good" / "0.png"), (48, 48))
    stored = _rotated_jpeg(root / "part" / "test" / "dent" / "000.jpg", orientation=6)
    upright = np.rot90(stored, k=-1)
    mask = (upright.mean(axis=-1) > 200).astype(np.uint8) * 255  # drawn on the picture as it is displayed
    Image.fromarray(mask).save(root / "part" / "ground_truth" / "dent" / "000_mask.png")
    dataset = load_anomaly_dataset(str(root), "test")
    processor = CraneImageProcessor(image_size=48)
    item = ProcessedImages(dataset, processor)[[row["label"] for row in dataset].index(1)]
    bright = item["pixel_values"].mean(dim=0) > 1.0  # the defect, normalized
    masked = item["masks"] > 0
    assert (bright & masked).sum() / (bright | masked).sum() > 0.9  # IoU was 0.0 when only the mask was upright


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    """(folder, base URL) of a local HTTP server serving `folder`."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_same_picture_gives_the_same_map_by_path_bytes_url_and_pil(served, tiny_model_dir):
    folder, url = served
    path = folder / "photo.jpg"
    _rotated_jpeg(path, orientation=6)
    deep = folder / "deep.png"
    Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16)).save(deep)  # 16-bit
    detector = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir)
    results = [
        detector(str(path)),
        detector(path.read_bytes()),
        detector(f"{url}/photo.jpg"),
        detector(Image.open(path)),
        detector(read_image(str(path))),
    ]
    reference = results[0]
    assert reference["anomaly_map"].shape == (48, 48)
    for other in results[1:]:
        assert np.array_equal(other["anomaly_map"], reference["anomaly_map"]) and other["score"] == reference["score"]
    by_path, by_url = detector(str(deep)), detector(f"{url}/deep.png")
    assert np.array_equal(by_path["anomaly_map"], by_url["anomaly_map"]) and by_path["score"] == by_url["score"]
    with pytest.raises(ValueError, match="could not be downloaded"):
        detector(f"{url}/missing.png")


# ------------------------------------------------------------------ multi-frame images


def _animated_gif(path, frames: int = 3) -> None:
    images = [Image.new("RGB", (12, 10), (40 * i, 20, 20)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=50, loop=0)


def _multipage_tiff(path, pages: int = 3) -> None:
    images = [Image.new("L", (12, 10), 30 * i) for i in range(pages)]
    images[0].save(path, save_all=True, append_images=images[1:])


@pytest.mark.parametrize(("name", "make"), [("anim.gif", _animated_gif), ("pages.tif", _multipage_tiff)])
def test_multi_frame_images_are_refused_by_name(tmp_path, tiny_model_dir, served, name, make):
    path = tmp_path / "imgs" / name
    path.parent.mkdir()
    make(path)
    Image.new("RGB", (12, 10), (1, 2, 3)).save(tmp_path / "imgs" / "single.gif")  # one frame: fine
    with pytest.raises(ValueError, match=rf"{name}: refused, a multi-frame image \(3 frames"):
        read_image(str(path))
    detector = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir)
    with pytest.raises(ValueError, match="multi-frame"):
        detector(str(path))
    with pytest.raises(ValueError, match="multi-frame"), Image.open(path) as opened:
        detector(opened)
    with pytest.raises(ValueError, match="multi-frame"):
        detector(path.read_bytes())
    shutil.copy(path, served[0] / name)
    with pytest.raises(ValueError, match=rf"{served[1]}/{name}: refused, a multi-frame image"):
        detector(f"{served[1]}/{name}")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "imgs"), "--model", tiny_model_dir, "--output", str(out), "--quiet"]) == 3
    summary = json.loads((out / "predictions.json").read_text())
    assert [row["path"].rsplit("/", 1)[-1] for row in summary["predictions"]] == ["single.gif"]
    assert summary["skipped"][0]["path"] == str(path) and "multi-frame" in summary["skipped"][0]["reason"]


def test_multi_frame_images_in_a_dataset_are_reported(tmp_path, tiny_model_dir):
    root = tmp_path / "data"
    write_image(str(root / "part" / "test" / "good" / "0.png"), (12, 10))
    (root / "part" / "test" / "good" / "1.gif").parent.mkdir(parents=True, exist_ok=True)
    _animated_gif(root / "part" / "test" / "good" / "1.gif")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"1\.gif: refused, a multi-frame image"):
            load_anomaly_dataset(str(root), "test")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_model_dir, "--data", str(root), "--output", str(out), "--quiet"]) == 3
    skipped = (out / "skipped.txt").read_text()
    assert "1.gif" in skipped and "multi-frame" in skipped


def test_mpo_files_are_read_as_their_primary_image(tmp_path):
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (16, 12), (200, 10, 10)), Image.new("RGB", (16, 12), (10, 200, 10))]
    frames[0].save(buffer, "MPO", save_all=True, append_images=frames[1:])
    image = read_image_bytes(buffer.getvalue(), "camera.mpo")
    assert image.size == (16, 12) and np.asarray(image)[6, 8, 0] > 150


def _irregular_defect() -> np.ndarray:
    yy, xx = np.mgrid[:64, :64]
    return ((yy - 30) ** 2 + (xx - 27) ** 2 < 13**2) | ((yy > 50) & (yy < 54) & (xx > 5) & (xx < 60))


@pytest.mark.parametrize(("lossless", "mode"), [(False, "L"), (False, "RGBA"), (True, "L")])
def test_webp_masks_are_cut_at_mid_range_when_lossy_only(tmp_path, lossless, mode):
    path = tmp_path / "mask.webp"
    truth = _irregular_defect()
    image = Image.fromarray((truth * 255).astype(np.uint8)).convert(mode)
    if mode == "RGBA":  # a varying alpha makes an extended (VP8X) file with ALPH and VP8 chunks
        image.putalpha(Image.fromarray(np.where(truth, 255, 0).astype(np.uint8)))
    image.save(path, "WEBP", lossless=lossless, quality=60)
    with open(path, "rb") as stream:
        chunks = stream.read(64)
    assert (b"VP8L" in chunks) == lossless and (b"VP8X" in chunks) == (mode == "RGBA")
    decoded = np.asarray(Image.open(path).convert("RGBA" if mode == "RGBA" else "L"))
    channels = decoded  # every channel, alpha included, counts
    expected = (channels > 0) if lossless else (channels > 127)
    expected = expected.any(axis=-1) if expected.ndim == 3 else expected
    if not lossless and mode == "L":
        assert (channels > 0).reshape(64, 64, -1).any(-1).sum() > expected.sum()  # noise a zero cut would keep
    assert np.array_equal(mask_to_binary(str(path)), expected)
    processor = CraneImageProcessor(image_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        processor([np.zeros((64, 64, 3), np.uint8)], masks=[read_image(str(path))])
    assert any(isinstance(w.message, LossyMaskWarning) for w in caught) == (not lossless)


def test_loaders_name_lossy_webp_masks_only(tmp_path):
    root = tmp_path / "data"
    write_image(str(root / "part" / "test" / "good" / "0.png"), (64, 64))
    (root / "part" / "ground_truth" / "stain").mkdir(parents=True)
    truth = Image.fromarray((_irregular_defect() * 255).astype(np.uint8))
    for index, lossless in ((0, False), (1, True)):
        write_image(str(root / "part" / "test" / "stain" / f"00{index}.png"), (64, 64))
        truth.save(root / "part" / "ground_truth" / "stain" / f"00{index}_mask.webp", "WEBP", lossless=lossless)
    with pytest.warns(LossyMaskWarning) as caught:
        load_anomaly_dataset(str(root), "test")
    named = [f for w in caught if isinstance(w.message, LossyMaskWarning) for f in w.message.files]
    assert named == [str(root / "part" / "ground_truth" / "stain" / "000_mask.webp")]
