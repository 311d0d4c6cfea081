"""Converting official Crane prompt checkpoints: synthetic original-format files and the real official files."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import pytest
import torch
from transformers import CLIPModel, Dinov2WithRegistersModel

from crane_hf import CraneForAnomalyDetection
from crane_hf.commands.convert import main
from crane_hf.models.crane.configuration_crane import PER_LAYER_COMPUTATION, PUBLISHED_COMPUTATION
from crane_hf.models.crane.convert_original import (
    BackboneMismatchError,
    convert_original_checkpoint,
    load_original_checkpoint,
)

from .tiny_models import (
    OFFICIAL_DIR,
    OFFICIAL_FILES,
    TINY_SIZE,
    fingerprint_compatible_clip,
    randomize_,
    tiny_clip_config,
    tiny_config,
    tiny_dino_config,
)


def _original_format_checkpoint(clip: CLIPModel, path, num_deep: int = 3, seed: int = 0) -> dict:
    """What the official PromptLearner saves, built from `clip`'s own token embeddings (0-padded ids)."""
    ids = torch.tensor(tiny_config().prompt_token_ids)
    ids = torch.where(ids == 49407, torch.zeros_like(ids), ids)
    for row in ids:
        row[(row == 0).nonzero()[0]] = 49407  # first padding position is the real EOT
    embedding = clip.text_model.embeddings.token_embedding.weight.detach()
    generator = torch.Generator().manual_seed(seed)
    width = embedding.shape[1]
    state = {
        "ctx_pos": torch.randn(1, 1, 12, width, generator=generator),
        "ctx_neg": torch.randn(1, 1, 12, width, generator=generator),
        **{f"compound_prompts_text.{i}": torch.randn(4, width, generator=generator) for i in range(num_deep)},
    }
    for name, row in (("pos", ids[0]), ("neg", ids[1])):
        state[f"tokenized_prompts_{name}"] = row.int().view(1, 1, 77)
        state[f"token_prefix_{name}"] = embedding[row[:1]].view(1, 1, 1, width).clone()
        state[f"token_suffix_{name}"] = embedding[row[13:]].view(1, 1, 64, width).clone()
    torch.save({"prompt_learner": state}, path)
    return state


@pytest.fixture
def backbones(tmp_path):
    torch.manual_seed(0)
    clip = randomize_(CLIPModel(tiny_clip_config()), seed=1)
    dino = randomize_(Dinov2WithRegistersModel(tiny_dino_config()), seed=2)
    clip.save_pretrained(tmp_path / "clip")
    dino.save_pretrained(tmp_path / "dino")
    return clip, dino, str(tmp_path / "clip"), str(tmp_path / "dino")


def test_synthetic_checkpoint_converts_with_its_prompts(backbones, tmp_path):
    clip, dino, _, _ = backbones
    state = _original_format_checkpoint(clip, tmp_path / "epoch_5.pth")
    model = convert_original_checkpoint(
        str(tmp_path / "epoch_5.pth"), clip, dino, variant="crane+", image_size=TINY_SIZE
    )
    assert torch.equal(model.prompt_learner.ctx_normal, state["ctx_pos"][0, 0])
    assert torch.equal(model.prompt_learner.ctx_anomalous, state["ctx_neg"][0, 0])
    for i in range(3):
        assert torch.equal(model.prompt_learner.deep_prompts[i], state[f"compound_prompts_text.{i}"])
    assert model.config.variant == "crane+" and model.config.num_deep_prompts == 3
    # the computation the official prompts were trained with, and where they came from
    assert model.config.computation == PUBLISHED_COMPUTATION
    digest = hashlib.sha256((tmp_path / "epoch_5.pth").read_bytes()).hexdigest()
    assert model.config.converted_from == {"checkpoint": "epoch_5.pth", "sha256": digest}


def test_other_clip_weights_are_refused_unless_allowed(backbones, tmp_path):
    clip = backbones[0]
    path = str(tmp_path / "epoch_5.pth")
    _original_format_checkpoint(clip, path)
    other = randomize_(CLIPModel(tiny_clip_config()), seed=9)
    with pytest.raises(BackboneMismatchError, match="token_prefix_pos/token_suffix_pos differ"):
        convert_original_checkpoint(path, other, variant="crane", image_size=TINY_SIZE)
    model = convert_original_checkpoint(
        path, other, variant="crane", image_size=TINY_SIZE, allow_backbone_mismatch=True
    )
    assert model.config.variant == "crane"


def test_other_prompt_texts_are_refused(backbones, tmp_path):
    clip, _, _, _ = backbones
    path = str(tmp_path / "epoch_5.pth")
    _original_format_checkpoint(clip, path)
    with pytest.raises(BackboneMismatchError, match="prompt ids differ"):
        convert_original_checkpoint(
            path, clip, variant="crane", image_size=TINY_SIZE, anomalous_prompt_words="broken object."
        )


@pytest.mark.parametrize("name", OFFICIAL_FILES)
def test_real_official_files_load_and_a_tiny_backbone_is_refused(name, backbones):
    path = os.path.join(OFFICIAL_DIR, name)
    state = load_original_checkpoint(path)
    assert state["ctx_pos"].shape == (1, 1, 12, 768)
    assert len([k for k in state if k.startswith("compound_prompts_text.")]) == 8
    clip, dino, _, _ = backbones
    variant = "crane+" if "cranep" in name else "crane"
    with pytest.raises(BackboneMismatchError, match="768-wide"):
        convert_original_checkpoint(
            path, clip, dino if variant == "crane+" else None, variant=variant, allow_backbone_mismatch=True
        )


@pytest.fixture(scope="module")
def paper_text_clips():
    """CLIPs with the paper's 768-wide text tower and OpenAI's Hub special ids (eos 2): one with the token
    embeddings the official prompts were trained with (their fingerprint), one with those embeddings perturbed."""
    matching = fingerprint_compatible_clip("crane+/mvtec", openai_hub_ids=True)
    other = copy.deepcopy(matching)
    with torch.no_grad():
        embedding = other.text_model.embeddings.token_embedding.weight
        embedding.add_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(0)) * 1e-2)
    return matching, other


@pytest.mark.parametrize("name", OFFICIAL_FILES)
def test_real_official_files_convert_on_their_clip_and_the_fingerprint_refuses_another(name, paper_text_clips):
    matching, other = paper_text_clips
    path = os.path.join(OFFICIAL_DIR, name)
    variant = "crane+" if "cranep" in name else "crane"
    dino = randomize_(Dinov2WithRegistersModel(tiny_dino_config()), seed=2) if variant == "crane+" else None
    model = convert_original_checkpoint(path, matching, dino, variant=variant, image_size=TINY_SIZE)
    state = load_original_checkpoint(path)
    assert torch.equal(model.prompt_learner.ctx_normal, state["ctx_pos"].reshape(12, 768).float())
    assert torch.equal(model.prompt_learner.ctx_anomalous, state["ctx_neg"].reshape(12, 768).float())
    with torch.inference_mode():
        output = model.eval()(torch.zeros(1, 3, TINY_SIZE, TINY_SIZE))
    assert torch.isfinite(output.anomaly_maps).all()
    with pytest.raises(BackboneMismatchError, match="differ from this CLIP's token embeddings"):
        convert_original_checkpoint(path, other, dino, variant=variant, image_size=TINY_SIZE)


def test_real_official_fingerprint_matches_the_bundled_vocabulary_ids():
    state = load_original_checkpoint(os.path.join(OFFICIAL_DIR, OFFICIAL_FILES[0]))
    ids = state["tokenized_prompts_neg"].reshape(-1).tolist()
    assert ids[:17] == [49406, *[343] * 12, 13568, 14115, 269, 49407]


def test_command_line_writes_a_loadable_folder_and_never_overwrites(backbones, tmp_path, capsys):
    clip, _, clip_dir, dino_dir = backbones
    checkpoint = str(tmp_path / "epoch_1.pth")
    _original_format_checkpoint(clip, checkpoint)
    output = tmp_path / "converted"
    argv = [
        "--clip",
        clip_dir,
        "--dino",
        dino_dir,
        "--variant",
        "crane+",
        "--checkpoint",
        checkpoint,
        "--output",
        str(output),
        "--image-size",
        str(TINY_SIZE),
        "--soft-mean",
    ]
    assert main(argv) == 0
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(output))
    model = CraneForAnomalyDetection.from_pretrained(output)
    assert model.config.soft_mean is True and model.config.variant == "crane+"
    saved = json.loads((output / "config.json").read_text())
    assert "official_code_compat" not in saved
    assert {name: saved[name] for name in PUBLISHED_COMPUTATION} == PUBLISHED_COMPUTATION
    assert model.config.computation == PUBLISHED_COMPUTATION
    assert saved["converted_from"]["checkpoint"] == "epoch_1.pth"
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_command_line_takes_the_shared_computation_options(backbones, tmp_path):
    clip, _, clip_dir, dino_dir = backbones
    checkpoint = str(tmp_path / "epoch_1.pth")
    _original_format_checkpoint(clip, checkpoint)
    common = ["--clip", clip_dir, "--checkpoint", checkpoint, "--image-size", str(TINY_SIZE)]
    chosen = ["--no-soft-mean", "--eattn-maps", "per_layer", "--dattn-input", "layer_input"]
    chosen += ["--deep-prompt-rounding", "none"]
    output = tmp_path / "per-layer"
    assert main([*common, "--dino", dino_dir, "--variant", "crane+", "--output", str(output), *chosen]) == 0
    saved = json.loads((output / "config.json").read_text())
    assert {name: saved[name] for name in PER_LAYER_COMPUTATION} == PER_LAYER_COMPUTATION
    assert saved["soft_mean"] is False
    assert CraneForAnomalyDetection.from_pretrained(output).config.computation == PER_LAYER_COMPUTATION
    with pytest.raises(SystemExit):  # the former "--soft-mean true" form is gone: one spelling for every command
        main([*common, "--variant", "crane", "--output", str(tmp_path / "x"), "--soft-mean", "true"])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not a torch file", "could not be read"),
        ("dict", "expected a dict with 'prompt_learner'"),
        ("missing", "lacks the tensors"),
    ],
)
def test_bad_checkpoints_are_reported(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    if content == "dict":
        torch.save({"state_dict": {}}, path)
    elif content == "missing":
        torch.save({"prompt_learner": {"ctx_pos": torch.zeros(1, 1, 12, 8)}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_original_checkpoint(str(path))


def test_pickled_code_is_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    torch.save({"prompt_learner": Payload()}, path)
    with pytest.raises(ValueError, match="weights-only"):
        load_original_checkpoint(str(path))
    assert not (tmp_path / "pwned").exists()


def test_variant_and_backbones_must_agree(backbones, tmp_path):
    clip, dino, _, _ = backbones
    path = str(tmp_path / "epoch_5.pth")
    _original_format_checkpoint(clip, path)
    with pytest.raises(ValueError, match="needs a DINOv2"):
        convert_original_checkpoint(path, clip, variant="crane+")
    with pytest.raises(ValueError, match="uses no DINOv2"):
        convert_original_checkpoint(path, clip, dino, variant="crane")
