import json
import os

import pytest
import torch

from crane_hf import CraneConfig
from crane_hf.models.crane.configuration_crane import (
    CLIP_VIT_L14_336,
    DINOV2_REG_B14,
    PER_LAYER_COMPUTATION,
    PUBLISHED_COMPUTATION,
)

from .tiny_models import OFFICIAL_DIR, OFFICIAL_FILES, tiny_clip_config, tiny_config, tiny_dino_config


def test_defaults_are_the_paper_crane_setting():
    config = CraneConfig()
    assert config.variant == "crane"
    assert config.clip_config.vision_config.num_hidden_layers == 24
    assert config.clip_config.vision_config.hidden_size == 1024
    assert config.image_size == 518
    assert config.feature_layers == [6, 12, 18, 24]
    assert config.eattn_layers == 19 and config.eattn_type == "qq+kk+vv"
    assert config.soft_mean is True
    assert (config.prompt_length, config.num_deep_prompts, config.deep_prompt_length) == (12, 8, 4)
    assert (config.dattn_beta, config.dattn_gamma, config.both_eattn_dattn) == (1.2, 3.0, True)
    assert (config.pooling_alpha, config.logit_temperature, config.image_loss_temperature) == (0.5, 0.07, 0.01)
    assert (config.smoothing_sigma, config.context_conditioning_prob) == (4.0, 1.0)
    assert config.prompt_texts == [
        "X X X X X X X X X X X X object.",
        "X X X X X X X X X X X X damaged object.",
    ]
    assert config.computation == PUBLISHED_COMPUTATION and config.computes_published_code
    assert config.computation == {
        "eattn_map_source": "last_layer",
        "dattn_input": "after_attention",
        "deep_prompt_rounding_dtype": "float16",
    }
    assert config.map_slots == [0, 0, 0, 0]  # the four maps are the final e stream, computed once


def test_every_way_of_building_a_config_computes_the_published_code():
    for config in (
        CraneConfig(),
        CraneConfig.for_variant("crane"),
        CraneConfig.for_variant("crane+"),
        tiny_config("crane"),
        tiny_config("crane+"),
    ):
        assert config.computation == PUBLISHED_COMPUTATION, config.variant
    assert CraneConfig.for_variant("crane+").map_slots == [0, 1]


@pytest.mark.parametrize(
    ("switch", "expected"),
    [(True, PUBLISHED_COMPUTATION), (False, PER_LAYER_COMPUTATION), (None, PUBLISHED_COMPUTATION)],
)
def test_the_old_switch_still_means_what_it_meant_and_is_not_saved(tmp_path, switch, expected):
    legacy = {} if switch is None else {"official_code_compat": switch}
    config = tiny_config("crane+", **legacy)
    assert config.computation == expected
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "official_code_compat" not in saved
    assert {name: saved[name] for name in expected} == expected
    assert CraneConfig.from_pretrained(tmp_path).computation == expected


# Every combination of the old switch with one explicitly given new field, and whether they agree: the switch
# implies the published values (True) or the per-layer ones (False), whatever the new field's own default is.
SWITCH_AND_FIELD = [
    (switch, name, value, value == (PUBLISHED_COMPUTATION if switch else PER_LAYER_COMPUTATION)[name])
    for switch in (True, False)
    for name, choices in (
        ("eattn_map_source", ("last_layer", "per_layer")),
        ("dattn_input", ("after_attention", "layer_input")),
        ("deep_prompt_rounding_dtype", ("float16", "bfloat16", None)),
    )
    for value in choices
]


@pytest.mark.parametrize(("switch", "name", "value", "agrees"), SWITCH_AND_FIELD)
def test_the_old_switch_with_a_new_field_follows_one_rule_everywhere(tmp_path, switch, name, value, agrees):
    """CraneConfig(...), config.json and from_pretrained-style overrides: a new field given with the old switch
    (even at its default value) must be what the switch implies, else ValueError names both."""
    expected = PUBLISHED_COMPUTATION if switch else PER_LAYER_COMPUTATION
    saved = tiny_config("crane+")
    saved.save_pretrained(tmp_path / "clean")
    data = json.loads((tmp_path / "clean" / "config.json").read_text())
    for key in PUBLISHED_COMPUTATION:
        data.pop(key, None)
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "config.json").write_text(json.dumps({**data, "official_code_compat": switch, name: value}))
    attempts = {
        "CraneConfig(...)": lambda: tiny_config("crane+", official_code_compat=switch, **{name: value}),
        "config.json": lambda: CraneConfig.from_pretrained(tmp_path / "edited"),
        "with_overrides": lambda: saved.with_overrides(official_code_compat=switch, **{name: value}),
        "from_pretrained keywords": lambda: CraneConfig.from_pretrained(
            tmp_path / "clean", official_code_compat=switch, **{name: value}
        ),
    }
    for where, attempt in attempts.items():
        if agrees:
            assert attempt().computation == expected, where
        else:
            pattern = rf"official_code_compat={switch} .* contradicts {name}={value!r}"
            with pytest.raises(ValueError, match=pattern):
                attempt()


def test_invalid_values_of_the_old_switch_and_the_new_fields_are_named_as_such(tmp_path):
    with pytest.raises(ValueError, match=r"official_code_compat='yes' is not a valid value: .* must be true or false"):
        tiny_config("crane", official_code_compat="yes")
    saved = tiny_config("crane")
    saved.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    for edit, message in (
        ({"official_code_compat": None}, "official_code_compat=None is not a valid value"),
        ({"official_code_compat": "false"}, "official_code_compat='false' is not a valid value"),
        (
            {"official_code_compat": False, "deep_prompt_rounding_dtype": "float32"},
            "deep_prompt_rounding_dtype='float32' is unknown; choose one of",
        ),
        ({"eattn_map_source": None}, "eattn_map_source=None is unknown"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**data, **edit}))
        with pytest.raises(ValueError, match=message) as caught:
            CraneConfig.from_pretrained(tmp_path)
        assert "contradicts" not in str(caught.value)
    with pytest.raises(ValueError, match="eattn_map_source='first' is unknown"):
        saved.with_overrides(official_code_compat=True, eattn_map_source="first")


def test_fields_that_do_not_apply_to_crane_change_nothing_it_records():
    """Crane has no D-Attn: its dattn_input changes no number, so it is recorded as not applicable and does not
    make the computation a departure from the published code."""
    crane = tiny_config("crane", dattn_input="layer_input")
    assert "dattn_input" in crane.not_applicable_fields and crane.computes_published_code
    assert not tiny_config("crane+", dattn_input="layer_input").computes_published_code
    assert not tiny_config("crane", eattn_map_source="per_layer").computes_published_code
    assert tiny_config("crane", num_deep_prompts=0, deep_prompt_rounding_dtype=None).computes_published_code


def _vocabulary_ids(text: str) -> list[int]:
    """CLIP ids of lower-case words and "." read straight from the bundled vocab.json (each word is one BPE token
    with the end-of-word mark), with the start and end tokens and the end-token padding to 77."""
    from crane_hf.models.crane.prompt_tokenization import bundled_tokenizer_dir

    with open(os.path.join(bundled_tokenizer_dir(), "vocab.json"), encoding="utf-8") as stream:
        vocabulary = json.load(stream)
    words = text.replace(".", " .").split()
    ids = [49406, *(vocabulary[f"{word}</w>"] for word in words), 49407]
    return ids + [49407] * (77 - len(ids))


def test_derived_prompt_token_ids_follow_their_sources(tmp_path):
    from crane_hf import CraneForAnomalyDetection

    config = tiny_config("crane")
    placeholders = "x " * config.prompt_length
    assert config.prompt_token_ids[0] == _vocabulary_ids(placeholders + "object.")
    changed = config.with_overrides(normal_prompt_words="flawless object.")
    assert changed.prompt_token_ids == [
        _vocabulary_ids(placeholders + "flawless object."),
        _vocabulary_ids(placeholders + "damaged object."),
    ]
    shorter = config.with_overrides(prompt_length=4, anomalous_prompt_words="broken object.")
    assert shorter.prompt_token_ids[1] == _vocabulary_ids("x " * 4 + "broken object.")
    assert config.with_overrides(soft_mean=False).prompt_token_ids == config.prompt_token_ids
    config.anomalous_prompt_words = "scratched object."  # set on the attribute: the ids follow too
    assert config.prompt_token_ids[1] == _vocabulary_ids(placeholders + "scratched object.")
    model = CraneForAnomalyDetection(tiny_config("crane"))
    model.save_pretrained(tmp_path)
    loaded = CraneForAnomalyDetection.from_pretrained(tmp_path, normal_prompt_words="flawless object.")
    assert loaded.config.prompt_token_ids[0] == _vocabulary_ids(placeholders + "flawless object.")
    assert loaded.prompt_learner.prompt_token_ids[0].tolist() == _vocabulary_ids(placeholders + "flawless object.")


def test_per_layer_map_slots_and_mixed_choices():
    assert tiny_config("crane", eattn_map_source="per_layer").map_slots == [0, 1, 2]
    assert tiny_config("crane+", feature_layers=[2, 4, 6]).map_slots == [0, 3, 1, 3, 2, 3]
    assert tiny_config("crane+", feature_layers=[2, 6], both_eattn_dattn=False).map_slots == [0, 1]
    mixed = tiny_config("crane+", deep_prompt_rounding_dtype=None)
    assert not mixed.computes_published_code and mixed.eattn_map_source == "last_layer"


def test_overrides_are_validated_and_unknown_names_refused():
    config = tiny_config("crane")
    changed = config.with_overrides(soft_mean=False, eattn_map_source="per_layer")
    assert (changed.soft_mean, changed.eattn_map_source, config.soft_mean) == (False, "per_layer", True)
    assert changed.to_dict() == {**config.to_dict(), "soft_mean": False, "eattn_map_source": "per_layer"}
    with pytest.raises(TypeError, match=r"'sof_mean' \(did you mean 'soft_mean'\?\)"):
        config.with_overrides(sof_mean=False)
    with pytest.raises(TypeError, match=r"CraneConfig.for_variant got unknown keyword argument\(s\) 'eattn_maps'"):
        CraneConfig.for_variant("crane", eattn_maps="per_layer")
    with pytest.raises(ValueError, match="image_size=60"):
        config.with_overrides(image_size=60)


def test_crane_plus_preset_matches_the_paper():
    config = CraneConfig.for_variant("crane+")
    assert config.variant == "crane+"
    assert config.feature_layers == [24]
    assert config.soft_mean is False
    assert config.num_maps == 2
    assert config.dino_config.model_type == "dinov2_with_registers"
    assert config.dino_config.num_register_tokens == 4
    assert config.dino_config.hidden_size == DINOV2_REG_B14["hidden_size"]
    assert CraneConfig.for_variant("crane+", soft_mean=True).soft_mean is True  # DAGM / medical setting


def test_preset_scales_layers_to_a_shallower_tower():
    config = CraneConfig.for_variant("crane", tiny_clip_config(vision_layers=12))
    assert config.feature_layers == [3, 6, 9, 12]
    assert config.eattn_layers == 10
    assert CraneConfig.for_variant("crane", tiny_clip_config(vision_layers=2)).feature_layers == [1, 2]


@pytest.mark.parametrize("name", OFFICIAL_FILES)
def test_real_vocabulary_tokenizes_prompts_to_the_official_ids(name):
    state = torch.load(os.path.join(OFFICIAL_DIR, name), map_location="cpu", weights_only=True)["prompt_learner"]
    config = CraneConfig()
    for ours, key in zip(config.prompt_token_ids, ("tokenized_prompts_pos", "tokenized_prompts_neg")):
        official = state[key].reshape(-1).tolist()
        end = official.index(49407) + 1
        assert ours[:end] == official[:end]
        assert set(ours[end:]) == {49407} and set(official[end:]) == {0}  # padding: EOT here, 0 there


def test_round_trip_through_json(tmp_path):
    config = tiny_config("crane+", soft_mean=True, image_threshold=0.3)
    config.save_pretrained(tmp_path)
    loaded = CraneConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.dino_config.num_register_tokens == 4
    assert loaded.variant == "crane+"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"feature_layers": [7]}, "feature_layers"),
        ({"feature_layers": [0]}, "feature_layers"),
        ({"feature_layers": []}, "feature_layers"),
        ({"eattn_layers": 7}, "eattn_layers"),
        ({"eattn_type": "qk"}, "eattn_type"),
        ({"image_size": 60}, "image_size"),
        ({"context_conditioning_prob": 1.5}, "context_conditioning_prob"),
        ({"pooling_alpha": -0.1}, "pooling_alpha"),
        ({"logit_temperature": 0.0}, "logit_temperature"),
        ({"num_deep_prompts": 9}, "num_deep_prompts"),
        ({"clip_image_std": [0.2, 0.0, 0.3]}, "clip_image_std"),
        ({"image_threshold": 2.0}, "image_threshold"),
        ({"prompt_token_ids": [[1, 2, 3]]}, "prompt_token_ids"),
        ({"eattn_map_source": "every_layer"}, "eattn_map_source"),
        ({"dattn_input": "o_mid"}, "dattn_input"),
        ({"deep_prompt_rounding_dtype": "float8"}, "deep_prompt_rounding_dtype"),
    ],
)
def test_invalid_settings_fail_with_the_field_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config("crane", **overrides)


def test_context_conditioning_needs_projection_dim_equal_to_text_width():
    clip = tiny_clip_config()
    clip.projection_dim = 16
    with pytest.raises(ValueError, match="projection_dim"):
        CraneConfig(clip_config=clip, image_size=56, feature_layers=[6], eattn_layers=5, num_deep_prompts=2)
    config = CraneConfig(
        clip_config=clip,
        image_size=56,
        feature_layers=[6],
        eattn_layers=5,
        num_deep_prompts=2,
        context_conditioning_prob=0.0,
    )
    assert config.context_conditioning_prob == 0.0


def test_image_size_must_fit_the_dino_patch():
    dino = tiny_dino_config()
    dino.patch_size = 8
    with pytest.raises(ValueError, match="DINOv2 patch size"):
        CraneConfig.for_variant("crane+", tiny_clip_config(), dino, image_size=70)


def test_variant_arguments_are_checked():
    with pytest.raises(ValueError, match="variant"):
        CraneConfig.for_variant("crane++")
    with pytest.raises(ValueError, match="dino_config"):
        CraneConfig.for_variant("crane", dino_config=tiny_dino_config())


def test_paper_clip_architecture_is_vit_l14_336():
    vision = CLIP_VIT_L14_336["vision_config"]
    assert (vision["patch_size"], vision["image_size"], vision["num_hidden_layers"]) == (14, 336, 24)
