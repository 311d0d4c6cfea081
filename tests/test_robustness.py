"""Bad inputs end to end (docs/robustness.md lists every case): a clear error naming the file and the problem,
or a documented conversion; batch commands finish, report the bad files and keep the good results."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from crane_hf import CraneImageProcessor
from crane_hf.cli import main
from crane_hf.data import DatasetLayoutError, InvalidRecordWarning, generate_synthetic_dataset, load_anomaly_dataset
from crane_hf.image_files import read_image


def _png_header_only(path, width: int, height: int) -> None:
    """A tiny PNG file whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


GOOD_CASES = {
    "one_pixel.png": lambda p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p),
    "tall_1x300.png": lambda p: Image.new("RGB", (1, 300), (10, 200, 10)).save(p),
    "wide_300x1.png": lambda p: Image.new("RGB", (300, 1), (10, 10, 200)).save(p),
    "gray.png": lambda p: Image.fromarray(np.arange(0, 240, dtype=np.uint8).reshape(12, 20)).save(p),
    "rgba.png": lambda p: Image.new("RGBA", (20, 12), (50, 60, 70, 10)).save(p),
    "cmyk.jpg": lambda p: Image.new("CMYK", (20, 12), (10, 20, 30, 40)).save(p),
    "palette.png": lambda p: Image.new("RGB", (20, 12), (90, 30, 200)).convert("P").save(p),
    "sixteen_bit.png": lambda p: Image.fromarray((np.arange(240).reshape(12, 20) * 270).astype(np.uint16)).save(p),
    "float_unit.tif": lambda p: Image.fromarray(np.linspace(0, 1, 240, dtype=np.float32).reshape(12, 20), "F").save(p),
    "unicode défaut – ü.png": lambda p: Image.new("RGB", (20, 12), (1, 2, 3)).save(p),
}
BAD_CASES = {
    "zero_bytes.png": (lambda p: p.write_bytes(b""), "not a readable image file"),
    "truncated.png": (
        lambda p: p.write_bytes(_full_png()[: len(_full_png()) // 2]),
        "could not be decoded (image file is truncated)",
    ),
    "text.jpg": (lambda p: p.write_text("not an image"), "not a readable image file"),
    "bomb.png": (lambda p: _png_header_only(p, 30000, 30000), "too many pixels"),
    "float_out_of_range.tif": (
        lambda p: Image.fromarray(np.full((12, 20), 7.5, np.float32), "F").save(p),
        "float images must lie in [0, 1]",
    ),
}


def _full_png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("messy inputs")  # a space in the path
    for name, make in GOOD_CASES.items():
        make(folder / name)
    for name, (make, _) in BAD_CASES.items():
        make(folder / name)
    (folder / "empty subfolder").mkdir()
    return folder


def test_predict_finishes_reports_bad_files_and_scores_the_rest(tiny_model_dir, messy_folder, tmp_path):
    output = tmp_path / "results"
    started = time.perf_counter()
    code = main(
        [
            "predict",
            str(messy_folder),
            str(messy_folder / "empty subfolder"),
            "--model",
            tiny_model_dir,
            "--output",
            str(output),
            "--quiet",
        ]
    )
    assert code == 3
    assert time.perf_counter() - started < 120  # the bomb is refused from its header, never decoded
    summary = json.loads((output / "predictions.json").read_text())
    scored = {os.path.basename(row["path"]): row for row in summary["predictions"]}
    assert set(scored) == set(GOOD_CASES)
    for name, row in scored.items():
        overlay = Image.open(output / row["overlay"])
        assert overlay.size == Image.open(messy_folder / name).size, name
    skipped = {os.path.basename(item["path"]): item["reason"] for item in summary["skipped"]}
    assert skipped.pop("empty subfolder") == "folder holds no image files"
    assert set(skipped) == set(BAD_CASES)
    for name, (_, reason) in BAD_CASES.items():
        assert reason in skipped[name], (name, skipped[name])


def test_pipeline_errors_name_the_file_and_the_problem(tiny_model_dir, messy_folder):
    detector = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir)
    for name, (_, reason) in BAD_CASES.items():
        with pytest.raises(ValueError) as error:
            detector(str(messy_folder / name))
        assert name in str(error.value) and reason in str(error.value), name
    with pytest.raises(ValueError, match="no such image file"):
        detector(str(messy_folder / "missing.png"))
    result = detector(str(messy_folder / "unicode défaut – ü.png"))
    assert result["anomaly_map"].shape == (12, 20)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.full((8, 8, 3), np.nan, np.float32), "NaN or infinite"),
        (np.full((8, 8, 3), np.inf, np.float32), "NaN or infinite"),
        (np.zeros((8, 8, 2), np.uint8), "channels"),
        (np.zeros((1, 1, 8, 8, 3), np.uint8), "dimensions"),
        (np.zeros((0, 8, 3), np.uint8), "empty side"),
        (np.zeros((8, 8, 3), np.complex64), "dtype"),
    ],
)
def test_bad_arrays_are_refused_clearly(tiny_model_dir, array, match):
    detector = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir)
    with pytest.raises((ValueError, TypeError), match=match):
        detector(array)


def test_documented_conversions_of_arrays():
    processor = CraneImageProcessor(image_size=28)
    gray = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    assert processor(gray)["pixel_values"].shape == (1, 3, 28, 28)
    assert processor(gray.astype(bool))["pixel_values"].shape == (1, 3, 28, 28)
    assert processor(gray.astype(np.int32))["pixel_values"].isfinite().all()


def test_masks_of_another_size_and_non_binary_values():
    processor = CraneImageProcessor(image_size=28)
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match="mask 0 has size 10x10 but its image is 30x20"):
        processor(image, masks=np.zeros((10, 10), np.uint8))
    soft = np.zeros((20, 30), np.uint8)
    soft[5:15, 5:25] = 128  # any value > 0 is anomalous (documented)
    binary = (soft > 0).astype(np.uint8) * 255
    assert np.array_equal(processor(image, masks=soft)["masks"], processor(image, masks=binary)["masks"])


def test_meta_json_problems_are_reported_by_entry_and_skippable(tmp_path):
    root = generate_synthetic_dataset(
        str(tmp_path / "data"),
        classes=["brick"],
        image_size=32,
        train_good=0,
        test_good=2,
        test_defective=1,
        defects=["spot"],
    )
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    entries = meta["test"]["brick"]
    entries[0]["img_path"] = "brick/test/good/missing.png"
    entries[1]["img_path"] = "../outside.png"
    Image.new("L", (8, 8)).save(tmp_path / "data" / "brick" / "ground_truth" / "spot" / "000_mask.png")  # wrong size
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetLayoutError) as error:
        load_anomaly_dataset(root, "test")
    message = str(error.value)
    assert "image file not found" in message and "missing.png" in message
    assert "leaves the dataset root" in message and "../outside.png" in message
    assert "mask is 8x8 but its image is 32x32" in message
    with pytest.warns(InvalidRecordWarning):
        kept = load_anomaly_dataset(root, "test", skip_invalid=True)
    assert len(kept) == 0


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="refused"):
        read_image(str(tmp_path / "bomb.png"))
    assert time.perf_counter() - started < 2
    _png_header_only(tmp_path / "big.png", 5000, 5000)
    with pytest.raises(ValueError, match="exceeds the limit of 1,000,000"):
        read_image(str(tmp_path / "big.png"), max_pixels=1_000_000)
