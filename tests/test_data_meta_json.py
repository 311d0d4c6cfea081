"""meta.json: reading into datasets.Dataset, the checks that name offending entries, writing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from crane_hf.data import AnomalyRecord, DatasetLayoutError, load_meta_json, read_meta_json, write_meta_json
from crane_hf.io.atomic import OutputExistsError

from .image_files import write_image, write_mask


def _entry(img, mask="", cls="bottle", specie="good", anomaly=0):
    return {"img_path": img, "mask_path": mask, "cls_name": cls, "specie_name": specie, "anomaly": anomaly}


@pytest.fixture
def root(tmp_path):
    """Two classes; bottle has a normal and a broken image (with mask) in test, one normal image in train."""
    write_image(tmp_path / "bottle/train/good/000.png")
    write_image(tmp_path / "bottle/test/good/000.png")
    write_image(tmp_path / "bottle/test/broken/000.png", value=30)
    write_mask(tmp_path / "bottle/ground_truth/broken/000_mask.png")
    write_image(tmp_path / "cable/test/cut/000.png", size=(24, 24))
    write_mask(tmp_path / "cable/ground_truth/cut/000_mask.png", size=(24, 24))
    meta = {
        "train": {"bottle": [_entry("bottle/train/good/000.png")]},
        "test": {
            "bottle": [
                _entry("bottle/test/good/000.png"),
                _entry(
                    "bottle/test/broken/000.png", "bottle/ground_truth/broken/000_mask.png", specie="broken", anomaly=1
                ),
            ],
            "cable": [_entry("cable/test/cut/000.png", "cable/ground_truth/cut/000_mask.png", "cable", "cut", 1)],
        },
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def _rewrite(root, edit):
    meta = json.loads((root / "meta.json").read_text())
    edit(meta)
    (root / "meta.json").write_text(json.dumps(meta))


def test_reads_the_test_split_with_lazy_image_columns(root):
    ds = load_meta_json(str(root), "test")
    assert ds.column_names == ["image", "mask", "label", "class_name", "defect_type", "image_path"]
    assert ds["label"] == [0, 1, 1]
    assert ds["class_name"] == ["bottle", "bottle", "cable"]
    assert ds["defect_type"] == ["good", "broken", "cut"]
    assert ds["image_path"] == ["bottle/test/good/000.png", "bottle/test/broken/000.png", "cable/test/cut/000.png"]
    assert ds.features["label"].names == ["normal", "anomalous"]
    # The columns hold file paths, not pixels, and decode on access.
    raw = ds.data.column("image")[1].as_py()
    assert raw["bytes"] is None and raw["path"] == os.path.join(str(root), "bottle/test/broken/000.png")
    assert ds[0]["mask"] is None
    row = ds[1]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (20, 16)
    assert np.asarray(row["mask"]).max() == 255 and np.asarray(row["image"])[0, 0, 0] == 30


def test_selects_split_and_classes_and_names_unknown_ones(root):
    assert load_meta_json(str(root), "train")["image_path"] == ["bottle/train/good/000.png"]
    assert load_meta_json(str(root), "test", classes=["cable"])["class_name"] == ["cable"]
    with pytest.raises(KeyError, match=r"no split 'val'.*test, train"):
        load_meta_json(str(root), "val")
    with pytest.raises(KeyError, match=r"no class 'screw'.*bottle, cable"):
        load_meta_json(str(root), "test", classes=["screw"])


def test_missing_image_is_reported_with_its_entry(root):
    os.remove(root / "bottle/test/broken/000.png")
    with pytest.raises(DatasetLayoutError) as error:
        load_meta_json(str(root), "test")
    message = str(error.value)
    assert "test/bottle[1]" in message and "image file not found" in message
    assert "bottle/test/broken/000.png" in message and len(error.value.problems) == 1


def test_missing_mask_is_reported(root):
    os.remove(root / "cable/ground_truth/cut/000_mask.png")
    with pytest.raises(DatasetLayoutError, match=r"test/cable\[0\].*mask file not found"):
        load_meta_json(str(root), "test")


def test_mask_with_another_size_than_its_image_is_reported(root):
    write_mask(root / "bottle/ground_truth/broken/000_mask.png", size=(21, 16))
    with pytest.raises(DatasetLayoutError, match=r"test/bottle\[1\].*mask is 21x16 but its image is 20x16"):
        load_meta_json(str(root), "test")


@pytest.mark.parametrize("path", ["../outside.png", "bottle/../../outside.png", "/etc/passwd"])
def test_paths_leaving_the_root_are_reported(root, path):
    write_image(root.parent / "outside.png")

    def edit(meta):
        meta["test"]["bottle"][0]["img_path"] = path

    _rewrite(root, edit)
    with pytest.raises(DatasetLayoutError, match=r"test/bottle\[0\].*img_path .* leaves the dataset root"):
        load_meta_json(str(root), "test")


def test_absolute_paths_inside_the_root_are_accepted(root):
    def edit(meta):
        meta["test"]["bottle"][0]["img_path"] = str(root / "bottle/test/good/000.png")

    _rewrite(root, edit)
    assert load_meta_json(str(root), "test")["image_path"][0] == "bottle/test/good/000.png"


def test_malformed_entries_are_all_reported_with_field_names(root):
    def edit(meta):
        meta["test"]["bottle"][0]["anomaly"] = "yes"
        del meta["test"]["bottle"][1]["img_path"]
        meta["test"]["cable"][0]["cls_name"] = "bottle"

    _rewrite(root, edit)
    with pytest.raises(DatasetLayoutError) as error:
        read_meta_json(str(root))
    problems = "\n".join(error.value.problems)
    assert "test/bottle[0]: field 'anomaly' must be int" in problems
    assert "test/bottle[1]: missing field 'img_path'" in problems
    assert "test/cable[0]: field 'cls_name' is 'bottle' but the entry is listed under class 'cable'" in problems


def test_anomaly_outside_zero_one_and_invalid_json_are_reported(root):
    _rewrite(root, lambda meta: meta["test"]["bottle"][0].update(anomaly=2))
    with pytest.raises(DatasetLayoutError, match=r"test/bottle\[0\].*'anomaly' must be 0 or 1, got 2"):
        load_meta_json(str(root), "test")
    (root / "meta.json").write_text("{not json")
    with pytest.raises(DatasetLayoutError, match=r"not valid JSON"):
        load_meta_json(str(root), "test")
    with pytest.raises(FileNotFoundError, match=r"No meta.json"):
        load_meta_json(str(root / "bottle"), "test")


def test_anomalous_image_without_mask_is_refused_only_when_masks_are_required(root):
    _rewrite(root, lambda meta: meta["test"]["cable"][0].update(mask_path=""))
    ds = load_meta_json(str(root), "test")
    assert ds[2]["label"] == 1 and ds[2]["mask"] is None
    with pytest.raises(DatasetLayoutError, match=r"test/cable\[0\].*anomalous image without a mask"):
        load_meta_json(str(root), "test", require_masks=True)


def test_write_then_read_round_trips_and_refuses_to_overwrite(tmp_path, root):
    records = read_meta_json(str(root))
    target = tmp_path / "copy.json"
    write_meta_json(str(root), records, meta_path=str(target))
    assert json.loads(target.read_text()) == json.loads((root / "meta.json").read_text())
    with pytest.raises(OutputExistsError):
        write_meta_json(str(root), records, meta_path=str(target))
    write_meta_json(
        str(root), {"test": [AnomalyRecord("a.png", "", 0, "x", "good")]}, overwrite=True, meta_path=str(target)
    )
    assert json.loads(target.read_text()) == {"test": {"x": [_entry("a.png", cls="x")]}}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_an_image_that_is_a_named_pipe_is_named_as_such_not_as_missing(root):
    os.remove(root / "bottle/test/broken/000.png")
    os.mkfifo(root / "bottle/test/broken/000.png")
    with pytest.raises(DatasetLayoutError) as error:
        load_meta_json(str(root), "test")
    message = str(error.value)
    assert "test/bottle[1]" in message and "image is not a regular file" in message and "not found" not in message
