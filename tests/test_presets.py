"""Bundled presets: the official prompts, their metadata, fingerprint checks and the offline error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPModel, Dinov2WithRegistersModel

from crane_hf import CraneForAnomalyDetection
from crane_hf.models.crane.configuration_crane import PUBLISHED_COMPUTATION
from crane_hf.models.crane.convert_original import deep_prompt_keys, load_original_checkpoint
from crane_hf.presets import (
    PRESETS_DIR,
    BackboneUnavailableError,
    PresetBackboneMismatchError,
    list_presets,
    load_preset,
)
from crane_hf.presets.build import build_preset
from crane_hf.presets.catalog import PRESET_SOURCES, preset_file_name

from .tiny_models import (
    OFFICIAL_DIR,
    fingerprint_compatible_clip,
    free_port,
    randomize_,
    tiny_clip_config,
    tiny_dino_config,
)


def test_the_five_paper_presets_exist():
    assert list_presets() == ["crane/mvtec", "crane/visa", "crane+/mvtec", "crane+/visa", "crane+/mvtec-epoch1"]
    for name in list_presets():
        assert os.path.getsize(os.path.join(PRESETS_DIR, preset_file_name(name))) < 300_000


@pytest.mark.parametrize("name", list(PRESET_SOURCES))
def test_presets_hold_the_official_prompts(name):
    preset = load_preset(name)
    state = load_original_checkpoint(os.path.join(OFFICIAL_DIR, PRESET_SOURCES[name][0]))
    assert torch.equal(preset.prompt_state["prompt_learner.ctx_normal"], state["ctx_pos"][0, 0])
    assert torch.equal(preset.prompt_state["prompt_learner.ctx_anomalous"], state["ctx_neg"][0, 0])
    deep = torch.stack([state[key] for key in deep_prompt_keys(state)])
    assert torch.equal(preset.prompt_state["prompt_learner.deep_prompts"], deep)
    ids = preset.fingerprint_token_ids.tolist()
    assert ids == [0, 269, 13568, 14115, 49406, 49407]  # pad, ".", "damaged", "object", SOT, EOT
    row = state["token_prefix_pos"].reshape(-1)
    assert torch.equal(preset.fingerprint_embeddings[ids.index(49406)], row)


def test_preset_metadata_follows_the_paper():
    plus = load_preset("crane+/mvtec")
    assert (plus.variant, plus.epoch, plus.settings) == ("crane+", 5, {"feature_layers": [24], "soft_mean": False})
    assert plus.clip_backbone == "openai/clip-vit-large-patch14-336"
    assert plus.dino_backbone == "facebook/dinov2-with-registers-base"
    assert plus.published_results[0]["dataset"] == "VisA"
    medical = load_preset("crane+/mvtec-epoch1")
    assert (medical.epoch, medical.settings["soft_mean"]) == (1, True)
    crane = load_preset("crane/visa")
    assert crane.dino_backbone is None and crane.settings["feature_layers"] == [6, 12, 18, 24]
    assert crane.published_results == [
        {"dataset": "MVTec-AD", "image": [93.8, 97.5, 93.8], "pixel": [91.3, 84.6, 41.3]}
    ]
    assert plus.source_sha256 == "9163f13a9c0a75ac63de16239b850cf70d366b5591b083bea2c0c41e76beed53"


@pytest.mark.parametrize("name", ["crane/mvtec", "crane+/mvtec-epoch1"])
def test_building_presets_again_gives_the_bundled_content(name, tmp_path):
    path = build_preset(name, OFFICIAL_DIR, str(tmp_path))
    with safe_open(path, "pt") as new, safe_open(os.path.join(PRESETS_DIR, preset_file_name(name)), "pt") as bundled:
        assert new.metadata() == bundled.metadata()
        assert sorted(new.keys()) == sorted(bundled.keys())
        for key in new.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert torch.equal(new.get_tensor(key), bundled.get_tensor(key))


def test_from_preset_applies_prompts_and_settings_on_compatible_backbones():
    clip = fingerprint_compatible_clip("crane+/visa", openai_hub_ids=True)  # eos_token_id 2, as on the Hub
    dino = randomize_(Dinov2WithRegistersModel(tiny_dino_config()), seed=1)
    model = CraneForAnomalyDetection.from_preset("crane+/visa", clip=clip, dino=dino, image_size=56)
    preset = load_preset("crane+/visa")
    for key, tensor in preset.prompt_state.items():
        assert torch.equal(model.state_dict()[key], tensor)
    assert model.config.feature_layers == [24] and model.config.soft_mean is False
    assert model.config.preset == "crane+/visa"
    assert model.config.computation == PUBLISHED_COMPUTATION  # what the official prompts were trained with
    per_layer = CraneForAnomalyDetection.from_preset(
        "crane+/visa", clip=clip, dino=dino, image_size=56, eattn_map_source="per_layer", soft_mean=True
    )
    assert (per_layer.config.eattn_map_source, per_layer.config.soft_mean) == ("per_layer", True)
    with pytest.raises(TypeError, match=r"from_preset got unknown keyword argument\(s\) 'softmean'"):
        CraneForAnomalyDetection.from_preset("crane+/visa", clip=clip, dino=dino, softmean=True)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 56, 56))
    assert torch.isfinite(out.anomaly_scores).all()


def test_from_preset_refuses_other_clip_weights():
    clip = fingerprint_compatible_clip("crane/mvtec")
    with torch.no_grad():
        clip.text_model.embeddings.token_embedding.weight[49406] += 0.5
    with pytest.raises(PresetBackboneMismatchError, match="not openai/clip-vit-large-patch14-336"):
        CraneForAnomalyDetection.from_preset("crane/mvtec", clip=clip, image_size=56)
    model = CraneForAnomalyDetection.from_preset("crane/mvtec", clip=clip, image_size=56, allow_backbone_mismatch=True)
    assert model.config.variant == "crane" and model.config.computation == PUBLISHED_COMPUTATION
    assert model.config.map_slots == [0, 0, 0, 0]  # layers 6, 12, 18, 24: one map, the final e stream
    tiny = randomize_(CLIPModel(tiny_clip_config()), seed=2)
    with pytest.raises(PresetBackboneMismatchError, match="768-wide"):
        CraneForAnomalyDetection.from_preset("crane/mvtec", clip=tiny, allow_backbone_mismatch=True)
    with pytest.raises(ValueError, match="Unknown preset"):
        CraneForAnomalyDetection.from_preset("crane/btad")


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import time
    from crane_hf import CraneForAnomalyDetection
    from crane_hf.presets import BackboneUnavailableError
    start = time.perf_counter()
    try:
        CraneForAnomalyDetection.from_preset("crane+/mvtec")
    except BackboneUnavailableError as error:
        print(f"{time.perf_counter() - start:.2f}")
        print(error)
    """
)


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE=1", "no network, HF_HUB_OFFLINE unset"])
def test_offline_without_cache_fails_at_once_with_instructions(tmp_path, offline):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home")}
    if offline == "HF_HUB_OFFLINE=1":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # an endpoint that refuses connections stands for a machine without network
        env.pop("HF_HUB_OFFLINE", None)
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seconds, message = result.stdout.split("\n", 1)
    assert float(seconds) < 5.0 and time.perf_counter() - started < 60
    assert "hf download openai/clip-vit-large-patch14-336 facebook/dinov2-with-registers-base" in message
    assert 'clip="/path/to/clip-vit-large-patch14-336"' in message
    assert "--clip /path/to/clip --dino /path/to/dino" in message
    assert issubclass(BackboneUnavailableError, OSError)
