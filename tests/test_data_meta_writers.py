"""meta.json writers, each on a miniature copy of its dataset's public folder layout."""

from __future__ import annotations

import json
import os

import pytest

from crane_hf.data import DatasetLayoutError, load_meta_json, write_dataset_meta
from crane_hf.data.meta_writers import WRITERS, main

from .image_files import write_image, write_mask


def mpdd(root):
    write_image(root / "bracket_black/train/good/000.png")
    write_image(root / "bracket_black/test/good/000.png")
    write_image(root / "bracket_black/test/hole/000.png")
    write_mask(root / "bracket_black/ground_truth/hole/000_mask.png")
    return {
        "train": [("bracket_black/train/good/000.png", "", "bracket_black", "good", 0)],
        "test": [
            ("bracket_black/test/good/000.png", "", "bracket_black", "good", 0),
            (
                "bracket_black/test/hole/000.png",
                "bracket_black/ground_truth/hole/000_mask.png",
                "bracket_black",
                "hole",
                1,
            ),
        ],
    }


def btad(root):
    write_image(root / "01/train/ok/0000.bmp")
    write_image(root / "01/test/ok/0000.bmp")
    write_image(root / "01/test/ko/0003.bmp")
    write_mask(root / "01/ground_truth/ko/0003.png")
    write_image(root / "03/test/ko/0001.bmp")
    write_mask(root / "03/ground_truth/ko/0001.bmp")
    return {
        "train": [("01/train/ok/0000.bmp", "", "01", "ok", 0)],
        "test": [
            ("01/test/ko/0003.bmp", "01/ground_truth/ko/0003.png", "01", "ko", 1),
            ("01/test/ok/0000.bmp", "", "01", "ok", 0),
            ("03/test/ko/0001.bmp", "03/ground_truth/ko/0001.bmp", "03", "ko", 1),
        ],
    }


def ksdd(root):
    write_image(root / "kos01/Part0.jpg", mode="L")
    write_mask(root / "kos01/Part0_label.bmp", defect=False)
    write_image(root / "kos01/Part1.jpg", mode="L")
    write_mask(root / "kos01/Part1_label.bmp")
    write_image(root / "kos10/Part0.jpg", mode="L")
    write_mask(root / "kos10/Part0_label.bmp", defect=False)
    cls = "electrical commutators"
    return {
        "test": [
            ("kos01/Part0.jpg", "", cls, "good", 0),
            ("kos01/Part1.jpg", "kos01/Part1_label.bmp", cls, "defect", 1),
            ("kos10/Part0.jpg", "", cls, "good", 0),
        ]
    }


def ksdd2(root):
    write_image(root / "train/10000.png")
    write_mask(root / "train/10000_GT.png", defect=False)
    write_image(root / "test/20000.png")
    write_mask(root / "test/20000_GT.png")
    cls = "electrical commutators"
    return {
        "train": [("train/10000.png", "", cls, "good", 0)],
        "test": [("test/20000.png", "test/20000_GT.png", cls, "defect", 1)],
    }


def dagm(root):
    for cls in ("Class1", "Class10", "Class2"):
        write_image(root / cls / "Train/0001.PNG", mode="L")
        write_image(root / cls / "Train/0002.PNG", mode="L")
        write_mask(root / cls / "Train/Label/0002_label.PNG")
    (root / "Class1/Train/Label/Labels.txt").write_text("1\n1\t0\t0001.PNG\t0\t0\n2\t1\t0002.PNG\t0\t0002_label.PNG\n")
    write_image(root / "Class1/Test/0100.PNG", mode="L")
    expected = {"train": [], "test": [("Class1/Test/0100.PNG", "", "Class1", "good", 0)]}
    for cls in ("Class1", "Class2", "Class10"):
        expected["train"] += [
            (f"{cls}/Train/0001.PNG", "", cls, "good", 0),
            (f"{cls}/Train/0002.PNG", f"{cls}/Train/Label/0002_label.PNG", cls, "defect", 1),
        ]
    return expected


def dtd(root):
    write_image(root / "Woven_001/train/good/000.png")
    write_image(root / "Woven_001/test/good/000.png")
    write_image(root / "Woven_001/test/bad/000.png")
    write_mask(root / "Woven_001/ground_truth/bad/000.png")
    return {
        "train": [("Woven_001/train/good/000.png", "", "Woven_001", "good", 0)],
        "test": [
            ("Woven_001/test/bad/000.png", "Woven_001/ground_truth/bad/000.png", "Woven_001", "bad", 1),
            ("Woven_001/test/good/000.png", "", "Woven_001", "good", 0),
        ],
    }


def headct(root):
    write_image(root / "head_ct/head_ct/000.png", mode="L")
    write_image(root / "head_ct/head_ct/001.png", mode="L")
    (root / "labels.csv").write_text("id, hemorrhage\n0,1\n1,0\n")
    return {
        "test": [
            ("head_ct/head_ct/000.png", "", "brain", "hemorrhage", 1),
            ("head_ct/head_ct/001.png", "", "brain", "good", 0),
        ]
    }


def brainmri(root):
    for prefix in ("", "brain_tumor_dataset/"):  # the archive holds both copies; the writer reads one
        write_image(root / f"{prefix}yes/Y1.jpg")
        write_image(root / f"{prefix}no/1 no.jpeg")
    return {
        "test": [
            ("brain_tumor_dataset/no/1 no.jpeg", "", "brain", "no", 0),
            ("brain_tumor_dataset/yes/Y1.jpg", "", "brain", "yes", 1),
        ]
    }


def br35h(root):
    write_image(root / "yes/y0.jpg")
    write_image(root / "no/no0.jpg")
    write_image(root / "pred/pred0.jpg")
    return {"test": [("no/no0.jpg", "", "brain", "no", 0), ("yes/y0.jpg", "", "brain", "yes", 1)]}


def isic(root):
    write_image(root / "ISBI2016_ISIC_Part1_Test_Data/ISIC_0000003.jpg")
    write_mask(root / "ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000003_Segmentation.png")
    write_image(root / "ISIC-2017_Training_Data/ISIC_0000000.jpg")
    write_image(root / "ISIC-2017_Training_Data/ISIC_0000000_superpixels.png")
    write_mask(root / "ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png")
    os.makedirs(root / "ISIC-2017_Training_Part2_GroundTruth")
    (root / "ISIC-2017_Training_Part2_GroundTruth/ISIC_0000000_features.json").write_text("{}")
    return {
        "train": [
            (
                "ISIC-2017_Training_Data/ISIC_0000000.jpg",
                "ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png",
                "skin",
                "lesion",
                1,
            )
        ],
        "test": [
            (
                "ISBI2016_ISIC_Part1_Test_Data/ISIC_0000003.jpg",
                "ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000003_Segmentation.png",
                "skin",
                "lesion",
                1,
            )
        ],
    }


def colondb(root):
    write_image(root / "images/1.png")
    write_mask(root / "masks/1.png")
    write_image(root / "images/2.png")
    write_mask(root / "masks/2.png")
    return {"test": [(f"images/{i}.png", f"masks/{i}.png", "colon", "lesion", 1) for i in (1, 2)]}


def clinicdb(root):
    write_image(root / "Original/1.tif")
    write_mask(root / "Ground Truth/1.tif")
    return {"test": [("Original/1.tif", "Ground Truth/1.tif", "colon", "lesion", 1)]}


def tn3k(root):
    write_image(root / "trainval-image/0000.jpg", mode="L")
    write_mask(root / "trainval-mask/0000.jpg")
    write_image(root / "test-image/0000.jpg", mode="L")
    write_mask(root / "test-mask/0000.jpg")
    (root / "tn3k-trainval-fold0.json").write_text('{"train": [0], "val": []}')
    return {
        "train": [("trainval-image/0000.jpg", "trainval-mask/0000.jpg", "thyroid", "lesion", 1)],
        "test": [("test-image/0000.jpg", "test-mask/0000.jpg", "thyroid", "lesion", 1)],
    }


LAYOUTS = {
    "mpdd": mpdd,
    "btad": btad,
    "ksdd": ksdd,
    "ksdd2": ksdd2,
    "dagm": dagm,
    "dtd": dtd,
    "headct": headct,
    "brainmri": brainmri,
    "br35h": br35h,
    "isic": isic,
    "colondb": colondb,
    "clinicdb": clinicdb,
    "tn3k": tn3k,
}


def _entries(meta):
    return {
        split: sorted(
            (e["img_path"], e["mask_path"], e["cls_name"], e["specie_name"], e["anomaly"])
            for entries in classes.values()
            for e in entries
        )
        for split, classes in meta.items()
    }


def test_every_issue_dataset_has_a_writer():
    wanted = {"mpdd", "btad", "ksdd", "dagm", "dtd", "headct", "brainmri", "br35h", "isic", "colondb", "clinicdb"}
    assert wanted | {"tn3k"} <= set(WRITERS)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_writer_indexes_its_public_layout(tmp_path, layout):
    expected = LAYOUTS[layout](tmp_path)
    path = write_dataset_meta(layout.rstrip("2"), str(tmp_path))
    assert path == os.path.join(str(tmp_path), "meta.json")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert _entries(meta) == {split: sorted(rows) for split, rows in expected.items()}
    for split, rows in expected.items():
        ds = load_meta_json(str(tmp_path), split)
        assert sorted(ds["image_path"]) == sorted(row[0] for row in rows)
        assert sum(ds["label"]) == sum(row[4] for row in rows)


def test_paired_dataset_names_the_image_without_a_mask(tmp_path):
    colondb(tmp_path)
    os.remove(tmp_path / "masks/2.png")
    with pytest.raises(DatasetLayoutError, match=r"images/2.png.*anomalous image without a mask"):
        write_dataset_meta("colondb", str(tmp_path))
    assert not (tmp_path / "meta.json").exists()


def test_writer_reports_mask_size_mismatch_and_wrong_layout(tmp_path):
    tn3k(tmp_path)
    write_mask(tmp_path / "test-mask/0000.jpg", size=(10, 10))
    with pytest.raises(DatasetLayoutError, match=r"test-image/0000.jpg.*mask is 10x10 but its image is 20x16"):
        write_dataset_meta("tn3k", str(tmp_path))
    with pytest.raises(DatasetLayoutError, match=r"no Class1 .. Class10 folders"):
        write_dataset_meta("dagm", str(tmp_path))


def test_headct_names_the_csv_line_of_a_missing_image(tmp_path):
    headct(tmp_path)
    (tmp_path / "labels.csv").write_text("id, hemorrhage\n0,1\n7,0\n")
    with pytest.raises(DatasetLayoutError, match=r"labels.csv line 3: no image 007.png"):
        write_dataset_meta("headct", str(tmp_path))


def test_ksdd_names_an_image_without_its_label(tmp_path):
    ksdd(tmp_path)
    os.remove(tmp_path / "kos10/Part0_label.bmp")
    with pytest.raises(DatasetLayoutError, match=r"kos10/Part0.jpg has no label image"):
        write_dataset_meta("ksdd", str(tmp_path))


def test_command_line_writes_once_and_refuses_to_overwrite(tmp_path, capsys):
    dtd(tmp_path)
    assert main(["dtd", str(tmp_path)]) == 0
    assert "test: 2 images (1 anomalous)" in capsys.readouterr().out
    assert main(["dtd", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["dtd", str(tmp_path), "--overwrite"]) == 0
    assert main(["--list"]) == 0 and "DTD-Synthetic" in capsys.readouterr().out
