"""Bad inputs end to end (docs/robustness.md lists every case): a clear error naming the file and the problem,
or a documented conversion; batch commands finish, report the bad files and keep the good results."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from crane_hf import CraneImageProcessor
from crane_hf.commands.cli import main
from crane_hf.data import DatasetLayoutError, InvalidRecordWarning, generate_synthetic_dataset, load_anomaly_dataset
from crane_hf.models.crane.image_reading import read_image


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
        figure = Image.open(output / row["overlay"])  # the decision figure says which image, of which size
        width, height = Image.open(messy_folder / name).size
        assert figure.text["Image size"] == f"{width}x{height}" and figure.text["Source"].endswith(name), name
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


# Bad files inside datasets: the loaders, `crane-hf evaluate` and the pipeline given a `datasets` column.


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory) -> str:
    """One class, 3 normal and 4 anomalous (2 defects) 32 x 32 test images with masks; MVTec layout + meta.json."""
    return generate_synthetic_dataset(
        str(tmp_path_factory.mktemp("datasets") / "clean"),
        classes=["brick"],
        defects=["spot", "scratch"],
        image_size=32,
        train_good=0,
        test_good=3,
        test_defective=2,
    )


def _copy(dataset: str, folder, layout: str = "meta.json") -> str:
    """A copy of `dataset`; `layout` "folders" removes the meta.json so that the class folders are read."""
    copy = shutil.copytree(dataset, folder / "data")
    if layout == "folders":
        os.remove(copy / "meta.json")
    return str(copy)


def _truncate(path: str) -> None:
    with open(path, "rb") as stream:
        data = stream.read()
    with open(path, "wb") as stream:
        stream.write(data[: len(data) // 2])


def _evaluate(model_dir: str, data: str, output) -> int:
    return main(["evaluate", "--model", model_dir, "--data", data, "--output", str(output), "--quiet"])


def test_evaluate_skips_and_names_truncated_images_and_unmasked_defects_and_keeps_the_rest(
    tiny_model_dir, clean_dataset, tmp_path, capsys
):
    data = _copy(clean_dataset, tmp_path / "bad", layout="folders")
    truncated = os.path.join(data, "brick", "test", "good", "001.png")
    unmasked = os.path.join(data, "brick", "test", "spot", "000.png")
    _truncate(truncated)
    os.remove(os.path.join(data, "brick", "ground_truth", "spot", "000_mask.png"))
    assert _evaluate(tiny_model_dir, data, tmp_path / "report") == 3
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    skipped = {item["image_path"]: item["reason"] for item in report["skipped"]}
    assert set(skipped) == {truncated, unmasked}  # the files themselves, not the dataset root
    assert "could not be decoded (image file is truncated" in skipped[truncated]
    assert "anomalous image without a mask" in skipped[unmasked]
    assert (tmp_path / "report" / "skipped.txt").read_text().count("\n") == 2
    assert f"skipped {truncated}: could not be decoded" in capsys.readouterr().err
    # The good images give exactly the metrics of a dataset holding only them.
    good = _copy(clean_dataset, tmp_path / "good", layout="folders")
    os.remove(os.path.join(good, "brick", "test", "good", "001.png"))
    os.remove(os.path.join(good, "brick", "test", "spot", "000.png"))
    os.remove(os.path.join(good, "brick", "ground_truth", "spot", "000_mask.png"))  # else reported as unused
    assert _evaluate(tiny_model_dir, good, tmp_path / "reference") == 0
    reference = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert report["images"] == reference["images"] == 5
    assert report["metrics"] == reference["metrics"]


def test_evaluate_names_unknown_splits_and_classes(tiny_model_dir, clean_dataset, tmp_path, capsys):
    folders = _copy(clean_dataset, tmp_path / "folders", layout="folders")
    assert _evaluate(tiny_model_dir, f"{folders}:validation", tmp_path / "out") == 2
    assert "has no split 'validation'; it has test" in capsys.readouterr().err
    assert _evaluate(tiny_model_dir, f"{clean_dataset}:validation", tmp_path / "out") == 2
    assert "no split 'validation'; it has test" in capsys.readouterr().err
    assert _evaluate(tiny_model_dir, f"{clean_dataset}:test:nosuch", tmp_path / "out") == 2
    assert "no class 'nosuch'; it has brick" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("width", "height"), [(30000, 30000), (10000, 10000)])  # over 2x PIL's limit, and between
def test_loaders_refuse_decompression_bombs_from_the_header(clean_dataset, tmp_path, width, height):
    data = _copy(clean_dataset, tmp_path)
    bomb = os.path.join(data, "brick", "test", "good", "000.png")
    _png_header_only(Path(bomb), width, height)
    started = time.perf_counter()
    with pytest.raises(DatasetLayoutError, match=rf"{re.escape(bomb)}: refused, .*{width * height}.* exceeds"):
        load_anomaly_dataset(data, "test")
    with pytest.warns(InvalidRecordWarning) as caught:
        kept = load_anomaly_dataset(data, "test", skip_invalid=True)
    assert time.perf_counter() - started < 5  # never decoded
    assert [w.message.image_path for w in caught] == [bomb] and "decompression bomb" in str(caught[0].message)
    assert len(kept) == 6 and "brick/test/good/000.png" not in kept["image_path"]


def test_truncated_images_are_found_by_verify_images_and_named_by_the_pipeline(
    tiny_model_dir, clean_dataset, tmp_path
):
    data = _copy(clean_dataset, tmp_path)
    truncated = os.path.join(data, "brick", "test", "spot", "001.png")
    _truncate(truncated)
    assert len(load_anomaly_dataset(data, "test")) == 7  # header checks only (the default): not found
    with pytest.raises(DatasetLayoutError, match=rf"{re.escape(truncated)}: could not be decoded \(image file is"):
        load_anomaly_dataset(data, "test", verify_images=True)
    with pytest.warns(InvalidRecordWarning, match="truncated"):
        assert len(load_anomaly_dataset(data, "test", skip_invalid=True, verify_images=True)) == 6
    dataset = load_anomaly_dataset(data, "test")
    row = dataset["image_path"].index("brick/test/spot/001.png")
    detector = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir)
    for source in (dataset, dataset["image"]):
        with pytest.raises(ValueError) as error:
            list(detector(source))
        message = str(error.value)
        assert (
            f"dataset row {row} (image_path 'brick/test/spot/001.png'): {truncated}: could not be decoded" in message
        )
        assert "image file is truncated" in message


def test_symlinked_class_folder_leaving_the_root_is_reported(clean_dataset, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "brick").symlink_to(os.path.join(clean_dataset, "brick"), target_is_directory=True)
    with pytest.raises(DatasetLayoutError, match=r"img_path 'brick/test/good/000.png' leaves the dataset root"):
        load_anomaly_dataset(str(root), "test")
    (tmp_path / "linked root").symlink_to(clean_dataset, target_is_directory=True)  # a linked root is fine
    assert len(load_anomaly_dataset(str(tmp_path / "linked root"), "test")) == 7
