"""The fast inference path equals the straightforward computation of the spec, compiles whole, and keeps precision.

The reference below is crane-method.md sections 2-5 written out literally: every attention as an explicit softmax
matrix, the o stream computed for every token in every layer, D-Attn recomputed per feature layer, the text run
over all 77 positions, every map upsampled before averaging. It follows the published code's three behaviours
(section 3, (a)-(c)) or their per-layer variant as the model's config says: (a) one copy of the final e stream per
feature layer, stacked, (b) D-Attn on the o stream after the layer's attention was added to it, (c) deep prompts
repeated per prompt row and cast to float16 before they are written into the hidden states.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from benchmarks.materialized_attention import materialized_attention
from crane_hf.models.crane.clip_layers import clip_mlp
from crane_hf.models.crane.gaussian_smoothing import gaussian_smooth
from crane_hf.models.crane.prompt_learning import encode_prompts

from .tiny_models import TINY_SIZE, tiny_model


def _softmax_attention(query, key, value, scale):
    return torch.softmax(scale * query @ key.transpose(-1, -2), dim=-1) @ value


def _dino_tokens(model, pixels):
    config = model.config
    shape = (1, 3, 1, 1)
    raw = pixels * torch.tensor(config.clip_image_std).view(shape) + torch.tensor(config.clip_image_mean).view(shape)
    dino_input = (raw.clamp(0, 1) - torch.tensor(config.dino_image_mean).view(shape)) / torch.tensor(
        config.dino_image_std
    ).view(shape)
    tokens = model.dino(pixel_values=dino_input).last_hidden_state
    return tokens[:, 1 + config.dino_config.num_register_tokens :]


def _dattn(layer, u, dino_tokens, beta, gamma):
    f = F.normalize(dino_tokens, dim=-1)
    similarity = f @ f.transpose(1, 2)
    logits = gamma * (similarity - beta * similarity.mean(dim=(1, 2), keepdim=True))
    keep = (logits >= 0) | torch.eye(logits.shape[-1], dtype=torch.bool)
    weights = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    return layer.self_attn.out_proj(weights @ layer.self_attn.v_proj(u)[:, 1:])


def _straightforward_text(model):
    """Static text features [2, D], spec section 4 on transformers' CLIP text layers: all 77 positions, context
    vectors at positions 1..12, deep prompts overwriting positions 1..len before layers 2..n+1, causal mask only,
    final LayerNorm at the first end-of-text token, projection, L2-normalization."""
    clip, text_model, learner = model.clip, model.clip.text_model, model.prompt_learner
    ids = torch.tensor(model.config.prompt_token_ids)
    tokens = text_model.embeddings.token_embedding(ids).clone()
    context = learner.ctx_normal.shape[0]
    tokens[0, 1 : 1 + context] = learner.ctx_normal
    tokens[1, 1 : 1 + context] = learner.ctx_anomalous
    hidden = tokens + text_model.embeddings.position_embedding.weight[: ids.shape[1]]
    causal_mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    deep = learner.deep_prompts
    rounding = model.config.deep_prompt_rounding_dtype
    for index, layer in enumerate(text_model.encoder.layers):
        if 1 <= index <= deep.shape[0]:
            rows = deep[index - 1].expand(hidden.shape[0], -1, -1)
            if rounding is not None:  # the published code: `.expand(...).permute(...).half()`, then torch.cat
                rows = rows.to(getattr(torch, rounding))
            hidden = torch.cat([hidden[:, :1], rows, hidden[:, 1 + deep.shape[1] :]], dim=1)
        hidden = layer(hidden, causal_mask)
    hidden = text_model.final_layer_norm(hidden)
    end_of_text = (ids == 49407).int().argmax(dim=-1)
    return F.normalize(clip.text_projection(hidden[torch.arange(ids.shape[0]), end_of_text]), dim=-1)


def _straightforward_forward(model, pixels, text_for=None, labels=None, masks=None):
    """Scores, maps [B, H, W], patch logits [M, B, N, 2], global embeddings and (with labels and masks) the training
    loss, literally as the spec says; `text_for(global_embeds)` gives the text features (default: static prompts)."""
    config = model.config
    clip, vision = model.clip, model.clip.vision_model
    x = vision.embeddings.patch_embedding(pixels)
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    table = vision.embeddings.position_embedding.weight
    side = int((table.shape[0] - 1) ** 0.5)
    patches = F.interpolate(table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2), grid, mode="bilinear")
    positions = torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])
    cls = vision.embeddings.class_embedding.expand(x.shape[0], 1, -1)
    o = vision.pre_layrnorm(torch.cat([cls, x], dim=1) + positions)
    dino_tokens = _dino_tokens(model, pixels) if config.use_dattn else None
    layers = vision.encoder.layers
    first_eattn = len(layers) - config.eattn_layers
    heads = layers[0].self_attn.num_heads

    def per_head(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

    published_maps = config.eattn_map_source == "last_layer"
    e, maps = None, []
    for index, layer in enumerate(layers):
        u = layer.layer_norm1(o)
        attn = layer.self_attn
        q, k, v = per_head(attn.q_proj(u)), per_head(attn.k_proj(u)), per_head(attn.v_proj(u))
        s = q.shape[-1] ** -0.5
        first_e = e is None and index >= first_eattn
        if index >= first_eattn:
            e = o if e is None else e
            a_self = _softmax_attention(q, q, v, s) + _softmax_attention(k, k, v, s) + _softmax_attention(v, v, v, s)
            e = e + attn.out_proj(merge(a_self))
        o_mid = o + attn.out_proj(merge(_softmax_attention(q, k, v, s)))
        if index + 1 in config.feature_layers and dino_tokens is not None:
            dattn_input = o
            if config.dattn_input == "after_attention" and index >= first_eattn:
                dattn_input = e if first_e else o_mid  # the published code's in-place additions to the input
            maps.append(
                _dattn(layer, layer.layer_norm1(dattn_input), dino_tokens, config.dattn_beta, config.dattn_gamma)
            )
        o = o_mid + layer.mlp(layer.layer_norm2(o_mid))
        if index + 1 in config.feature_layers and (dino_tokens is None or config.both_eattn_dattn):
            maps.append("final e" if published_maps else (o if e is None else e)[:, 1:])
    final = (o if e is None else e)[:, 1:]
    maps = [final.clone() if isinstance(m, str) else m for m in maps]  # one copy of the final e per feature layer
    features = [F.normalize(clip.visual_projection(vision.post_layernorm(m)), dim=-1) for m in maps]
    global_embeds = F.normalize(clip.visual_projection(vision.post_layernorm(o[:, 0])), dim=-1)

    text = _straightforward_text(model) if text_for is None else text_for(global_embeds)

    def similarity(features, temperature):  # text [2, D] or, conditioned on each image, [B, 2, D]
        if text.dim() == 2:
            return features @ text.T / temperature
        equation = "bnd,bcd->bnc" if features.dim() == 3 else "bd,bcd->bc"
        return torch.einsum(equation, features, text) / temperature

    tau = config.logit_temperature
    logits = [similarity(f, tau) for f in features]
    size = tuple(pixels.shape[-2:])
    upsampled = [
        F.interpolate(
            (p.softmax(-1) if config.soft_mean else p).transpose(1, 2).reshape(p.shape[0], 2, *grid),
            size=size,
            mode="bilinear",
        )
        for p in logits
    ]
    mean = torch.stack(upsampled).mean(0)
    anomaly_maps = mean[:, 1] if config.soft_mean else mean.softmax(dim=1)[:, 1]
    weights = torch.stack(logits).mean(0).softmax(-1)[..., 1:]
    pooled = F.normalize((torch.stack(features).mean(0) * weights).sum(1), dim=-1)
    image_features = F.normalize(0.5 * pooled + 0.5 * global_embeds, dim=-1)
    result = {
        "scores": similarity(image_features, tau).softmax(-1)[:, 1],
        "maps": anomaly_maps,
        "logits": torch.stack(logits),
        "global_embeds": global_embeds,
    }
    if labels is not None:
        result.update(_straightforward_loss(logits, grid, masks, similarity(image_features, 0.01), labels))
    return result


def _straightforward_loss(logits, grid, masks, image_logits, labels):
    """Spec section 6 literally: per map, softmax upsampled (nearest), 2 * focal + 2 * dice; plus 0.2 * image CE."""
    focal = dice = 0.0
    for p in logits:
        probs = p.softmax(-1).transpose(1, 2).reshape(p.shape[0], 2, *grid)
        probs = F.interpolate(probs, size=masks.shape[-2:], mode="nearest")
        one_hot = torch.stack([1 - masks, masks], dim=1).clamp(1e-5, 1 - 1e-5)
        p_t = (one_hot * probs).sum(1) + 1e-5
        focal = focal + (-((1 - p_t) ** 2) * p_t.log()).mean()
        q = (1 - probs[:, 0] + probs[:, 1]) / 2
        overlap = (2 * (q * masks).sum((1, 2)) + 1) / (q.sum((1, 2)) + masks.sum((1, 2)) + 1)
        dice = dice + (1 - overlap).mean()
    image_loss = F.cross_entropy(image_logits, labels)
    return {"loss": 2 * focal + 2 * dice + 0.2 * image_loss, "focal_loss": focal, "dice_loss": dice}


@pytest.mark.parametrize(
    ("variant", "overrides"),
    [
        ("crane", {}),
        ("crane", {"soft_mean": False}),
        ("crane+", {}),
        ("crane+", {"soft_mean": True, "feature_layers": [3, 6]}),
        ("crane+", {"both_eattn_dattn": False, "feature_layers": [2, 6]}),
    ],
)
@pytest.mark.parametrize("size", [TINY_SIZE, 70])
def test_fast_forward_equals_the_straightforward_computation(variant, overrides, size):
    model = tiny_model(variant, **overrides)
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = model(pixels)
    with torch.no_grad():
        literal = _straightforward_forward(model, pixels)
    assert torch.allclose(out.anomaly_scores, literal["scores"], atol=1e-5)
    assert torch.allclose(out.anomaly_maps, literal["maps"], atol=1e-5)
    assert torch.allclose(torch.stack(out.patch_logits), literal["logits"], atol=1e-4)
    assert torch.allclose(out.image_embeds, literal["global_embeds"], atol=1e-5)


@pytest.mark.parametrize(
    ("variant", "overrides", "distinct_maps"),
    [
        ("crane", {}, 1),  # the paper's Crane: its maps are one map, computed once
        ("crane+", {"feature_layers": [2, 4, 6]}, 4),  # three D-Attn maps and the final e stream once
        ("crane", {"eattn_map_source": "per_layer", "dattn_input": "layer_input"}, 3),
    ],
)
def test_one_computed_map_scores_and_trains_as_the_literal_copies_do(variant, overrides, distinct_maps):
    """Scores, maps, loss and prompt gradients of the fast path against the literal computation, in which the
    published code's E-Attn maps are stacked copies of the final e stream, each upsampled and counted in the loss."""
    model = tiny_model(variant, **overrides)
    pixels = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1])
    masks = torch.zeros(2, TINY_SIZE, TINY_SIZE)
    masks[1, 10:30, 16:40] = 1
    with torch.no_grad():
        assert model.encode_image(pixels)[1].shape[0] == distinct_maps
        out = model(pixels)
        literal = _straightforward_forward(model, pixels)
    assert len(out.patch_logits) == model.config.num_maps == literal["logits"].shape[0]
    assert torch.allclose(out.anomaly_scores, literal["scores"], atol=1e-5)
    assert torch.allclose(out.anomaly_maps, literal["maps"], atol=1e-5)
    assert torch.allclose(torch.stack(out.patch_logits), literal["logits"], atol=1e-4)

    model.train()
    trained = model(pixels, labels=labels, masks=masks)
    trained.loss.backward()
    ours = {name: p.grad.clone() for name, p in model.prompt_learner.named_parameters()}
    model.zero_grad()
    reference = _straightforward_forward(model, pixels, text_for=model.encode_text, labels=labels, masks=masks)
    reference["loss"].backward()
    for name in ("loss", "focal_loss", "dice_loss"):
        assert torch.allclose(getattr(trained, name), reference[name], rtol=1e-5), name
    for name, parameter in model.prompt_learner.named_parameters():
        # float32 differences in the upstream gradient can move a float16 rounding of the deep prompts' gradient
        rounded = name == "deep_prompts" and model.config.deep_prompt_rounding_dtype is not None
        tolerance = (1e-3 if rounded else 1e-6) * parameter.grad.abs().max()
        assert torch.allclose(ours[name], parameter.grad, rtol=1e-4, atol=tolerance), name


@pytest.mark.parametrize("variant", ["crane", "crane+"])
def test_benchmark_reference_with_materialized_attention_equals_the_fast_path(variant, images):
    model = tiny_model(variant)
    with torch.inference_mode():
        fast = model(images)
        with materialized_attention():
            materialized = model(images)
        again = model(images)
    assert torch.allclose(fast.anomaly_maps, materialized.anomaly_maps, atol=1e-5)
    assert torch.allclose(fast.anomaly_scores, materialized.anomaly_scores, atol=1e-5)
    assert torch.equal(fast.anomaly_maps, again.anomaly_maps)  # the swap is undone


def test_text_encoder_runs_only_the_positions_that_reach_the_end_of_text_token():
    model = tiny_model("crane")
    learner, text = model.prompt_learner, model.clip.text_model
    assert learner.positions_used() == 17  # "<start> X*12 damaged object . <end>": end-of-text at 16
    assert learner.positions_used(conditioned=True) == 18
    image_embeds = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        for conditioning in (None, image_embeds):
            embeddings, eot = learner.prompt_embeddings(text.embeddings.token_embedding, conditioning)
            args = (text, model.clip.text_projection, embeddings, eot, learner.deep_prompts, torch.float16)
            full = encode_prompts(*args)
            short = encode_prompts(*args, num_positions=learner.positions_used(conditioning is not None))
            assert torch.allclose(short, full, atol=1e-6)
            assert torch.allclose(model.encode_text(conditioning), full, atol=1e-6)


@pytest.mark.parametrize("variant", ["crane", "crane+"])
def test_inference_forward_compiles_as_one_graph(variant, images):
    model = tiny_model(variant)
    with torch.inference_mode():
        explanation = torch._dynamo.explain(model)(images)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_forward_follows_prompt_changes_and_checks_inputs(images):
    model = tiny_model("crane+")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.inference_mode():
        assert torch.allclose(compiled(images).anomaly_maps, model(images).anomaly_maps, atol=1e-6)
    with torch.no_grad():
        model.prompt_learner.ctx_anomalous.mul_(2.0)
    with torch.inference_mode():
        eager = model(images)
        assert torch.allclose(compiled(images).anomaly_scores, eager.anomaly_scores, atol=1e-6)
        with pytest.raises(RuntimeError, match="NaN or infinite"):
            compiled(torch.full_like(images, float("nan")))


def test_autocast_runs_the_backbones_in_bfloat16_and_keeps_text_and_heads_in_float32(images):
    reference_model = tiny_model("crane+")
    with torch.inference_mode():
        reference = reference_model(images)
    model = tiny_model("crane+")
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
        after = model(images)  # the text cache filled under autocast is the float32 one
    assert torch.equal(after.text_embeds, reference.text_embeds)
    assert torch.equal(after.anomaly_maps, reference.anomaly_maps)
    assert low.anomaly_scores.dtype == low.anomaly_maps.dtype == low.patch_logits[0].dtype == torch.float32
    assert not torch.equal(low.anomaly_maps, reference.anomaly_maps)  # the backbones did run in bfloat16
    assert (low.anomaly_maps - reference.anomaly_maps).abs().max() < 0.05
    assert (low.anomaly_scores - reference.anomaly_scores).abs().max() < 0.05


@pytest.mark.parametrize("shape", [(8, 64, 64), (3, 37, 50), (2, 5, 7), (1, 2, 30, 20)])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_batched_gaussian_smoothing_equals_scipy(shape, dtype, tolerance):
    maps = torch.rand(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    sigma = (0,) * (len(shape) - 2) + (4.0, 4.0)  # scipy smooths only the last two axes
    expected = torch.from_numpy(gaussian_filter(maps.numpy(), sigma=sigma))
    smoothed = gaussian_smooth(maps, 4.0)
    assert smoothed.shape == maps.shape and smoothed.dtype == dtype
    assert torch.allclose(smoothed, expected, atol=tolerance, rtol=0)


def test_in_place_quick_gelu_mlp_equals_transformers_mlp_and_keeps_gradients():
    layer = tiny_model("crane").clip.vision_model.encoder.layers[0]
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(clip_mlp(layer, x), layer.mlp(x))
    x.requires_grad_(True)
    clip_mlp(layer, x).sum().backward()
    expected = torch.autograd.grad(layer.mlp(x).sum(), x)[0]
    assert torch.allclose(x.grad, expected)
