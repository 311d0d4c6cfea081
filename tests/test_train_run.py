"""Training runs on the synthetic dataset with tiny random backbones: the loss falls, checkpoints load, a killed run
resumes exactly, cached backbone outputs give the same prompts, outputs are never silently replaced."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from PIL import Image

import crane_hf.training.train as train_module
from crane_hf import CraneForAnomalyDetection, CraneImageProcessor
from crane_hf.commands.train import main
from crane_hf.data import load_data_source
from crane_hf.io.output_safety import MARKER_NAME, read_marker, unowned_entries
from crane_hf.models.crane.configuration_crane import PER_LAYER_COMPUTATION, PUBLISHED_COMPUTATION
from crane_hf.training.checkpoints import prompt_tensors
from crane_hf.training.data_loading import ProcessedImages

from .training_fixtures import backbones, one_thread, synthetic, tiny_training_args

pytestmark = pytest.mark.usefixtures(one_thread.__name__)
__all__ = ["backbones", "synthetic"]  # fixtures used by name


def _args(backbones, synthetic, output_dir, *extra):
    return tiny_training_args(backbones, synthetic, output_dir, *extra, batch_size=4, epochs=2)


def _prompts(folder):
    return prompt_tensors(CraneForAnomalyDetection.from_pretrained(str(folder)))


@pytest.fixture(scope="module")
def uninterrupted(backbones, synthetic, tmp_path_factory):
    """A 2-epoch run without interruption (the reference of the resume and cache tests)."""
    output = tmp_path_factory.mktemp("runs") / "uninterrupted"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(_args(backbones, synthetic, output)) == 0
    torch.set_num_threads(previous)
    return output


def _dataset_loss(model, synthetic):
    """Mean training loss over the whole dataset (train mode: image-conditioned prompts, no gradients)."""
    images = ProcessedImages(
        load_data_source(f"{synthetic}:test"), CraneImageProcessor.from_crane_config(model.config)
    )
    batch = torch.utils.data.default_collate([images[i] for i in range(len(images))])
    model.train()
    with torch.no_grad():
        return model(batch["pixel_values"], labels=batch["labels"], masks=batch["masks"]).loss.item()


def test_a_few_steps_lower_the_loss(uninterrupted, backbones, synthetic):
    set_seed(111)  # the trainer seeds with --seed before building the model: the same initial prompts
    initial = CraneForAnomalyDetection.from_backbones(backbones["clip"], image_size=56)
    trained = CraneForAnomalyDetection.from_pretrained(str(uninterrupted))
    before, after = _dataset_loss(initial, synthetic), _dataset_loss(trained, synthetic)
    assert after < before - 0.05, (before, after)
    log = [json.loads(line) for line in (uninterrupted / "training_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 9))  # 14 images, batch 4: 4 steps per epoch
    assert set(log[0]) == {"epoch", "step", "loss", "focal_loss", "dice_loss", "image_loss"}
    row = log[0]
    assert row["loss"] == pytest.approx(2 * row["focal_loss"] + 2 * row["dice_loss"] + 0.2 * row["image_loss"], 1e-4)


def test_checkpoints_are_loadable_prompts_only_folders(uninterrupted, backbones):
    state = json.loads((uninterrupted / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["global_step"] == 8 and len(state["history"]) == 2
    assert state["settings"]["lr"] == 1e-3 and state["settings"]["adam_betas"] == [0.6, 0.999]
    for epoch in (1, 2):
        folder = uninterrupted / f"checkpoint-epoch-{epoch}"
        assert os.path.getsize(folder / "model.safetensors") < 100_000  # prompts only, no backbones
        assert sorted(os.listdir(folder / "training_state")) == ["optimizer.bin", "random_states_0.pkl"]
        model = CraneForAnomalyDetection.from_pretrained(str(folder))
        assert model.config.clip_backbone == backbones["clip"] and model.config.image_size == 56
    first, last, final = (_prompts(uninterrupted / name) for name in ("checkpoint-epoch-1", "checkpoint-epoch-2", ""))
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert not all(torch.equal(first[k], final[k]) for k in final)
    processor = CraneImageProcessor.from_pretrained(str(uninterrupted))
    assert processor.image_size == 56


def test_run_killed_after_epoch_1_resumes_to_the_same_prompts(
    uninterrupted, backbones, synthetic, tmp_path, monkeypatch
):
    output = tmp_path / "killed"
    real_save = train_module.save_checkpoint

    def save_then_die(accelerator, model, processor, path, state, overwrite):
        real_save(accelerator, model, processor, path, state, overwrite)
        raise KeyboardInterrupt("killed after the epoch-1 checkpoint")

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    assert main(_args(backbones, synthetic, output)) == 130  # Ctrl-C: one line, exit code 130
    monkeypatch.undo()
    assert sorted(name for name in os.listdir(output) if name.startswith("checkpoint-")) == ["checkpoint-epoch-1"]
    assert not (output / "model.safetensors").exists()
    assert unowned_entries(str(output)) == []  # the checkpoint and the log are listed, file by file
    # Another run into the same folder is refused; resuming it is not.
    assert main(_args(backbones, synthetic, output)) == 2
    assert main(_args(backbones, synthetic, output, "--resume-from-checkpoint", "latest")) == 0
    resumed, reference = _prompts(output), _prompts(uninterrupted)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    log = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 9))
    files = read_marker(str(output))["files"]
    assert unowned_entries(str(output)) == [] and not [entry for entry in files if entry.endswith("/")]
    assert "checkpoint-epoch-2/training_state/optimizer.bin" in files and "config.json" in files


def test_a_train_output_lists_every_file_it_wrote(uninterrupted):
    files = set(read_marker(str(uninterrupted))["files"])
    written = {
        os.path.relpath(os.path.join(root, name), uninterrupted).replace(os.sep, "/")
        for root, _, names in os.walk(uninterrupted)
        for name in names
    } - {MARKER_NAME}
    assert files == written and unowned_entries(str(uninterrupted)) == []


@pytest.mark.parametrize("marker", [None, {"written_by": "crane-hf", "command": "predict", "files": []}])
def test_resuming_in_place_needs_a_folder_train_wrote(uninterrupted, backbones, synthetic, tmp_path, marker, capsys):
    folder = tmp_path / "userdir"
    shutil.copytree(uninterrupted / "checkpoint-epoch-1", folder / "checkpoint-epoch-1")
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "notes.txt").write_text("keep")
    if marker is not None:
        (folder / MARKER_NAME).write_text(json.dumps(marker))
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    args = _args(backbones, synthetic, folder, "--resume-from-checkpoint", str(folder / "checkpoint-epoch-1"))
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"refusing to resume in {folder}" in error
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize("listed", [False, True])
def test_resuming_in_place_refuses_to_replace_a_file_train_did_not_write(
    uninterrupted, backbones, synthetic, tmp_path, listed, capsys
):
    folder = tmp_path / "run"
    shutil.copytree(uninterrupted, folder)
    if not listed:  # the user's own config.json, put there after the run
        marker = json.loads((folder / MARKER_NAME).read_text())
        del marker["files"]["config.json"]
        (folder / MARKER_NAME).write_text(json.dumps(marker))
    # listed: the manifest names config.json, but its content is no longer what train wrote
    (folder / "config.json").write_text('{"mine": true}')
    args = _args(backbones, synthetic, folder, "--resume-from-checkpoint", str(folder / "checkpoint-epoch-1"))
    assert main([*args, "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert f"did not write, or changed since it wrote them ({folder / 'config.json'})" in error
    assert (folder / "config.json").read_text() == '{"mine": true}'


def test_resume_refuses_changed_settings(uninterrupted, backbones, synthetic, capsys):
    checkpoint = str(uninterrupted / "checkpoint-epoch-1")
    args = _args(backbones, synthetic, uninterrupted, "--resume-from-checkpoint", checkpoint, "--batch-size", "2")
    assert main(args) == 2
    assert "batch_size: checkpoint 4, now 2" in capsys.readouterr().err


def test_resume_refuses_another_computation_and_reads_old_checkpoints_as_per_layer(
    uninterrupted, backbones, synthetic, capsys
):
    checkpoint = str(uninterrupted / "checkpoint-epoch-1")
    args = _args(
        backbones, synthetic, uninterrupted, "--resume-from-checkpoint", checkpoint, "--eattn-maps", "per_layer"
    )
    assert main(args) == 2
    assert "eattn_map_source: checkpoint 'last_layer', now 'per_layer'" in capsys.readouterr().err
    state = json.loads((uninterrupted / "trainer_state.json").read_text())
    assert {name: state["settings"][name] for name in PUBLISHED_COMPUTATION} == PUBLISHED_COMPUTATION
    old = {key: value for key, value in state["settings"].items() if key not in PUBLISHED_COMPUTATION}
    train_module._check_resume_settings(old, {**old, **PER_LAYER_COMPUTATION}, "old-checkpoint")  # ran per layer
    with pytest.raises(ValueError, match="dattn_input: checkpoint 'layer_input', now 'after_attention'"):
        train_module._check_resume_settings(old, state["settings"], "old-checkpoint")


def test_the_per_layer_variant_trains(backbones, synthetic, tmp_path):
    output = tmp_path / "per-layer"
    per_layer = ["--eattn-maps", "per_layer", "--dattn-input", "layer_input", "--deep-prompt-rounding", "none"]
    assert main(tiny_training_args(backbones, synthetic, output, *per_layer, batch_size=7, epochs=1)) == 0
    trained = CraneForAnomalyDetection.from_pretrained(str(output))
    assert trained.config.computation == PER_LAYER_COMPUTATION
    log = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(row["loss"] > 0 for row in log)
    initial = CraneForAnomalyDetection.from_backbones(backbones["clip"], image_size=56, **PER_LAYER_COMPUTATION)
    assert any(
        not torch.equal(a, b) for a, b in zip(prompt_tensors(trained).values(), prompt_tensors(initial).values())
    )


def test_cached_features_give_the_same_prompts(uninterrupted, backbones, synthetic, tmp_path):
    output = tmp_path / "cached"
    assert main(_args(backbones, synthetic, output, "--cache-features", "--report-to", "tensorboard")) == 0
    cached, reference = _prompts(output), _prompts(uninterrupted)
    for name in reference:
        torch.testing.assert_close(cached[name], reference[name], rtol=1e-4, atol=1e-6)
    assert not (output / "feature_cache").exists()  # the default cache is scratch
    assert any(files for _, _, files in os.walk(output / "logs"))  # TensorBoard events
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["settings"]["cache_features"] is True and state["history"][0]["steps"] == 4


def test_feature_cache_is_reused_and_refused_for_other_settings(backbones, synthetic, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = _args(backbones, synthetic, tmp_path / "a", "--cache-features", "--feature-cache-dir", str(cache))
    assert main([*args, "--epochs", "1"]) == 0
    entries = sorted(os.listdir(cache))
    assert entries[0] == "00000000.safetensors" and "cache_info.json" in entries and len(entries) == 15
    stamp = os.path.getmtime(cache / "00000003.safetensors")
    args = _args(backbones, synthetic, tmp_path / "b", "--cache-features", "--feature-cache-dir", str(cache))
    assert main([*args, "--epochs", "1"]) == 0
    assert os.path.getmtime(cache / "00000003.safetensors") == stamp  # reused, not recomputed
    assert main([*args, "--epochs", "1", "--image-size", "28", "--overwrite"]) == 2
    assert "made for another setting (differs in: model)" in capsys.readouterr().err
    # The key holds the computation (which maps are cached) and the data's content, not the data's paths.
    assert main([*args, "--epochs", "1", "--eattn-maps", "per_layer", "--overwrite"]) == 2
    assert "made for another setting (differs in: model)" in capsys.readouterr().err
    copy = tmp_path / "copy" / "data"
    shutil.copytree(synthetic, copy)
    args = _args(backbones, str(copy), tmp_path / "c", "--cache-features", "--feature-cache-dir", str(cache))
    assert main([*args, "--epochs", "1"]) == 0
    assert os.path.getmtime(cache / "00000003.safetensors") == stamp  # the same content elsewhere: reused
    first = copy / "brick" / "test" / "good" / "000.png"
    pixels = np.asarray(Image.open(first)).copy()
    pixels[0, 0] ^= 1  # one pixel differs
    Image.fromarray(pixels).save(first)
    assert main([*args, "--epochs", "1", "--overwrite"]) == 2
    assert "made for another setting (differs in: images_sha256)" in capsys.readouterr().err


def test_crane_plus_trains_with_dino(backbones, synthetic, tmp_path):
    output = tmp_path / "plus"
    args = _args(backbones, synthetic, output, "--variant", "crane+", "--dino", backbones["dino"], "--epochs", "1")
    assert main(args) == 0
    model = CraneForAnomalyDetection.from_pretrained(str(output))
    assert model.config.use_dattn and model.config.dino_backbone == backbones["dino"]


def test_bad_inputs_are_reported(backbones, synthetic, tmp_path, capsys):
    assert main(_args(backbones, synthetic, tmp_path / "x", "--dino", backbones["dino"])) == 2
    assert "--dino is used by --variant crane+ only" in capsys.readouterr().err
    assert main(_args(backbones, str(tmp_path / "missing"), tmp_path / "x")) == 2
    assert "No dataset folder" in capsys.readouterr().err
    assert main(_args(backbones, synthetic, tmp_path / "x", "--epochs", "0", "--lr", "-1")) == 2
    assert "--epochs must be positive; --lr must be positive" in capsys.readouterr().err


def test_anomalous_image_without_mask_is_named(backbones, synthetic, tmp_path, capsys):
    with open(os.path.join(synthetic, "meta.json")) as stream:
        meta = json.load(stream)
    meta["test"]["brick"][-1]["mask_path"] = ""
    root = tmp_path / "nomask"
    root.mkdir()
    os.symlink(os.path.join(synthetic, "brick"), root / "brick")
    (root / "meta.json").write_text(json.dumps({"test": {"brick": meta["test"]["brick"]}}))
    assert main(_args(backbones, str(root), tmp_path / "x")) == 2
    assert "test/brick[6]" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["crane", "crane+"])
def test_a_missing_backbone_is_refused_before_any_output(synthetic, tmp_path, capsys, monkeypatch, variant):
    """Offline, with the default Hub backbones not cached: one line (the message's lines joined with "; ") with the
    download commands, the folders to point at and the offline trial, and no output folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    output = tmp_path / "my-prompts"
    assert main(["--data", f"{synthetic}:test", "--output-dir", str(output), "--variant", variant]) == 2
    (message,) = capsys.readouterr().err.splitlines()
    assert message.startswith(
        "error: Training needs the backbone openai/clip-vit-large-patch14-336, which is neither in the Hugging Face "
        "cache nor downloadable here (HF_HUB_OFFLINE is set)."
    )
    assert "; hf download openai/clip-vit-large-patch14-336 --local-dir clip-vit-large-patch14-336; " in message
    if variant == "crane+":
        assert "; hf download facebook/dinov2-with-registers-base --local-dir dinov2-with-registers-base; " in message
        assert "--clip clip-vit-large-patch14-336 --dino dinov2-with-registers-base ..." in message
        assert "then --clip small-backbones/clip --dino small-backbones/dinov2" in message
    else:
        assert "dinov2" not in message
    assert "python -m crane_hf.small_backbones --output small-backbones" in message
    assert "Traceback" not in message
    assert not output.exists()


def test_a_backbone_that_is_no_folder_and_no_hub_id_is_named(synthetic, tmp_path, capsys):
    output = tmp_path / "my-prompts"
    assert main(["--data", f"{synthetic}:test", "--output-dir", str(output), "--clip", "./no-such-clip"]) == 2
    assert capsys.readouterr().err == "error: --clip ./no-such-clip: no such folder, and not a valid Hub id.\n"
    assert not output.exists()


def test_tensorboard_missing_is_refused_before_any_work(backbones, synthetic, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "is_tensorboard_available", lambda: False)
    output = tmp_path / "logged"
    assert main(_args(backbones, synthetic, output, "--report-to", "tensorboard")) == 2
    assert capsys.readouterr().err == (
        "error: --report-to tensorboard needs TensorBoard, which is not installed (pip install tensorboard).\n"
    )
    assert not output.exists()


def test_small_random_backbones_are_written_as_model_folders(tmp_path, capsys):
    """`python -m crane_hf.small_backbones --output DIR`: the folders `--clip` / `--dino` point at, said random."""
    from transformers import AutoModel, CLIPModel

    from crane_hf.small_backbones import main as write_backbones
    from crane_hf.small_backbones import small_random_backbones

    assert write_backbones(["--output", str(tmp_path / "small"), "--image-size", "112"]) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    clip, dino = small_random_backbones(0, image_size=112)
    for name, model, loader in (("clip", clip, CLIPModel), ("dinov2", dino, AutoModel)):
        loaded = loader.from_pretrained(str(tmp_path / "small" / name))
        assert type(loaded) is type(model)
        for key, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], tensor), key
        assert "MEANINGLESS" in (tmp_path / "small" / name / "README.md").read_text()
    assert write_backbones(["--output", str(tmp_path / "small")]) == 2  # never replaced unless asked
    assert "already exists" in capsys.readouterr().err
