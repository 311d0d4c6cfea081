"""MVTec-AD, VisA and generic folder layouts; layout detection and the `--data` naming."""

from __future__ import annotations

import os

import pytest

from crane_hf.data import (
    DatasetLayoutError,
    DataSource,
    detect_layout,
    load_anomaly_dataset,
    load_class_folders,
    load_data_source,
    load_mvtec,
    load_visa,
)

from .image_files import write_image, write_mask


@pytest.fixture
def mvtec(tmp_path):
    """MVTec-AD in miniature: two classes, masks named <stem>_mask.png."""
    tmp_path = tmp_path / "mvtec"
    for cls in ("bottle", "screw"):
        write_image(tmp_path / cls / "train/good/000.png")
        write_image(tmp_path / cls / "train/good/001.png")
        write_image(tmp_path / cls / "test/good/000.png")
        for defect in ("broken", "scratch"):
            for index in ("000", "001"):
                write_image(tmp_path / cls / f"test/{defect}/{index}.png")
                write_mask(tmp_path / cls / f"ground_truth/{defect}/{index}_mask.png")
    (tmp_path / "license.txt").write_text("not a class")
    return tmp_path


def test_mvtec_layout(mvtec):
    test = load_mvtec(str(mvtec), "test")
    assert len(test) == 10 and sum(test["label"]) == 8
    assert test["defect_type"][:5] == ["broken", "broken", "good", "scratch", "scratch"]
    row = test[0]
    assert row["image_path"] == "bottle/test/broken/000.png" and row["mask"] is not None
    assert test.data.column("mask")[0].as_py()["path"].endswith("bottle/ground_truth/broken/000_mask.png")
    train = load_mvtec(str(mvtec), "train", classes=["screw"])
    assert train["image_path"] == ["screw/train/good/000.png", "screw/train/good/001.png"]
    assert train["label"] == [0, 0] and train["mask"] == [None, None]


def test_mvtec_layout_names_an_anomalous_image_without_its_mask(mvtec):
    os.remove(mvtec / "screw/ground_truth/scratch/001_mask.png")
    with pytest.raises(DatasetLayoutError, match=r"screw/test/scratch/001.png.*anomalous image without a mask"):
        load_mvtec(str(mvtec), "test")


def test_mvtec_layout_names_a_mask_of_the_wrong_size(mvtec):
    write_mask(mvtec / "bottle/ground_truth/broken/001_mask.png", size=(8, 8))
    with pytest.raises(DatasetLayoutError, match=r"bottle/test/broken/001.png.*mask is 8x8 but its image is 20x16"):
        load_mvtec(str(mvtec), "test")


def test_unknown_class_and_empty_root_are_reported(mvtec, tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"no class folder 'cable'.*found.*bottle"):
        load_mvtec(str(mvtec), "test", classes=["cable"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetLayoutError, match=r"no class folders"):
        load_class_folders(str(empty))
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_class_folders(str(tmp_path / "missing"))


def test_generic_layout_accepts_same_stem_masks_other_extensions_and_optional_masks(tmp_path):
    write_image(tmp_path / "widget/train/good/a.jpg")
    write_image(tmp_path / "widget/test/good/b.JPG")
    write_image(tmp_path / "widget/test/dent/c.bmp")
    write_mask(tmp_path / "widget/ground_truth/dent/c.png")
    write_image(tmp_path / "widget/test/stain/d.png")
    (tmp_path / "widget/test/good/notes.txt").write_text("ignored")
    with pytest.raises(DatasetLayoutError, match=r"widget/test/stain/d.png.*without a mask"):
        load_class_folders(str(tmp_path))
    ds = load_class_folders(str(tmp_path), require_masks=False)
    assert ds["image_path"] == ["widget/test/dent/c.bmp", "widget/test/good/b.JPG", "widget/test/stain/d.png"]
    assert ds["label"] == [1, 0, 1]
    assert ds[0]["mask"] is not None and ds[2]["mask"] is None
    assert load_class_folders(str(tmp_path), "train")["image_path"] == ["widget/train/good/a.jpg"]


@pytest.fixture
def visa(tmp_path):
    tmp_path = tmp_path / "visa"
    write_image(tmp_path / "candle/Data/Images/Normal/0000.JPG")
    write_image(tmp_path / "candle/Data/Images/Normal/0001.JPG")
    write_image(tmp_path / "candle/Data/Images/Anomaly/000.JPG")
    write_mask(tmp_path / "candle/Data/Masks/Anomaly/000.png")
    write_image(tmp_path / "pcb1/Data/Images/Anomaly/001.JPG")
    write_mask(tmp_path / "pcb1/Data/Masks/Anomaly/001.png")
    (tmp_path / "split_csv").mkdir(parents=True)
    (tmp_path / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
        "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/001.JPG,pcb1/Data/Masks/Anomaly/001.png\n"
    )
    return tmp_path


def test_visa_split_csv(visa):
    test = load_visa(str(visa), "test")
    assert test["class_name"] == ["candle", "candle", "pcb1"] and test["label"] == [0, 1, 1]
    assert test["defect_type"] == ["good", "anomaly", "anomaly"]
    assert test[0]["mask"] is None and test[1]["mask"].size == (20, 16)
    assert load_visa(str(visa), "train")["image_path"] == ["candle/Data/Images/Normal/0000.JPG"]
    assert load_visa(str(visa), "test", classes=["pcb1"])["class_name"] == ["pcb1"]


def test_visa_bad_label_and_missing_file_name_the_csv_line(visa):
    csv_path = visa / "split_csv/1cls.csv"
    csv_path.write_text(csv_path.read_text().replace("test,anomaly,pcb1", "test,broken,pcb1"))
    with pytest.raises(DatasetLayoutError, match=r"1cls.csv line 5: field 'label' must be 'normal' or 'anomaly'"):
        load_visa(str(visa))
    csv_path.write_text(csv_path.read_text().replace("test,broken,pcb1", "test,anomaly,pcb1"))
    os.remove(visa / "candle/Data/Masks/Anomaly/000.png")
    with pytest.raises(DatasetLayoutError, match=r"1cls.csv line 4.*mask file not found"):
        load_visa(str(visa))


def test_layout_detection_and_data_source_names(mvtec, visa, tmp_path):
    assert detect_layout(str(mvtec)) == "folders" and detect_layout(str(visa)) == "visa"
    assert len(load_anomaly_dataset(str(mvtec))) == 10
    assert len(load_anomaly_dataset(str(visa))) == 3
    source = DataSource.parse(f"{mvtec}:train:screw,bottle")
    assert source == DataSource(str(mvtec), "train", ("screw", "bottle"))
    assert load_data_source(source)["class_name"] == ["screw", "screw", "bottle", "bottle"]
    assert DataSource.parse(str(mvtec)) == DataSource(str(mvtec), "test", None)
    assert DataSource.parse(f"{visa}:train").split == "train"
    with pytest.raises(FileNotFoundError, match=r"No dataset folder"):
        DataSource.parse(str(tmp_path / "nowhere:test"))
    empty = tmp_path / "plain"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"meta_writers"):
        detect_layout(str(empty))
