"""CraneForAnomalyDetection on tiny random backbones: shapes, persistence, and the spec's computation."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from transformers import AutoModel, CLIPModel, Dinov2WithRegistersModel

from crane_hf import CraneConfig, CraneForAnomalyDetection
from crane_hf.models.crane.configuration_crane import PER_LAYER_COMPUTATION, PUBLISHED_COMPUTATION
from crane_hf.models.crane.d_attention import dino_similarity_attention
from crane_hf.models.crane.e_attention import dual_stream_attention

from .fixtures.legacy_official_code_compat.make_expected_outputs import outputs as legacy_outputs
from .tiny_models import (
    FIXTURES,
    TINY_SIZE,
    fill_deterministically_,
    populate_hub_cache,
    randomize_,
    tiny_clip_config,
    tiny_config,
    tiny_dino_config,
    tiny_model,
)


def test_output_shapes_and_dtypes(variant, images):
    model = tiny_model(variant)
    with torch.no_grad():
        out = model(images)
    batch = images.shape[0]
    num_maps = 3 if variant == "crane" else 2
    assert out.anomaly_scores.shape == (batch,) and out.anomaly_scores.dtype == torch.float32
    assert out.anomaly_maps.shape == (batch, TINY_SIZE, TINY_SIZE) and out.anomaly_maps.dtype == torch.float32
    assert out.image_logits.shape == (batch, 2)
    assert len(out.patch_logits) == num_maps and all(p.shape == (batch, 16, 2) for p in out.patch_logits)
    assert out.text_embeds.shape == (2, 32) and out.image_embeds.shape == (batch, 32)
    assert out.loss is None
    assert ((out.anomaly_scores >= 0) & (out.anomaly_scores <= 1)).all()
    assert ((out.anomaly_maps >= 0) & (out.anomaly_maps <= 1)).all()
    assert torch.allclose(out.text_embeds.norm(dim=-1), torch.ones(2))


def test_tuple_output(images):
    model = tiny_model("crane")
    with torch.no_grad():
        scores, maps = model(images, return_dict=False)[:2]
    assert scores.shape == (3,) and maps.shape == (3, TINY_SIZE, TINY_SIZE)


def test_save_and_load_round_trip(variant, images, tmp_path):
    model = tiny_model(variant, soft_mean=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, CraneForAnomalyDetection)
    with torch.no_grad():
        a, b = model(images), loaded(images)
    assert torch.equal(a.anomaly_maps, b.anomaly_maps)
    assert torch.equal(a.anomaly_scores, b.anomaly_scores)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        "prompt_learner.ctx_normal",
        "prompt_learner.ctx_anomalous",
        "prompt_learner.deep_prompts",
    ]


def test_batch_independence(variant, images):
    model = tiny_model(variant)
    with torch.no_grad():
        together = model(images)
        alone = [model(images[i : i + 1]) for i in range(images.shape[0])]
        shuffled = model(images.flip(0))
    for i, single in enumerate(alone):
        assert torch.allclose(together.anomaly_maps[i], single.anomaly_maps[0], atol=1e-6)
        assert torch.allclose(together.anomaly_scores[i], single.anomaly_scores[0], atol=1e-6)
    assert torch.allclose(shuffled.anomaly_scores.flip(0), together.anomaly_scores, atol=1e-6)


def test_constant_image_gives_finite_outputs(variant):
    model = tiny_model(variant)
    for value in (0.0, 1.7, -1.7):
        with torch.no_grad():
            out = model(torch.full((2, 3, TINY_SIZE, TINY_SIZE), value))
        assert torch.isfinite(out.anomaly_maps).all() and torch.isfinite(out.anomaly_scores).all()


def test_dattn_keeps_the_diagonal_when_every_similarity_is_masked():
    same = torch.ones(1, 9, 5)  # uniform image: all sim = 1, m = 1, so gamma * (1 - 1.2) < 0 everywhere
    weights = dino_similarity_attention(same, beta=1.2, gamma=3.0)
    assert torch.isfinite(weights).all()
    assert torch.equal(weights[0], torch.eye(9))


def test_dattn_threshold_is_per_image():
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(1, 16, 8, generator=generator), torch.randn(1, 16, 8, generator=generator) * 3 + 1
    together = dino_similarity_attention(torch.cat([first, second]), 1.2, 3.0)
    assert torch.allclose(together[0], dino_similarity_attention(first, 1.2, 3.0)[0])
    assert torch.allclose(together[1], dino_similarity_attention(second, 1.2, 3.0)[0])


def test_dattn_matches_the_spec_formula():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 12, 6, generator=generator)
    beta, gamma = 1.2, 3.0
    weights = dino_similarity_attention(features, beta, gamma)
    for b in range(2):
        f = features[b] / features[b].norm(dim=-1, keepdim=True)
        sim = f @ f.T
        logits = gamma * (sim - beta * sim.mean())
        keep = (logits >= 0) | torch.eye(12, dtype=torch.bool)
        expected = torch.where(keep, logits.exp(), torch.zeros_like(logits))
        expected = expected / expected.sum(dim=-1, keepdim=True)
        assert torch.allclose(weights[b], expected, atol=1e-6)


def _softmax_attention(query, key, value, scale):
    return torch.softmax(scale * query @ key.transpose(-1, -2), dim=-1) @ value


@pytest.mark.parametrize("eattn_type", ["qq+kk+vv", "qq+kk", "qq", "kk", "vv", "(q+k+v)^2"])
def test_sdpa_eattn_equals_explicit_softmax_attention(eattn_type):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=generator) for _ in range(3))
    s = 8**-0.5
    explicit_self = {
        "qq+kk+vv": lambda: (
            _softmax_attention(q, q, v, s) + _softmax_attention(k, k, v, s) + _softmax_attention(v, v, v, s)
        ),
        "qq+kk": lambda: _softmax_attention(q, q, v, s) + _softmax_attention(k, k, v, s),
        "qq": lambda: _softmax_attention(q, q, v, s),
        "kk": lambda: _softmax_attention(k, k, v, s),
        "vv": lambda: _softmax_attention(v, v, v, s),
        "(q+k+v)^2": lambda: _softmax_attention(
            torch.cat([q, k, v], -1), torch.cat([q, k, v], -1), v, s / math.sqrt(3)
        ),
    }[eattn_type]()
    a_orig, a_self = dual_stream_attention(q, k, v, eattn_type)
    assert torch.allclose(a_orig, _softmax_attention(q, k, v, s), atol=1e-5)
    assert torch.allclose(a_self, explicit_self, atol=1e-5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        dual_stream_attention(q, k, v, eattn_type)
    operators = {event.key for event in profile.key_averages()}
    # only fused kernels: SDPA's math fallback (softmax and batched products over N x N) would build the matrix
    assert not operators & {"aten::_scaled_dot_product_attention_math", "aten::_softmax", "aten::bmm"}, operators


def _explicit_crane_patch_features(model: CraneForAnomalyDetection, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Spec sections 2-3 for Crane, written out with explicit attention matrices."""
    clip = model.clip
    vision = clip.vision_model
    config = model.config
    x = vision.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    x = torch.cat([vision.embeddings.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
    x = vision.pre_layrnorm(x + vision.embeddings.position_embedding.weight)
    layers = vision.encoder.layers
    heads = layers[0].self_attn.num_heads
    first = len(layers) - config.eattn_layers

    def per_head(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

    o = x
    e = None
    maps = []
    for index, layer in enumerate(layers):
        u = layer.layer_norm1(o)
        attn = layer.self_attn
        q, k, v = per_head(attn.q_proj(u)), per_head(attn.k_proj(u)), per_head(attn.v_proj(u))
        s = q.shape[-1] ** -0.5
        a_orig = _softmax_attention(q, k, v, s)
        if index >= first:
            if e is None:
                e = o
            a_self = _softmax_attention(q, q, v, s) + _softmax_attention(k, k, v, s) + _softmax_attention(v, v, v, s)
            e = e + attn.out_proj(merge(a_self))
        o = o + attn.out_proj(merge(a_orig))
        o = o + layer.mlp(layer.layer_norm2(o))
        if index + 1 in config.feature_layers:
            stream = o if e is None else e
            maps.append(F.normalize(clip.visual_projection(vision.post_layernorm(stream[:, 1:])), dim=-1))
    return maps


def test_crane_features_equal_the_explicit_spec_computation(images):
    """Per-layer variant: the e stream after each feature layer; published (default): the final e stream, once."""
    per_layer = tiny_model("crane", eattn_map_source="per_layer")
    published = tiny_model("crane")  # same seed, same weights
    with torch.no_grad():
        _, features, grid = per_layer.encode_image(images)
        _, final, _ = published.encode_image(images)
        expected = _explicit_crane_patch_features(per_layer, images)
    assert grid == (4, 4)
    assert len(expected) == features.shape[0] == 3
    for ours, reference in zip(features, expected):
        assert torch.allclose(ours, reference, atol=1e-5)
    assert published.config.feature_layers[-1] == 6  # the last vision layer: its map is the final e stream
    assert final.shape[0] == 1 and torch.allclose(final[0], expected[-1], atol=1e-5)


def test_per_layer_feature_maps_differ(images):
    model = tiny_model("crane", eattn_map_source="per_layer")
    with torch.no_grad():
        out = model(images)
        _, features, _ = model.encode_image(images)
    assert features.shape[0] == len(out.patch_logits) == 3
    for i in range(features.shape[0]):
        for j in range(i + 1, features.shape[0]):
            assert (features[i] - features[j]).abs().max() > 1e-3
            assert (out.patch_logits[i] - out.patch_logits[j]).abs().max() > 1e-3


def test_published_computation_reads_every_crane_map_from_the_final_e_stream(images):
    model = tiny_model("crane")
    assert model.config.computes_published_code and model.config.map_slots == [0, 0, 0]
    with torch.no_grad():
        out = model(images)
        per_layer = tiny_model("crane", eattn_map_source="per_layer")(images)
    assert len(out.patch_logits) == 3
    for logits in out.patch_logits[1:]:
        assert torch.equal(logits, out.patch_logits[0])
    assert torch.allclose(out.patch_logits[0], per_layer.patch_logits[-1], atol=1e-5)  # layer 6 is the last
    assert (out.anomaly_maps - per_layer.anomaly_maps).abs().max() > 1e-3  # the two computations differ


def test_deep_prompts_change_the_text_features():
    model = tiny_model("crane")
    with torch.no_grad():
        before = model.encode_text()
        model.prompt_learner.deep_prompts.add_(torch.randn_like(model.prompt_learner.deep_prompts))
        after = model.encode_text()
    assert (before - after).abs().max() > 1e-3


@pytest.mark.parametrize("rounding", ["float16", None])
def test_deep_prompts_overwrite_positions_before_layers_two_to_n_plus_one(rounding):
    model = tiny_model("crane", deep_prompt_rounding_dtype=rounding)
    text = model.clip.text_model
    seen: list[torch.Tensor] = []
    hooks = [
        layer.layer_norm1.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach().clone()))
        for layer in text.encoder.layers
    ]
    with torch.no_grad():
        model.encode_text()
    for hook in hooks:
        hook.remove()
    deep = model.prompt_learner.deep_prompts.detach()
    written = deep.half().float() if rounding == "float16" else deep  # the published code casts them with .half()
    assert rounding is None or not torch.equal(written, deep)
    assert len(seen) == 4
    for layer in (1, 2):  # 0-based layers 1..num_deep_prompts receive P_1..P_n
        assert torch.equal(seen[layer][:, 1:5], written[layer - 1].expand(2, -1, -1))
    assert not torch.allclose(seen[3][:, 1:5], deep[1].expand(2, -1, -1))


def test_context_conditioning_inserts_the_image_token():
    model = tiny_model("crane")
    image_embeds = F.normalize(torch.randn(3, 32), dim=-1)
    embeddings, eot = model.prompt_learner.prompt_embeddings(
        model.clip.text_model.embeddings.token_embedding, image_embeds
    )
    static, static_eot = model.prompt_learner.prompt_embeddings(model.clip.text_model.embeddings.token_embedding)
    assert embeddings.shape == (3, 2, 77, 32)
    assert torch.equal(eot, static_eot + 1)
    for b in range(3):
        assert torch.equal(embeddings[b, :, 13], image_embeds[b].expand(2, -1))
        assert torch.equal(embeddings[b, :, :13], static[:, :13])
        assert torch.equal(embeddings[b, :, 14:], static[:, 13:-1])


def test_training_uses_image_conditioned_prompts_and_eval_uses_static_ones(images):
    model = tiny_model("crane")
    model.train()
    out = model(images)
    assert out.text_embeds.shape == (3, 2, 32)
    model.eval()
    with torch.no_grad():
        assert model(images).text_embeds.shape == (2, 32)
    never = tiny_model("crane", context_conditioning_prob=0.0).train()
    assert never(images).text_embeds.shape == (2, 32)


def test_backbones_stay_frozen_and_in_eval_mode(variant):
    model = tiny_model(variant).train()
    assert model.training and model.prompt_learner.training
    assert not model.clip.training and all(not m.training for m in model.clip.modules())
    if variant == "crane+":
        assert not model.dino.training
    for backbone in model.backbones():  # train() called on a backbone itself
        backbone.train()
        assert all(not m.training for m in backbone.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_learner.ctx_normal", "prompt_learner.ctx_anomalous", "prompt_learner.deep_prompts"}


def test_loss_and_gradients_reach_only_the_prompts(variant, images):
    model = tiny_model(variant).train()
    masks = torch.zeros(3, TINY_SIZE, TINY_SIZE)
    masks[1, 10:30, 20:40] = 1
    out = model(images, labels=torch.tensor([0, 1, 0]), masks=masks)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    expected = 2 * out.focal_loss + 2 * out.dice_loss + 0.2 * out.image_loss
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert model.prompt_learner.ctx_anomalous.grad.abs().sum() > 0
    assert model.prompt_learner.deep_prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.clip.parameters())


def test_loss_needs_labels_and_masks(images):
    model = tiny_model("crane")
    with pytest.raises(ValueError, match="masks is missing"):
        model(images, labels=torch.zeros(3))
    with pytest.raises(ValueError, match="masks must have shape"):
        model(images, labels=torch.zeros(3), masks=torch.zeros(3, 10, 10))
    with pytest.raises(ValueError, match="binary"):
        model(images, labels=torch.zeros(3), masks=torch.full((3, TINY_SIZE, TINY_SIZE), 0.5))


def test_static_text_features_are_cached_in_eval_and_dropped_when_prompts_change(images, monkeypatch):
    model = tiny_model("crane")
    calls = []
    original = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        model(images)
        model(images)
    assert len(calls) == 1
    with torch.no_grad():
        model.prompt_learner.ctx_normal.mul_(1.5)  # an optimizer step changes the prompts in place
        model(images)
    assert len(calls) == 2
    model.train()
    model.eval()
    with torch.no_grad():
        model(images)
    assert len(calls) == 3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    with torch.no_grad():
        model(images)
    assert len(calls) == 4
    model.prompt_learner.ctx_anomalous.data = torch.randn_like(model.prompt_learner.ctx_anomalous)  # new storage
    with torch.no_grad():
        model(images)
    assert len(calls) == 5
    assert torch.allclose(model.static_text_embeds(), original())


@pytest.mark.parametrize("size", [42, 70, 84])
def test_other_input_sizes_resize_position_embeddings_bilinearly_without_mutating_weights(size):
    model = tiny_model("crane")
    table = model.clip.vision_model.embeddings.position_embedding.weight
    before = table.detach().clone()
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = model(pixels)
        features = model.encode_image(pixels)[1]
    assert out.anomaly_maps.shape == (1, size, size)
    assert features.shape[2] == (size // 14) ** 2
    assert torch.equal(table, before)
    grid = size // 14
    expected = F.interpolate(before[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), (grid, grid), mode="bilinear")
    resized = model._position_embeddings((grid, grid), torch.float32, torch.device("cpu"))
    assert torch.allclose(resized[1:], expected.permute(0, 2, 3, 1).reshape(grid * grid, -1))
    assert torch.equal(resized[0], before[0])


def test_non_square_inputs_work():
    model = tiny_model("crane+")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 42, 70))
    assert out.anomaly_maps.shape == (2, 42, 70)


def _straightforward_maps(patch_logits, grid, size, soft_mean):
    """Spec section 5 literally: upsample every map (both channels), then combine."""
    upsampled = [
        F.interpolate(
            (p.softmax(-1) if soft_mean else p).transpose(1, 2).reshape(p.shape[0], 2, *grid),
            size=size,
            mode="bilinear",
            align_corners=False,
        )
        for p in patch_logits
    ]
    mean = torch.stack(upsampled).mean(0)
    return mean[:, 1] if soft_mean else mean.softmax(dim=1)[:, 1]


@pytest.mark.parametrize("soft_mean", [True, False])
def test_fast_anomaly_maps_equal_the_straightforward_computation(variant, images, soft_mean):
    model = tiny_model(variant, soft_mean=soft_mean)
    with torch.no_grad():
        out = model(images)
    expected = _straightforward_maps(out.patch_logits, (4, 4), (TINY_SIZE, TINY_SIZE), soft_mean)
    assert torch.allclose(out.anomaly_maps, expected, atol=1e-6)


def test_image_score_is_score_based_pooling_of_the_spec(images):
    model = tiny_model("crane")
    with torch.no_grad():
        out = model(images)
        _, features, _ = model.encode_image(images)
    logits = torch.stack(out.patch_logits)
    weights = logits.mean(0).softmax(-1)[..., 1:]
    pooled = F.normalize((features.mean(0) * weights).sum(1), dim=-1)
    image_feature = F.normalize(0.5 * pooled + 0.5 * out.image_embeds, dim=-1)
    image_logits = image_feature @ out.text_embeds.T / 0.07
    assert torch.allclose(out.image_logits, image_logits, atol=1e-4)
    assert torch.allclose(out.anomaly_scores, image_logits.softmax(-1)[:, 1], atol=1e-6)


@pytest.mark.parametrize(
    ("pixels", "error", "match"),
    [
        (torch.randn(3, TINY_SIZE, TINY_SIZE), ValueError, "shape"),
        (torch.randn(1, 1, TINY_SIZE, TINY_SIZE), ValueError, "shape"),
        (torch.randint(0, 255, (1, 3, TINY_SIZE, TINY_SIZE)), TypeError, "floating-point"),
        (torch.randn(1, 3, 50, TINY_SIZE), ValueError, "multiples of the patch size"),
        (torch.full((1, 3, TINY_SIZE, TINY_SIZE), float("nan")), ValueError, "NaN"),
    ],
)
def test_bad_pixel_values_are_refused_clearly(pixels, error, match):
    with pytest.raises(error, match=match):
        tiny_model("crane")(pixels)


def test_from_backbones_keeps_the_pretrained_weights(tmp_path, images):
    torch.manual_seed(5)
    clip = randomize_(CLIPModel(tiny_clip_config()), seed=5)
    dino = randomize_(Dinov2WithRegistersModel(tiny_dino_config()), seed=6)
    clip.save_pretrained(tmp_path / "clip")
    dino.save_pretrained(tmp_path / "dino")
    for source_clip, source_dino in [(clip, dino), (str(tmp_path / "clip"), str(tmp_path / "dino"))]:
        model = CraneForAnomalyDetection.from_backbones(source_clip, source_dino, image_size=TINY_SIZE)
        assert model.config.variant == "crane+"
        for name, tensor in clip.state_dict().items():
            assert torch.equal(model.clip.state_dict()[name], tensor), name
        for name, tensor in dino.state_dict().items():
            assert torch.equal(model.dino.state_dict()[name], tensor), name
    crane = CraneForAnomalyDetection.from_backbones(clip, image_size=TINY_SIZE)
    assert crane.config.variant == "crane" and crane.dino is None
    with torch.no_grad():
        assert torch.isfinite(crane(images).anomaly_scores).all()
    with pytest.raises(TypeError, match="DINOv2"):
        CraneForAnomalyDetection.from_backbones(clip, clip)


def test_clip_with_the_special_ids_of_openais_hub_configs_gives_the_same_model(tmp_path, images):
    """openai/clip-vit-large-patch14-336's config says eos_token_id 2 (bos 0, pad 1); end of text is still 49407."""
    clip = randomize_(CLIPModel(tiny_clip_config()), seed=7)
    dino = randomize_(Dinov2WithRegistersModel(tiny_dino_config()), seed=8)
    text_config = clip.config.text_config
    assert text_config.eos_token_id == 49407
    reference = CraneForAnomalyDetection.from_backbones(clip, dino, image_size=TINY_SIZE).eval()
    text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id = 0, 2, 1
    clip.save_pretrained(tmp_path / "openai-ids")
    for source in (clip, str(tmp_path / "openai-ids")):
        model = CraneForAnomalyDetection.from_backbones(source, dino, image_size=TINY_SIZE).eval()
        model.prompt_learner.load_state_dict(reference.prompt_learner.state_dict())  # the same (random) prompts
        assert model.config.clip_config.text_config.eos_token_id == 2
        assert model.prompt_learner.eos_token_id == 49407
        with torch.inference_mode():
            expected, output = reference(images), model(images)
        assert torch.equal(output.anomaly_scores, expected.anomaly_scores)
        assert torch.equal(output.anomaly_maps, expected.anomaly_maps)


@pytest.mark.parametrize("dattn_input", ["layer_input", "after_attention"])
@pytest.mark.parametrize("feature_layer", [2, 4, 6])  # the first E-Attn layer, a middle one, the last one
def test_dattn_reads_the_configured_point_of_the_o_stream(images, dattn_input, feature_layer):
    """Crane+ D-Attn map equals the spec formula applied to o_(l-1) of the feature layer ("layer_input") or, as the
    published code reads it, to o_(l-1) + OutProj(a_orig) (o_(l-1) + OutProj(a_self) in the first E-Attn layer)."""
    model = tiny_model("crane+", both_eattn_dattn=False, feature_layers=[feature_layer], dattn_input=dattn_input)
    captured = {}
    layer = model.clip.vision_model.encoder.layers[feature_layer - 1]
    hook = layer.layer_norm1.register_forward_hook(
        lambda _m, inputs, _o: captured.update(o=captured.get("o", inputs[0]))
    )
    with torch.no_grad():
        _, features, grid = model.encode_image(images)
        hook.remove()
        dino_tokens, _ = model._dino_patch_tokens(images)
        o = captured["o"]  # o_(l-1), the o stream entering the layer
        if dattn_input == "after_attention":
            attn, heads = layer.self_attn, layer.self_attn.num_heads
            u = layer.layer_norm1(o)
            q, k, v = (
                p(u).view(*u.shape[:2], heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            scale = q.shape[-1] ** -0.5
            if feature_layer == 2:  # the first E-Attn layer (eattn_layers=5 of 6)
                attended = sum(_softmax_attention(a, a, v, scale) for a in (q, k, v))
            else:
                attended = _softmax_attention(q, k, v, scale)
            o = o + attn.out_proj(attended.transpose(1, 2).reshape(*u.shape))
        v = layer.self_attn.v_proj(layer.layer_norm1(o))[:, 1:]
        weights = dino_similarity_attention(dino_tokens, 1.2, 3.0)
        expected = layer.self_attn.out_proj(weights @ v)
        expected = F.normalize(model.clip.visual_projection(model.clip.vision_model.post_layernorm(expected)), dim=-1)
    assert features.shape[0] == 1 and grid == (4, 4)
    assert torch.allclose(features[0], expected, atol=1e-5)


def test_crane_plus_uses_dino_features_of_the_same_image(images):
    model = tiny_model("crane+")
    with torch.no_grad():
        base = model(images).anomaly_maps
        for parameter in model.dino.parameters():
            parameter.add_(0.3)
        changed = model(images).anomaly_maps
    assert (base - changed).abs().max() > 1e-4


def _backbone_folders(tmp_path):
    torch.manual_seed(7)
    clip = randomize_(CLIPModel(tiny_clip_config()), seed=7)
    dino = randomize_(Dinov2WithRegistersModel(tiny_dino_config()), seed=8)
    clip.save_pretrained(tmp_path / "clip")
    dino.save_pretrained(tmp_path / "dino")
    return str(tmp_path / "clip"), str(tmp_path / "dino")


def test_prompts_only_checkpoint_is_small_and_loads_its_backbones(tmp_path, images):
    clip_dir, dino_dir = _backbone_folders(tmp_path)
    model = CraneForAnomalyDetection.from_backbones(clip_dir, dino_dir, image_size=TINY_SIZE)
    randomize_(model.prompt_learner, scale=0.5, seed=3)
    assert model.config.clip_backbone == clip_dir and model.config.dino_backbone == dino_dir
    model.save_pretrained(tmp_path / "prompts", include_backbones=False)
    weights = tmp_path / "prompts" / "model.safetensors"
    from safetensors.torch import load_file

    assert set(load_file(weights)) == {
        "prompt_learner.ctx_normal",
        "prompt_learner.ctx_anomalous",
        "prompt_learner.deep_prompts",
    }
    assert model.config.backbones_in_checkpoint is True  # the in-memory model is unchanged
    loaded = AutoModel.from_pretrained(tmp_path / "prompts")
    assert loaded.config.backbones_in_checkpoint is True
    with torch.no_grad():
        assert torch.equal(model(images).anomaly_maps, loaded(images).anomaly_maps)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        "prompt_learner.ctx_normal",
        "prompt_learner.ctx_anomalous",
        "prompt_learner.deep_prompts",
    }


def test_backbone_sources_can_be_named_explicitly(tmp_path):
    clip_dir, _ = _backbone_folders(tmp_path)
    model = CraneForAnomalyDetection.from_backbones(clip_dir, clip_backbone="my-org/clip", image_size=TINY_SIZE)
    assert model.config.clip_backbone == "my-org/clip"


def test_prompts_only_save_needs_known_backbone_sources():
    with pytest.raises(ValueError, match="clip_backbone"):
        tiny_model("crane").save_pretrained("/nonexistent", include_backbones=False)


def test_prompt_tensors_of_the_wrong_shape_are_refused_by_name():
    model = tiny_model("crane")
    state = {
        "prompt_learner.ctx_normal": torch.zeros(12, 32),
        "prompt_learner.ctx_anomalous": torch.zeros(12, 16),
        "prompt_learner.deep_prompts": torch.zeros(2, 4, 32, dtype=torch.int64),
        "prompt_learner.extra": torch.zeros(1),
    }
    with pytest.raises(ValueError) as error:
        model.load_prompt_state(state, source="prompts.safetensors")
    message = str(error.value)
    assert "prompt_learner.ctx_anomalous (12, 16)" in message
    assert "prompt_learner.deep_prompts" in message and "int64" in message
    assert "unexpected tensors prompt_learner.extra" in message
    assert "prompt_learner.ctx_normal (" not in message


def test_from_backbones_refuses_a_config_for_another_architecture(tmp_path):
    clip_dir, _ = _backbone_folders(tmp_path)
    config = tiny_config("crane")
    config.clip_config.vision_config.num_hidden_layers = 8
    with pytest.raises(ValueError, match=r"vision_config\.num_hidden_layers: config 8, backbone 6"):
        CraneForAnomalyDetection.from_backbones(clip_dir, config=config)


LEGACY_DIR = os.path.join(FIXTURES, "legacy_official_code_compat")


@pytest.mark.parametrize(
    ("case", "published"),
    [
        ("crane-compat-true", True),
        ("crane-compat-false", False),
        ("crane_plus-compat-true", True),
        ("crane_plus-compat-false", False),
    ],
)
def test_configs_with_the_old_switch_load_to_the_outputs_they_gave(case, published):
    """config.json files written by the code that had `official_code_compat` (true and false) load as the three new
    fields and give the outputs that code gave on the same weights (stored by the fixture's
    make_expected_outputs.py on another machine): within float32 rounding, 1e-5 of each tensor's largest magnitude
    (bit for bit on the machine that stored them; another CPU's kernels round differently: up to 2e-6 of it
    measured on an Intel Xeon against the AMD EPYC that wrote them), published deep-prompt gradients up to float16
    rounding (now rounded per prompt row before the rows are summed, as the published code does, where that code
    summed and then rounded). A changed computation moves these outputs by far more (the two switches' maps and scores
    differ by 1e-2 to 3e-2 of their largest value, their gradients by 4e-2 to 1e-1)."""
    expected = load_safetensors(os.path.join(LEGACY_DIR, "expected_outputs.safetensors"))
    with open(os.path.join(LEGACY_DIR, case, "config.json")) as stream:
        assert json.load(stream)["official_code_compat"] is published
    config = CraneConfig.from_pretrained(os.path.join(LEGACY_DIR, case))
    assert config.computation == (PUBLISHED_COMPUTATION if published else PER_LAYER_COMPUTATION)
    assert "official_code_compat" not in config.to_dict()
    model = fill_deterministically_(CraneForAnomalyDetection(config))
    outputs = legacy_outputs(model)
    assert set(outputs) == {key.split(".", 1)[1] for key in expected if key.startswith(case + ".")}
    for name, value in outputs.items():
        reference = expected[f"{case}.{name}"]
        scale = reference.abs().max()
        bound = 5e-3 if published and name == "grad.deep_prompts" else 1e-5
        assert value.shape == reference.shape and (value - reference).abs().max() <= bound * scale, name


def _saved_folder(tmp_path, include_backbones: bool) -> tuple[CraneForAnomalyDetection, str]:
    clip_dir, dino_dir = _backbone_folders(tmp_path)
    model = CraneForAnomalyDetection.from_backbones(clip_dir, dino_dir, image_size=TINY_SIZE)
    randomize_(model.prompt_learner, scale=0.5, seed=3)
    folder = tmp_path / ("full" if include_backbones else "prompts")
    model.save_pretrained(folder, include_backbones=include_backbones)
    return model, str(folder)


@pytest.mark.parametrize("include_backbones", [True, False])
@pytest.mark.parametrize("where", ["folder", "hub"])
def test_from_pretrained_applies_config_fields_given_as_keywords(tmp_path, images, include_backbones, where):
    model, folder = _saved_folder(tmp_path, include_backbones)
    location, hub = folder, {}
    if where == "hub":
        populate_hub_cache(tmp_path / "hf-home", "my-org/tiny-crane", model, include_backbones=include_backbones)
        location, hub = "my-org/tiny-crane", {"cache_dir": str(tmp_path / "hf-home" / "hub"), "local_files_only": True}
    changes = {"soft_mean": True, "eattn_map_source": "per_layer", "deep_prompt_rounding_dtype": None}
    loaded = CraneForAnomalyDetection.from_pretrained(location, **hub, **changes)
    assert {name: getattr(loaded.config, name) for name in changes} == changes
    assert loaded.config.dattn_input == "after_attention"  # not given: as saved
    expected = CraneForAnomalyDetection.from_backbones(
        model.clip, model.dino, config=model.config.with_overrides(**changes)
    )
    expected.prompt_learner.load_state_dict(model.prompt_learner.state_dict())
    with torch.no_grad():
        assert torch.allclose(loaded(images).anomaly_maps, expected.eval()(images).anomaly_maps, atol=1e-6)
        assert (loaded(images).anomaly_maps - model(images).anomaly_maps).abs().max() > 1e-4
    via_auto = AutoModel.from_pretrained(location, **hub, soft_mean=True)
    assert isinstance(via_auto, CraneForAnomalyDetection) and via_auto.config.soft_mean is True
    assert (
        json.loads((tmp_path / ("full" if include_backbones else "prompts") / "config.json").read_text())["soft_mean"]
        is False
    )  # the folder is untouched
    with pytest.raises(TypeError, match=r"'sof_mean' \(did you mean 'soft_mean'\?\)"):
        CraneForAnomalyDetection.from_pretrained(location, **hub, sof_mean=True)
    with pytest.raises(TypeError, match="'not_an_option'"):
        CraneForAnomalyDetection.from_pretrained(location, **hub, not_an_option=1)
    with pytest.raises(ValueError, match="eattn_map_source='every_layer'"):
        CraneForAnomalyDetection.from_pretrained(location, **hub, eattn_map_source="every_layer")
    with pytest.raises(ValueError, match="eattn_map_source='every_layer'"):
        AutoModel.from_pretrained(location, **hub, eattn_map_source="every_layer")


def test_old_switch_as_a_keyword_override(tmp_path):
    _, folder = _saved_folder(tmp_path, include_backbones=True)
    loaded = CraneForAnomalyDetection.from_pretrained(folder, official_code_compat=False)
    assert loaded.config.computation == PER_LAYER_COMPUTATION
    agreeing = CraneForAnomalyDetection.from_pretrained(folder, official_code_compat=False, dattn_input="layer_input")
    assert agreeing.config.computation == PER_LAYER_COMPUTATION
    # One rule for CraneConfig(...), config.json and keywords: a new field given with the old switch must agree.
    with pytest.raises(ValueError, match=r"official_code_compat=False .* contradicts eattn_map_source='last_layer'"):
        CraneForAnomalyDetection.from_pretrained(folder, official_code_compat=False, eattn_map_source="last_layer")
    with pytest.raises(ValueError, match=r"official_code_compat=True .* contradicts eattn_map_source='per_layer'"):
        AutoModel.from_pretrained(folder, official_code_compat=True, eattn_map_source="per_layer")
