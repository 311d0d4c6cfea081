"""Every file under a class is used or reported with the reason (loaders, evaluate's skipped.txt and metrics.json),
a strict mode refuses instead, and meta.json / VisA indexes with duplicates or contradictions are refused by name."""

from __future__ import annotations

import json
import os
import warnings

import pytest
from PIL import Image

from crane_hf.commands.cli import main
from crane_hf.data import DatasetLayoutError, UnusedFileWarning, load_anomaly_dataset, load_meta_json

from .image_files import write_image, write_mask


def _good(root, name="part", count=2, size=(20, 16)):
    for index in range(count):
        write_image(os.path.join(root, name, "test", "good", f"{index:03d}.png"), size)


def _unused(callable_, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = callable_(*args, **kwargs)
    return dataset, {
        os.path.relpath(w.message.path, args[0]): w.message.reason
        for w in caught
        if isinstance(w.message, UnusedFileWarning)
    }


def test_masks_named_otherwise_are_reported_and_the_images_not_evaluated_as_image_level(tmp_path, tiny_model_dir):
    root = str(tmp_path / "data")
    _good(root, "widget")
    for index in (3, 4):
        write_image(f"{root}/widget/test/defect/image{index}.png")
        write_mask(f"{root}/widget/ground_truth/defect/mask{index}.png")
    _, unused = _unused(load_anomaly_dataset, root, "test", skip_invalid=True)
    assert set(unused) == {"widget/ground_truth/defect/mask3.png", "widget/ground_truth/defect/mask4.png"}
    assert "matches no image of widget/<split>/defect/" in unused["widget/ground_truth/defect/mask3.png"]
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_model_dir, "--data", root, "--output", str(out), "--quiet"]) == 3
    report = json.loads((out / "metrics.json").read_text())
    skipped = {os.path.relpath(item["image_path"], root): item["reason"] for item in report["skipped"]}
    assert set(skipped) == {
        "widget/test/defect/image3.png",
        "widget/test/defect/image4.png",
        "widget/ground_truth/defect/mask3.png",
        "widget/ground_truth/defect/mask4.png",
    }
    assert "anomalous image without a mask (no mask of that name" in skipped["widget/test/defect/image3.png"]
    assert report["images"] == 2  # the normal images only: no defect counted as image-level
    assert (out / "skipped.txt").read_text().count("\n") == 4


def test_images_one_folder_too_deep_are_reported_not_dropped(tmp_path, tiny_model_dir):
    root = str(tmp_path / "data")
    _good(root, "cookie", count=3)
    for index in range(3):
        write_image(f"{root}/cookie/test/dent/{index:03d}.png")
        write_mask(f"{root}/cookie/ground_truth/dent/{index:03d}_mask.png")
        write_image(f"{root}/cookie/test/dent/batch_2024/{index:03d}.png")
        write_mask(f"{root}/cookie/ground_truth/dent/batch_2024/{index:03d}_mask.png")
    dataset, unused = _unused(load_anomaly_dataset, root, "test")
    assert len(dataset) == 6
    deeper = {f"cookie/test/dent/batch_2024/{i:03d}.png" for i in range(3)}
    deeper_masks = {f"cookie/ground_truth/dent/batch_2024/{i:03d}_mask.png" for i in range(3)}
    assert set(unused) == deeper | deeper_masks  # 9 + 3 masks on disk: 6 used, 6 named
    assert all("in a subfolder of cookie/test/dent/" in unused[name] for name in deeper)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_model_dir, "--data", root, "--output", str(out), "--quiet"]) == 3
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 6 and len(report["skipped"]) == 6


def test_every_other_kind_of_leftover_is_named(tmp_path):
    root = str(tmp_path / "data")
    _good(root)
    write_image(f"{root}/part/test/scratch/000.png")
    write_mask(f"{root}/part/ground_truth/scratch/000_mask.png")
    write_mask(f"{root}/part/ground_truth/scratch/000.png")  # a second mask for 000: the _mask one is used
    write_mask(f"{root}/part/ground_truth/scratch/001_mask.png")  # no image 001
    write_mask(f"{root}/part/ground_truth/crack/000_mask.png")  # no defect folder crack
    write_mask(f"{root}/part/ground_truth/good/000_mask.png")  # a mask for a normal image
    write_image(f"{root}/part/test/stray.png")  # outside a defect folder
    write_image(f"{root}/part/loose.png")  # directly in the class folder
    Image.new("RGB", (20, 16)).save(f"{root}/part/test/good/photo.heic", format="PNG")  # unsupported type
    (tmp_path / "data" / "part" / "test" / "good" / ".DS_Store").write_bytes(b"junk")  # hidden: ignored
    write_image(f"{root}/part/train/good/000.png")  # another split: not this split's business
    _, unused = _unused(load_anomaly_dataset, root, "test")
    assert unused == {
        "part/ground_truth/scratch/000.png": "its image part/test/scratch/000.png uses the mask "
        "part/ground_truth/scratch/000_mask.png",
        "part/ground_truth/scratch/001_mask.png": unused["part/ground_truth/scratch/001_mask.png"],
        "part/ground_truth/crack/000_mask.png": "no image folder part/<split>/crack/ for this defect type",
        "part/ground_truth/good/000_mask.png": "a mask of the normal images' folder 'good': normal images have "
        "no mask",
        "part/test/stray.png": "not inside a defect folder (images go in part/test/<defect>/)",
        "part/loose.png": "not inside a split folder (part/<split>/)",
        "part/test/good/photo.heic": unused["part/test/good/photo.heic"],
    }
    assert "matches no image" in unused["part/ground_truth/scratch/001_mask.png"]
    assert "not a supported image type (extension .heic" in unused["part/test/good/photo.heic"]


def test_two_masks_with_one_name_are_ambiguous(tmp_path):
    root = str(tmp_path / "data")
    _good(root)
    write_image(f"{root}/part/test/scratch/000.png")
    write_mask(f"{root}/part/ground_truth/scratch/000_mask.png")
    write_mask(f"{root}/part/ground_truth/scratch/000_mask.bmp", defect=False)
    with pytest.raises(DatasetLayoutError, match="anomalous image without a mask"):
        load_anomaly_dataset(root, "test")
    _, unused = _unused(load_anomaly_dataset, root, "test", skip_invalid=True)
    assert set(unused) == {"part/ground_truth/scratch/000_mask.png", "part/ground_truth/scratch/000_mask.bmp"}
    assert all("several masks are named 000_mask.*" in reason for reason in unused.values())


def test_masks_used_by_the_other_split_are_not_reported(tmp_path):
    root = str(tmp_path / "data")
    _good(root)
    write_image(f"{root}/part/train/scratch/000.png")
    write_mask(f"{root}/part/ground_truth/scratch/000_mask.png")
    _, unused = _unused(load_anomaly_dataset, root, "test")
    assert unused == {}


def test_single_frame_gif_is_used_in_datasets(tmp_path):
    root = str(tmp_path / "data")
    _good(root)
    Image.new("RGB", (20, 16), (9, 9, 9)).save(f"{root}/part/test/good/002.gif")
    dataset, unused = _unused(load_anomaly_dataset, root, "test")
    assert len(dataset) == 3 and unused == {}


def test_strict_mode_refuses_instead(tmp_path, tiny_model_dir, capsys):
    root = str(tmp_path / "data")
    _good(root)
    write_image(f"{root}/part/test/good/deeper/000.png")
    with pytest.raises(DatasetLayoutError, match=r"strict.*part/test/good/deeper/000.png: in a subfolder"):
        load_anomaly_dataset(root, "test", strict=True)
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", tiny_model_dir, "--data", root, "--output", str(out), "--quiet", "--strict"]
    assert main(argv) == 2
    assert "deeper/000.png" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------ meta.json and VisA


def _meta_root(tmp_path):
    root = tmp_path / "meta"
    for name in ("brick", "coins"):
        for index in range(3):
            write_image(str(root / name / f"{index}.png"))
    write_mask(str(root / "brick" / "m.png"))
    return root


def _entry(cls: str, index: int, anomaly: int = 0, mask: str = "") -> str:
    return json.dumps(
        {"img_path": f"{cls}/{index}.png", "mask_path": mask, "cls_name": cls, "specie_name": "x", "anomaly": anomaly}
    )


@pytest.mark.parametrize("repeated", ["split", "class"])
def test_meta_json_with_a_repeated_key_is_refused(tmp_path, repeated):
    root = _meta_root(tmp_path)
    brick = ", ".join(_entry("brick", i) for i in range(3))
    coins = ", ".join(_entry("coins", i) for i in range(3))
    if repeated == "split":  # JSON would keep only the coins
        text, key = f'{{"test": {{"brick": [{brick}]}}, "test": {{"coins": [{coins}]}}}}', "test"
    else:  # JSON would keep one brick list: 2 of 5 images dropped
        text, key = (
            f'{{"test": {{"brick": [{brick}], "brick": [{_entry("coins", 0)}, {_entry("coins", 1)}]}}}}',
            "brick",
        )
    (root / "meta.json").write_text(text)
    with pytest.raises(DatasetLayoutError, match=f"key '{key}' appears 2 times in one object"):
        load_meta_json(str(root))


def test_meta_json_listing_an_image_twice_is_refused_with_both_entries(tmp_path):
    root = _meta_root(tmp_path)
    entries = [_entry("brick", 0), _entry("brick", 1), _entry("brick", 0, anomaly=1, mask="brick/m.png")]
    (root / "meta.json").write_text(f'{{"test": {{"brick": [{", ".join(entries)}]}}}}')
    with pytest.raises(DatasetLayoutError) as error:
        load_meta_json(str(root))
    message = str(error.value)
    assert "image 'brick/0.png' is listed as normal and as anomalous" in message
    assert "test/brick[0]" in message and "test/brick[2]" in message
    entries = [_entry("brick", 0), _entry("brick", 0)]
    (root / "meta.json").write_text(f'{{"test": {{"brick": [{", ".join(entries)}]}}}}')
    with pytest.raises(DatasetLayoutError, match=r"image 'brick/0\.png' is listed twice"):
        load_meta_json(str(root))


def test_meta_json_with_contradictory_labels_across_splits_is_refused(tmp_path):
    root = _meta_root(tmp_path)
    train = _entry("brick", 0)
    test = _entry("brick", 0, anomaly=1, mask="brick/m.png")
    (root / "meta.json").write_text(f'{{"train": {{"brick": [{train}]}}, "test": {{"brick": [{test}]}}}}')
    with pytest.raises(DatasetLayoutError, match=r"contradictory annotations: .*train/brick\[0\] .*test/brick\[0\]"):
        load_meta_json(str(root))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"test": {"brick": [', "not valid JSON"),
        (b'\xff\xfe{"test": {}}', "not UTF-8 text"),
    ],
)
def test_malformed_meta_json_is_one_line(tmp_path, tiny_model_dir, capsys, content, expected):
    root = _meta_root(tmp_path)
    (root / "meta.json").write_bytes(content)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_model_dir, "--data", str(root), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"error: {root / 'meta.json'}: ") and expected in errors[0]
    assert err.rstrip().endswith(errors[0])  # the message is that one line


def test_visa_csv_listing_an_image_twice_is_refused(tmp_path):
    root = tmp_path / "visa"
    write_image(str(root / "candle" / "0.png"))
    write_mask(str(root / "candle" / "m.png"))
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,test,normal,candle/0.png,\n"
        "candle,test,anomaly,candle/0.png,candle/m.png\n"
    )
    with pytest.raises(DatasetLayoutError, match=r"listed as normal and as anomalous: .*line 2 and .*line 3"):
        load_anomaly_dataset(str(root))


def test_masks_kept_in_another_folder_of_the_class_are_reported(tmp_path, tiny_model_dir):
    root = str(tmp_path / "data")
    _good(root, "brick")
    for defect in ("crack", "hole"):
        write_image(f"{root}/brick/test/{defect}/000.png")
        write_mask(f"{root}/brick/masks/{defect}/000_mask.png")  # not ground_truth/: no layout rule reads it
    (tmp_path / "data" / "brick" / "notes.txt").write_text("inspection notes")
    write_image(f"{root}/brick/train/good/000.png")  # another split: not reported
    _, unused = _unused(load_anomaly_dataset, root, "test", skip_invalid=True)
    masks = {f"brick/masks/{defect}/000_mask.png" for defect in ("crack", "hole")}
    assert set(unused) == masks | {"brick/notes.txt"}
    assert all("in brick/masks/, which is neither a split folder" in unused[name] for name in masks)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_model_dir, "--data", root, "--output", str(out), "--quiet"]) == 3
    report = json.loads((out / "metrics.json").read_text())
    skipped = {os.path.relpath(item["image_path"], root) for item in report["skipped"]}
    assert masks | {"brick/notes.txt"} <= skipped
    assert all(name in (out / "skipped.txt").read_text() for name in masks)


@pytest.mark.parametrize("spelling", ["absolute", "link", "dotted"])
def test_meta_json_one_image_by_two_spellings_as_normal_and_anomalous_is_refused(tmp_path, spelling):
    root = _meta_root(tmp_path)
    if spelling == "absolute":
        other = str(root / "brick" / "0.png")
    elif spelling == "link":
        os.symlink(root / "brick", root / "alias")
        other = "alias/0.png"
    else:
        other = "coins/../brick/0.png"
    anomalous = json.loads(_entry("brick", 0, anomaly=1, mask="brick/m.png")) | {"img_path": other}
    entries = [_entry("brick", 0), _entry("brick", 1), json.dumps(anomalous)]
    (root / "meta.json").write_text(f'{{"test": {{"brick": [{", ".join(entries)}]}}}}')
    with pytest.raises(DatasetLayoutError, match="is listed as normal and as anomalous") as error:
        load_meta_json(str(root))
    assert "test/brick[0]" in str(error.value) and "test/brick[2]" in str(error.value)


def test_visa_csv_one_image_by_an_absolute_path_is_refused(tmp_path):
    root = tmp_path / "visa"
    write_image(str(root / "candle" / "0.png"))
    write_mask(str(root / "candle" / "m.png"))
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,test,normal,candle/0.png,\n"
        f"candle,test,anomaly,{root / 'candle' / '0.png'},candle/m.png\n"
    )
    with pytest.raises(DatasetLayoutError, match=r"listed as normal and as anomalous: .*line 2 and .*line 3"):
        load_anomaly_dataset(str(root))


def test_a_mask_that_is_the_image_itself_is_refused(tmp_path):
    root = _meta_root(tmp_path)
    entries = [_entry("brick", 0), _entry("brick", 1, anomaly=1, mask="brick/./1.png")]
    (root / "meta.json").write_text(f'{{"test": {{"brick": [{", ".join(entries)}]}}}}')
    with pytest.raises(DatasetLayoutError, match=r"test/brick\[1\] .*: the mask is the image itself"):
        load_meta_json(str(root))
    visa = tmp_path / "visa"
    write_image(str(visa / "candle" / "0.png"))
    write_image(str(visa / "candle" / "1.png"))
    (visa / "split_csv").mkdir()
    (visa / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\ncandle,test,normal,candle/0.png,\ncandle,test,anomaly,candle/1.png,candle/1.png\n"
    )
    with pytest.raises(DatasetLayoutError, match=r"line 3 .*: the mask is the image itself"):
        load_anomaly_dataset(str(visa))


def test_a_mask_given_to_a_normal_entry_is_reported(tmp_path, tiny_model_dir):
    root = _meta_root(tmp_path)
    entries = [_entry("brick", 0, mask="brick/m.png"), _entry("brick", 1), _entry("brick", 2)]
    (root / "meta.json").write_text(f'{{"test": {{"brick": [{", ".join(entries)}]}}}}')
    dataset, unused = _unused(load_meta_json, str(root))
    assert len(dataset) == 3 and dataset["mask"] == [None] * 3
    assert list(unused) == ["brick/m.png"] and "the mask of a normal entry" in unused["brick/m.png"]
    assert "test/brick[0]" in unused["brick/m.png"]
    with pytest.raises(DatasetLayoutError, match=r"brick/m\.png: the mask of a normal entry"):
        load_meta_json(str(root), strict=True)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_model_dir, "--data", str(root), "--output", str(out), "--quiet"]) == 3
    assert "brick/m.png" in (out / "skipped.txt").read_text()
    visa = tmp_path / "visa"
    write_image(str(visa / "candle" / "0.png"))
    write_mask(str(visa / "candle" / "m.png"))
    (visa / "split_csv").mkdir()
    (visa / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\ncandle,test,normal,candle/0.png,candle/m.png\n"
    )
    dataset, unused = _unused(load_anomaly_dataset, str(visa))
    assert len(dataset) == 1 and list(unused) == ["candle/m.png"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (["{root}:test:brick,brick"], "class 'brick' named more than once"),
        (["{root}", "{root}/"], "name the same dataset split: its images"),
        (["{root}:test:brick", "{link}:test:coins,brick"], "name the same dataset split: class(es) brick"),
    ],
)
def test_data_named_twice_is_refused_by_evaluate_and_train(tmp_path, tiny_model_dir, capsys, data, expected):
    root = tmp_path / "data"
    _good(str(root), "brick")
    _good(str(root), "coins")
    os.symlink(root, tmp_path / "link")
    specs = [spec.format(root=root, link=tmp_path / "link") for spec in data]
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_model_dir, "--data", *specs, "--output", str(out), "--quiet"]) == 2
    assert main(["train", "--data", *specs, "--clip", "c", "--output-dir", str(tmp_path / "run")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: --data ") and expected in line for line in errors)
    assert not out.exists() and not (tmp_path / "run").exists()
    # one class each, or two splits of one root, are different images: accepted
    assert (
        main(
            [
                "evaluate",
                "--model",
                tiny_model_dir,
                "--data",
                f"{root}:test:brick",
                f"{root}:test:coins",
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
