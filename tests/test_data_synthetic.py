"""The synthetic defect dataset: layout, exact masks, determinism, command line."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from crane_hf.data import load_meta_json, load_mvtec
from crane_hf.data.synthetic import (
    DEFECTS,
    generate_synthetic_dataset,
    load_source,
    main,
    normal_image,
    sample_rng,
)
from crane_hf.io.atomic import OutputExistsError

SMALL = {"classes": ["brick", "coins"], "image_size": 64, "train_good": 2, "test_good": 2, "test_defective": 1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_synthetic_dataset(str(tmp_path_factory.mktemp("syn") / "data"), seed=3, **SMALL)


def test_mvtec_layout_and_meta_json_agree(dataset):
    test = load_mvtec(dataset, "test")
    assert len(test) == 2 * (2 + len(DEFECTS))
    assert sorted(set(test["defect_type"])) == sorted(["good", *DEFECTS])
    assert sum(test["label"]) == 2 * len(DEFECTS)
    assert test[0]["image"].size == (64, 64) and test[0]["image"].mode == "RGB"
    from_meta = load_meta_json(dataset, "test")
    assert sorted(from_meta["image_path"]) == sorted(test["image_path"])
    assert load_mvtec(dataset, "train")["label"] == [0, 0, 0, 0]
    with open(os.path.join(dataset, "synthetic.json")) as stream:
        info = json.load(stream)
    assert info["seed"] == 3 and info["classes"] == ["brick", "coins"]


@pytest.mark.parametrize("defect", DEFECTS)
def test_mask_is_exactly_the_painted_pixels(dataset, defect):
    """Rebuild the defect-free image from the same generator: it differs from the saved one only inside the mask."""
    for class_name in SMALL["classes"]:
        saved = np.asarray(Image.open(os.path.join(dataset, class_name, "test", defect, "000.png")), dtype=np.int16)
        mask = np.asarray(Image.open(os.path.join(dataset, class_name, "ground_truth", defect, "000_mask.png")))
        assert set(np.unique(mask)) == {0, 255}
        mask = mask > 0
        rng = sample_rng(3, class_name, "test", defect, 0)
        clean = np.round(normal_image(load_source(class_name), 64, rng) * 255).astype(np.int16)
        assert np.array_equal(saved[~mask], clean[~mask])
        assert np.abs(saved[mask] - clean[mask]).mean() > 25  # visibly painted
        assert mask.mean() >= 0.002


def test_same_seed_same_bytes_other_seed_other_images(dataset, tmp_path):
    again = generate_synthetic_dataset(str(tmp_path / "again"), seed=3, **SMALL)
    names = [os.path.relpath(os.path.join(d, f), dataset) for d, _, fs in os.walk(dataset) for f in fs]
    match, mismatch, errors = filecmp.cmpfiles(dataset, again, names, shallow=False)
    assert not mismatch and not errors and len(match) == len(names)
    other = generate_synthetic_dataset(str(tmp_path / "other"), seed=4, **SMALL)
    assert not filecmp.cmp(
        os.path.join(dataset, "brick/test/spot/000.png"), os.path.join(other, "brick/test/spot/000.png"), shallow=False
    )


def test_an_image_does_not_depend_on_the_other_classes_asked_for(dataset, tmp_path):
    alone = generate_synthetic_dataset(
        str(tmp_path / "alone"),
        ["coins"],
        ["crack"],
        image_size=64,
        train_good=0,
        test_good=0,
        test_defective=1,
        seed=3,
    )
    assert filecmp.cmp(
        os.path.join(dataset, "coins/test/crack/000.png"),
        os.path.join(alone, "coins/test/crack/000.png"),
        shallow=False,
    )


def test_refuses_existing_output_and_unknown_names(dataset, tmp_path):
    with pytest.raises(OutputExistsError):
        generate_synthetic_dataset(dataset, **SMALL)
    with pytest.raises(ValueError, match="Unknown class or defect 'marble'"):
        generate_synthetic_dataset(str(tmp_path / "x"), ["marble"])
    with pytest.raises(ValueError, match="Unknown class or defect 'dent'"):
        generate_synthetic_dataset(str(tmp_path / "x"), ["brick"], ["dent"])
    assert not (tmp_path / "x").exists()


def test_command_line(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["--output", out, "--classes", "gravel", "--defects", "hole,spot", "--image-size", "32"]
    assert main([*args, "--train-good", "1", "--test-good", "1", "--test-defective", "1"]) == 0
    assert "Wrote 4 images of 1 classes" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(out, "gravel/test"))) == ["good", "hole", "spot"]
    assert main(args) == 2 and "already exists" in capsys.readouterr().err


def test_without_scikit_image_the_module_names_the_extra_to_install():
    """scikit-image is the optional `synthetic` extra; `import crane_hf` itself never needs it."""
    script = (
        "import sys\n"
        "sys.modules['skimage'] = None  # as if scikit-image were not installed\n"
        "import crane_hf, crane_hf.data\n"
        "try:\n"
        "    import crane_hf.data.synthetic\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'pip install scikit-image (in a clone of crane_hf: pip install -e ".[synthetic]"' in result.stdout
