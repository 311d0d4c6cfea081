"""Model folders from strangers (docs/robustness.md, "Untrusted files"): sizes in config.json are refused
before anything is allocated, shards stay inside the folder, damaged safetensors files and bad preprocessor values
are named with their file and field, and a missing config.json is named as missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import pytest
from safetensors.torch import load_file, save_file

from crane_hf import CraneForAnomalyDetection
from crane_hf.commands.cli import main
from crane_hf.model_loading import load_model
from crane_hf.models.crane.checkpoint_validation import CheckpointMismatchError

from .tiny_models import tiny_model, write_test_images


@pytest.fixture
def folder(tmp_path, tiny_model_dir):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def _edit_json(path, key: str, value) -> None:
    data = json.loads(path.read_text())
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("clip_config.text_config.intermediate_size", 10**9, "billion weights"),
        ("clip_config.vision_config.hidden_size", 10**6, "billion weights"),
        ("clip_config.vision_config.image_size", 140000, "billion weights"),
        ("dino_config.hidden_size", 10**5, "billion weights"),
        ("image_size", 140000, "image_size=140000 exceeds the largest supported input side 2048"),
        ("clip_config.text_config.intermediate_size", 1e9, "intermediate_size must be an integer, got float"),
        ("clip_config.vision_config.hidden_size", -32, "clip_config.vision_config.hidden_size=-32 must be at least 1"),
        ("clip_config.vision_config.num_attention_heads", 0, "num_attention_heads=0 must be at least 1"),
        ("clip_config.vision_config.num_attention_heads", 5, "hidden_size=32 is not a multiple of num_attention_h"),
        ("clip_config.vision_config.patch_size", 0, "clip_config.vision_config.patch_size=0 must be at least 1"),
        ("clip_config.text_config.vocab_size", 0, "clip_config.text_config.vocab_size=0 must be at least 1"),
        ("dino_config.num_hidden_layers", "x", "dino_config.num_hidden_layers must be an integer, got str"),
        ("dino_config.mlp_ratio", -1, "dino_config.mlp_ratio=-1 must be a number in (0, 64]"),
        ("image_size", "56", "image_size must be an integer, got str"),
        ("image_size", 0, "image_size=0 must be at least 1"),
        ("feature_layers", "abc", "feature_layers must be a list of layer numbers"),
        ("smoothing_sigma", 1e9, "smoothing_sigma=1000000000.0 exceeds the limit of 256"),
        ("clip_config", [1, 2], "clip_config must be a CLIPConfig or a dict, got list"),
    ],
)
def test_config_sizes_are_refused_before_anything_is_allocated(folder, key, value, message, monkeypatch):
    _edit_json(folder / "config.json", key, value)
    monkeypatch.setattr(
        CraneForAnomalyDetection, "__init__", lambda *a, **k: pytest.fail("the model was built before the refusal")
    )
    with pytest.raises(ValueError) as error:
        load_model(str(folder), device="cpu")
    assert str(error.value).startswith(f"{folder / 'config.json'}: ") and message in str(error.value)


def test_the_command_line_names_the_file_and_field_in_one_line(folder, tmp_path, capsys):
    _edit_json(folder / "config.json", "clip_config.text_config.intermediate_size", 10**9)
    write_test_images(tmp_path / "photos", count=1)
    argv = ["predict", str(tmp_path / "photos"), "--model", str(folder), "--output", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder / 'config.json'}: the backbone sizes imply")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def sharded(tmp_path):
    folder = tmp_path / "sharded"
    tiny_model("crane").save_pretrained(folder, max_shard_size="200KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    CraneForAnomalyDetection.from_pretrained(folder)  # intact: loads
    return folder


@pytest.mark.parametrize("shard_path", ["../other/model.safetensors", "/etc/passwd", "sub/../../x.safetensors", ".."])
def test_shard_paths_of_an_index_stay_inside_the_folder(sharded, tmp_path, shard_path):
    other = tmp_path / "other"
    other.mkdir()
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(sharded / first, other / "model.safetensors")  # valid weights, outside the model folder
    index["weight_map"] = {name: shard_path if file == first else file for name, file in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointMismatchError) as error:
        CraneForAnomalyDetection.from_pretrained(sharded)
    assert f"{index_path}: shard paths must be file names inside the model folder" in str(error.value)
    assert repr(shard_path) in str(error.value)


def test_a_shard_that_is_a_link_out_of_the_folder_is_refused(sharded, tmp_path):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(sharded / first, outside)
    os.symlink(outside, sharded / first)
    with pytest.raises(CheckpointMismatchError, match=rf"the weight shards {first} lead outside"):
        CraneForAnomalyDetection.from_pretrained(sharded)


def test_a_malformed_index_is_named(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index_path.write_text('{"weight_map": ["not", "a", "map"]}')
    with pytest.raises(CheckpointMismatchError, match=re.escape(f"{index_path}: not a valid index")):
        CraneForAnomalyDetection.from_pretrained(sharded)


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:100])


def _oversized_header(path) -> None:
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}" + b"\0" * 64)  # the header claims a terabyte


@pytest.mark.parametrize("damage", [_truncate, _oversized_header], ids=["truncated", "oversized header"])
def test_damaged_safetensors_files_are_named(folder, tmp_path, damage, capsys):
    damage(folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as error:
        CraneForAnomalyDetection.from_pretrained(folder)
    assert str(error.value).startswith(f"{folder / 'model.safetensors'}: not a valid safetensors file (")
    write_test_images(tmp_path / "photos", count=1)
    argv = ["predict", str(tmp_path / "photos"), "--model", str(folder), "--output", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not a valid safetensors file" in lines[0] and "Traceback" not in lines[0]


def test_a_damaged_prompts_only_checkpoint_is_named(tmp_path):
    model = tiny_model("crane")
    model.clip.save_pretrained(tmp_path / "clip")
    model.config.clip_backbone = str(tmp_path / "clip")
    model.save_pretrained(tmp_path / "prompts", include_backbones=False)
    assert set(load_file(tmp_path / "prompts" / "model.safetensors")) == {
        name for name in model.state_dict() if name.startswith("prompt_learner.")
    }
    _truncate(tmp_path / "prompts" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"model\.safetensors: not a valid safetensors file"):
        CraneForAnomalyDetection.from_pretrained(tmp_path / "prompts")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("image_size", 0, "image_size must be an integer in [1, 2048], got 0"),
        ("image_size", 140000, "image_size must be an integer in [1, 2048], got 140000"),
        ("image_size", "abc", "image_size must be an integer in [1, 2048], got 'abc'"),
        ("image_mean", [0.5, 0.5], "image_mean must be 3 finite numbers (R, G, B), got [0.5, 0.5]"),
        ("image_std", [0.0, 1.0, 1.0], "image_std must be 3 positive finite numbers (R, G, B)"),
        ("image_std", ["a", 1.0, 1.0], "image_std must be 3 positive finite numbers"),
        ("smoothing_sigma", 1e9, "smoothing_sigma must be a number in [0, 256], got 1000000000.0"),
        ("smoothing_sigma", -1, "smoothing_sigma must be a number in [0, 256], got -1"),
    ],
)
def test_preprocessor_values_are_named_with_the_file(folder, key, value, message):
    _edit_json(folder / "preprocessor_config.json", key, value)
    with pytest.raises(ValueError) as error:
        load_model(str(folder), device="cpu")
    assert str(error.value).startswith(f"{folder / 'preprocessor_config.json'}: {message}")


def test_non_finite_preprocessor_values_are_refused(folder):
    path = folder / "preprocessor_config.json"
    path.write_text(path.read_text().replace("0.48145466", "NaN"))  # Python's json reads NaN
    with pytest.raises(ValueError, match=r"preprocessor_config.json: image_mean must be 3 finite numbers"):
        load_model(str(folder), device="cpu")


def test_a_missing_config_is_named_as_missing(folder):
    os.remove(folder / "config.json")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{folder / 'config.json'} is missing: {folder} is not a")):
        load_model(str(folder), device="cpu")
    save_file({}, str(folder / "x.safetensors"))
    with pytest.raises(NotADirectoryError, match="is a file; give the model folder"):
        load_model(str(folder / "x.safetensors"), device="cpu")


def test_an_oversized_json_file_of_a_model_folder_is_refused_before_it_is_read(tiny_model_dir, tmp_path, capsys):
    from PIL import Image

    from crane_hf.model_loading import MAX_JSON_BYTES

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = model / "config.json"
    with open(config, "ab") as stream:  # one byte over the limit: refused from its size, never read
        stream.truncate(MAX_JSON_BYTES + 1)
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "photos" / "a.png")
    expected = f"error: {config}: refused, {MAX_JSON_BYTES + 1:,} bytes exceeds the limit of {MAX_JSON_BYTES:,} bytes"
    for argv in (
        ["predict", str(tmp_path / "photos"), "--model", str(model), "--output", str(tmp_path / "out"), "--quiet"],
        ["calibrate", str(model), str(tmp_path / "photos"), "--quiet"],
    ):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().startswith(expected), argv
    assert not (tmp_path / "out").exists()


def _repeat_key(path, key: str, value) -> None:
    """Write `key` a second time at the top of the JSON object in `path` (the original entry stays after it)."""
    text = path.read_text()
    assert f'"{key}"' in text
    path.write_text(text.replace("{", "{" + json.dumps(key) + ": " + json.dumps(value) + ", ", 1))


def test_a_config_repeating_a_key_is_refused_naming_file_and_key(folder, tmp_path, capsys):
    _repeat_key(folder / "config.json", "image_threshold", 0.01)
    with pytest.raises(
        ValueError, match=re.escape(f"{folder / 'config.json'}: key 'image_threshold' appears 2 times")
    ):
        load_model(str(folder), device="cpu")
    with pytest.raises(ValueError, match="key 'image_threshold' appears 2 times"):
        CraneForAnomalyDetection.from_pretrained(folder)
    write_test_images(tmp_path / "photos", count=1)
    argv = ["predict", str(tmp_path / "photos"), "--model", str(folder), "--output", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(folder / "config.json") in lines[0] and "'image_threshold'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_calibrate_refuses_a_config_repeating_a_key(folder, tmp_path, capsys):
    write_test_images(tmp_path / "normals", count=2)
    _repeat_key(folder / "config.json", "pixel_threshold", 0.01)
    before = (folder / "config.json").read_bytes()
    assert main(["calibrate", str(folder), str(tmp_path / "normals"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'pixel_threshold' appears 2 times" in err and str(folder / "config.json") in err
    assert (folder / "config.json").read_bytes() == before


def test_a_preprocessor_config_or_index_repeating_a_key_is_refused(folder, sharded):
    processor_file = folder / "preprocessor_config.json"
    if not processor_file.exists():
        load_model(str(folder), device="cpu")[1].save_pretrained(folder)
    _repeat_key(processor_file, "smoothing_sigma", 0.0)
    with pytest.raises(ValueError, match=re.escape(f"{processor_file}: key 'smoothing_sigma' appears 2 times")):
        load_model(str(folder), device="cpu")
    index_path = sharded / "model.safetensors.index.json"
    _repeat_key(index_path, "weight_map", {})
    with pytest.raises(CheckpointMismatchError, match="key 'weight_map' appears 2 times"):
        CraneForAnomalyDetection.from_pretrained(sharded)


@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json", "model.safetensors"])
@pytest.mark.parametrize("kind", ["dangling link", "named pipe", "link to /dev/zero", "folder"])
def test_a_model_file_that_is_not_a_regular_file_is_named_never_taken_as_missing(folder, tmp_path, name, kind, capsys):
    """A broken link (a half-deleted Hub cache), a named pipe, a device or a folder under the name of a file of the
    model folder is refused naming it: not called missing, and never replaced by defaults (a preprocessor config
    that cannot be read must not silently become the one the config implies)."""
    if kind == "named pipe" and not hasattr(os, "mkfifo"):
        pytest.skip("named pipes are POSIX")
    path = folder / name
    os.remove(path)
    if kind == "dangling link":
        os.symlink(tmp_path / "gone" / name, path)
    elif kind == "named pipe":
        os.mkfifo(path)
    elif kind == "link to /dev/zero":
        os.symlink("/dev/zero", path)
    else:
        os.mkdir(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a regular file")):
        load_model(str(folder), device="cpu")
    write_test_images(tmp_path / "images", count=1)
    argv = ["predict", str(tmp_path / "images"), "--model", str(folder), "--output", str(tmp_path / "out"), "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"{path}: not a regular file" in error
    assert not os.path.exists(tmp_path / "out")
