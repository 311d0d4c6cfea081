"""Training checks its data before the first step: rows that cannot be read, data that cannot teach (no anomalous
image, no anomalous pixel); it resumes by the content of the data and the backbones, whatever the paths look like;
a truncated training state is named."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from crane_hf.commands.train import main

from .image_files import write_image, write_mask
from .training_fixtures import backbones, one_thread, synthetic, tiny_training_args

pytestmark = pytest.mark.usefixtures(one_thread.__name__)
__all__ = ["backbones", "synthetic"]  # fixtures used by name


def _args(backbones, data, output, *extra, epochs: int = 1):
    return ["--data", f"{data}:test", *tiny_training_args(backbones, "unused", output, *extra, epochs=epochs)[2:]]


def _folder_dataset(root, masks: str = "defects") -> str:
    """part/test/good (3 images) and, unless masks == "none", part/test/scratch (2 images) with masks that mark a
    defect ("defects") or nothing ("empty")."""
    rng = np.random.default_rng(0)
    for index in range(3):
        path = os.path.join(root, "part", "test", "good", f"{index}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    if masks != "none":
        for index in range(2):
            write_image(os.path.join(root, "part", "test", "scratch", f"{index}.png"), (40, 40))
            write_mask(
                os.path.join(root, "part", "ground_truth", "scratch", f"{index}_mask.png"),
                (40, 40),
                defect=masks == "defects",
            )
    return str(root)


def test_normal_only_data_is_refused_unless_asked(backbones, tmp_path, capsys):
    data = _folder_dataset(tmp_path / "normal-only", masks="none")
    assert main(_args(backbones, data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "has no anomalous image (3 normal images)" in err and "--allow-no-anomalies" in err
    assert not (tmp_path / "run" / "training_log.jsonl").exists()
    assert main(_args(backbones, data, tmp_path / "run2", "--allow-no-anomalies")) == 0


def test_data_whose_masks_mark_nothing_is_refused(backbones, tmp_path, capsys):
    data = _folder_dataset(tmp_path / "empty-masks", masks="empty")
    assert main(_args(backbones, data, tmp_path / "run")) == 2
    assert "has no anomalous pixel in any mask (2 anomalous images, every mask empty at 56 x 56)" in (
        capsys.readouterr().err
    )


def test_unreadable_rows_are_all_found_before_the_first_step(backbones, synthetic, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic, data)
    broken = []
    for relative in ("brick/test/good/000.png", "coins/test/good/001.png"):
        path = data / relative
        content = path.read_bytes()
        path.write_bytes(content[: len(content) // 2])  # the header is intact: only a decode finds it
        broken.append(str(path))
    output = tmp_path / "run"
    assert main(_args(backbones, str(data), output)) == 2
    err = capsys.readouterr().err
    assert "2 training image(s) cannot be prepared, found before the first step" in err
    assert all(path in err for path in broken) and "truncated" in err
    assert not (output / "training_log.jsonl").exists()  # no step was taken


@pytest.fixture(scope="module")
def first_epoch(backbones, synthetic, tmp_path_factory):
    """One epoch trained with the data named by a relative path from its parent folder."""
    work = tmp_path_factory.mktemp("resume")
    previous = os.getcwd()
    os.chdir(os.path.dirname(synthetic))
    try:
        assert main(_args(backbones, os.path.basename(synthetic), work / "run")) == 0
    finally:
        os.chdir(previous)
    return work / "run"


def test_resume_accepts_the_same_data_named_otherwise(first_epoch, backbones, synthetic, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(first_epoch, output)
    assert main(_args(backbones, synthetic + "/", output, "--resume-from-checkpoint", "latest", epochs=2)) == 0
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["epoch"] == 2


def test_resume_accepts_a_copy_of_the_data_elsewhere(first_epoch, backbones, synthetic, tmp_path):
    copy = tmp_path / "copy" / "elsewhere"
    shutil.copytree(synthetic, copy)
    output = tmp_path / "run"
    shutil.copytree(first_epoch, output)
    assert main(_args(backbones, str(copy), output, "--resume-from-checkpoint", "latest", epochs=2)) == 0


def test_resume_refuses_other_data_with_the_same_relative_name(first_epoch, backbones, synthetic, tmp_path, capsys):
    other = tmp_path / os.path.basename(synthetic)
    shutil.copytree(synthetic, other)
    first = other / "brick" / "test" / "good" / "000.png"
    pixels = np.asarray(Image.open(first)).copy()
    pixels[0, 0] ^= 1  # one pixel differs
    Image.fromarray(pixels).save(first)
    output = tmp_path / "run"
    shutil.copytree(first_epoch, output)
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        argv = _args(backbones, os.path.basename(synthetic), output, "--resume-from-checkpoint", "latest", epochs=2)
        assert main(argv) == 2
    finally:
        os.chdir(previous)
    err = capsys.readouterr().err
    assert "data_sha256: checkpoint" in err and "the data's content changed, whatever the paths" in err


def test_resume_refuses_other_backbone_weights_at_the_same_path(first_epoch, backbones, tmp_path, synthetic, capsys):
    from transformers import CLIPModel

    clip = tmp_path / "clip"
    model = CLIPModel.from_pretrained(backbones["clip"])
    model.visual_projection.weight.data[0, 0] += 1.0
    model.save_pretrained(clip)
    output = tmp_path / "run"
    shutil.copytree(first_epoch, output)
    argv = _args(backbones, synthetic, output, "--resume-from-checkpoint", "latest", "--clip", str(clip), epochs=2)
    assert main(argv) == 2
    assert "the backbones' weights changed" in capsys.readouterr().err


def test_a_truncated_optimizer_state_is_named(first_epoch, backbones, synthetic, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(first_epoch, output)
    optimizer = output / "checkpoint-epoch-1" / "training_state" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert main(_args(backbones, synthetic, output, "--resume-from-checkpoint", "latest", epochs=2)) == 2
    err = capsys.readouterr().err
    assert f"{optimizer}: truncated or corrupt" in err and "Traceback" not in err


def test_strict_training_refuses_unused_files(backbones, tmp_path, capsys):
    data = _folder_dataset(tmp_path / "data")
    write_image(os.path.join(data, "part", "test", "scratch", "later", "2.png"), (40, 40))
    assert main(_args(backbones, data, tmp_path / "run", "--strict")) == 2
    assert "part/test/scratch/later/2.png: in a subfolder of part/test/scratch/" in capsys.readouterr().err
    assert main(_args(backbones, data, tmp_path / "run2")) == 0  # without --strict: trained, the file reported


def test_a_trainer_state_that_is_not_json_is_named(first_epoch, backbones, synthetic, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(first_epoch, output)
    state = output / "checkpoint-epoch-1" / "trainer_state.json"
    state.write_text('{"epoch": 1, "settings": ')
    assert main(_args(backbones, synthetic, output, "--resume-from-checkpoint", "latest", epochs=2)) == 2
    err = capsys.readouterr().err
    assert f"{state}: not a readable trainer state" in err and "Traceback" not in err
