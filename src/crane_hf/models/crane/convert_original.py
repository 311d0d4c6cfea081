"""Convert the official Crane prompt checkpoints (``epoch_N.pth``) into a `CraneForAnomalyDetection`.

The command line (`crane-hf convert`, `python -m crane_hf.convert_original`) is `crane_hf/commands/convert.py`.

An official file is ``torch.save({"prompt_learner": state_dict})`` with ``ctx_pos``/``ctx_neg`` [1, 1, 12, W],
``compound_prompts_text.0..7`` [4, W] and buffers that fingerprint the CLIP weights the prompts were trained with:
``token_prefix_*`` / ``token_suffix_*`` (the CLIP token embeddings of the fixed tokens) and ``tokenized_prompts_*``
(the prompt ids, padded with 0). The files are read with ``weights_only=True`` on the CPU, and the fingerprint is
checked against the given CLIP before anything is written.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from transformers import CLIPModel

from .configuration_crane import build_prompt_texts, end_of_text_id
from .modeling_crane import CraneForAnomalyDetection
from .prompt_tokenization import tokenize_prompts

PROMPT_KEYS = ("ctx_pos", "ctx_neg")
FINGERPRINT_KEYS = (
    "token_prefix_pos",
    "token_prefix_neg",
    "token_suffix_pos",
    "token_suffix_neg",
    "tokenized_prompts_pos",
    "tokenized_prompts_neg",
)
FINGERPRINT_RTOL = 1e-3


class BackboneMismatchError(ValueError):
    """The checkpoint's prompts were trained with other CLIP weights than the ones given."""


def load_original_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The prompt-learner state dict of an official checkpoint, validated; tensors on the CPU."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"Checkpoint {path} could not be read as a weights-only torch file: {error}") from error
    if not isinstance(payload, dict) or not isinstance(payload.get("prompt_learner"), dict):
        raise ValueError(f"Checkpoint {path} is not an official Crane file: expected a dict with 'prompt_learner'.")
    state = {key: value for key, value in payload["prompt_learner"].items() if isinstance(value, torch.Tensor)}
    missing = [key for key in (*PROMPT_KEYS, *FINGERPRINT_KEYS) if key not in state]
    if missing:
        raise ValueError(f"Checkpoint {path} lacks the tensors {', '.join(missing)}.")
    width = state["ctx_pos"].shape[-1]
    expected = {
        "ctx_pos": (1, 1, state["ctx_pos"].shape[-2], width),
        "ctx_neg": (1, 1, state["ctx_pos"].shape[-2], width),
        "token_prefix_pos": (1, 1, 1, width),
        "token_prefix_neg": (1, 1, 1, width),
    }
    wrong = [
        f"{key} {tuple(state[key].shape)} (expected {shape})"
        for key, shape in expected.items()
        if tuple(state[key].shape) != shape
    ]
    deep = deep_prompt_keys(state)
    wrong += [
        f"{key} {tuple(state[key].shape)}" for key in deep if state[key].dim() != 2 or state[key].shape[-1] != width
    ]
    if wrong:
        raise ValueError(f"Checkpoint {path} has tensors of unexpected shape: {'; '.join(wrong)}.")
    return state


def deep_prompt_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """``compound_prompts_text.0``, ``.1``, ... in order."""
    keys = [key for key in state if key.startswith("compound_prompts_text.")]
    return sorted(keys, key=lambda key: int(key.rsplit(".", 1)[1]))


def require_prompt_width(state: dict[str, torch.Tensor], width: int) -> None:
    """Prompts of another width can never be used, mismatch allowed or not."""
    if state["ctx_pos"].shape[-1] != width:
        raise BackboneMismatchError(
            f"The checkpoint's prompts are {state['ctx_pos'].shape[-1]}-wide but this CLIP's text tower is "
            f"{width}-wide: the prompts were trained with another CLIP (Crane's checkpoints need "
            "openai/clip-vit-large-patch14-336)."
        )


def check_backbone_fingerprint(
    state: dict[str, torch.Tensor], clip: CLIPModel, prompt_token_ids: list[list[int]]
) -> None:
    """Raise `BackboneMismatchError` unless the checkpoint was trained with this CLIP and these prompt texts.

    Compares the stored token embeddings of the fixed tokens with `clip`'s own token embeddings of the same ids,
    and the stored ids with `prompt_token_ids` (padding aside).
    """
    weights = clip.text_model.embeddings.token_embedding.weight
    tolerance = FINGERPRINT_RTOL + torch.finfo(weights.dtype).eps / 2  # a CLIP in reduced precision: its rounding
    token_embedding = weights.detach().float().cpu()
    width = token_embedding.shape[1]
    require_prompt_width(state, width)
    ours = torch.tensor(prompt_token_ids)
    eos = end_of_text_id(clip.config.text_config)
    problems = []
    for index, name in enumerate(("pos", "neg")):
        stored = state[f"tokenized_prompts_{name}"].reshape(-1).long()
        if stored.max() >= token_embedding.shape[0]:
            raise BackboneMismatchError(
                f"tokenized_prompts_{name} has ids up to {int(stored.max())}, outside this CLIP's vocabulary of "
                f"{token_embedding.shape[0]} tokens."
            )
        stored_end = int((stored == eos).int().argmax()) + 1
        our_end = int((ours[index] == eos).int().argmax()) + 1
        if stored[:stored_end].tolist() != ours[index, :our_end].tolist():
            problems.append(f"the stored {name} prompt ids differ from this model's tokenized prompt texts")
        embedded = token_embedding[stored]
        prefix = state[f"token_prefix_{name}"].reshape(-1, width).float()
        suffix = state[f"token_suffix_{name}"].reshape(-1, width).float()
        reference = torch.cat([embedded[:1], embedded[embedded.shape[0] - suffix.shape[0] :]])
        stored_rows = torch.cat([prefix, suffix])
        error = (reference - stored_rows).abs().max() / stored_rows.abs().max().clamp_min(1e-12)
        if error > tolerance:
            problems.append(
                f"token_prefix_{name}/token_suffix_{name} differ from this CLIP's token embeddings "
                f"(relative error {error:.2e})"
            )
    if problems:
        raise BackboneMismatchError(
            "The checkpoint does not match this CLIP backbone: "
            + "; ".join(problems)
            + ". The prompts were trained with other CLIP weights (Crane's checkpoints need "
            "openai/clip-vit-large-patch14-336); pass allow_backbone_mismatch=True "
            "(--allow-backbone-mismatch) to convert anyway."
        )


def apply_original_prompts(state: dict[str, torch.Tensor], model: CraneForAnomalyDetection) -> None:
    """Copy ``ctx_pos``, ``ctx_neg`` and the deep prompts into `model.prompt_learner` (shapes checked)."""
    learner = model.prompt_learner
    deep = torch.stack([state[key] for key in deep_prompt_keys(state)]) if deep_prompt_keys(state) else None
    tensors = {
        "ctx_normal": state["ctx_pos"].reshape(state["ctx_pos"].shape[-2:]),
        "ctx_anomalous": state["ctx_neg"].reshape(state["ctx_neg"].shape[-2:]),
        "deep_prompts": deep
        if deep is not None
        else learner.deep_prompts.new_zeros((0, *learner.deep_prompts.shape[1:])),
    }
    wrong = [
        f"{name}: checkpoint {tuple(value.shape)}, model {tuple(getattr(learner, name).shape)}"
        for name, value in tensors.items()
        if tuple(value.shape) != tuple(getattr(learner, name).shape)
    ]
    if wrong:
        raise ValueError("The checkpoint's prompts do not fit this configuration: " + "; ".join(wrong) + ".")
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(learner, name).copy_(value.to(getattr(learner, name).dtype))
    model._text_cache = None


def convert_original_checkpoint(
    checkpoint: str,
    clip: Any,
    dino: Any = None,
    variant: str | None = None,
    allow_backbone_mismatch: bool = False,
    **config_overrides: Any,
) -> CraneForAnomalyDetection:
    """A `CraneForAnomalyDetection` with the official prompts of `checkpoint` on the given backbones.

    Args:
        checkpoint: path of an official ``.pth`` file.
        clip / dino: backbones as for `CraneForAnomalyDetection.from_backbones`.
        variant: "crane" or "crane+" (must agree with whether `dino` is given).
        allow_backbone_mismatch: convert even if the CLIP fingerprint does not match.
        **config_overrides: `CraneConfig` fields, e.g. ``soft_mean=True`` for the medical setting.

    The model computes what the published code computes (the `CraneConfig` defaults: the official prompts were
    trained with that computation) unless `config_overrides` say otherwise. The config records the checkpoint's
    file name and sha256 (`converted_from`).
    """
    if variant is not None and variant not in ("crane", "crane+"):
        raise ValueError(f"variant={variant!r} is unknown; choose 'crane' or 'crane+'.")
    if variant == "crane+" and dino is None:
        raise ValueError("variant 'crane+' needs a DINOv2 backbone (dino / --dino).")
    if variant == "crane" and dino is not None:
        raise ValueError("variant 'crane' uses no DINOv2 backbone; drop dino / --dino or use 'crane+'.")
    state = load_original_checkpoint(checkpoint)
    clip = CLIPModel.from_pretrained(clip) if isinstance(clip, str) else clip
    if not isinstance(clip, CLIPModel):
        raise TypeError(f"clip must be a CLIPModel or a path/Hub id of one, got {type(clip).__name__}.")
    require_prompt_width(state, clip.config.text_config.hidden_size)
    prompt_length = config_overrides.setdefault("prompt_length", state["ctx_pos"].shape[-2])
    texts = build_prompt_texts(
        prompt_length,
        config_overrides.get("normal_prompt_words", "object."),
        config_overrides.get("anomalous_prompt_words", "damaged object."),
    )
    try:
        check_backbone_fingerprint(
            state, clip, tokenize_prompts(texts, clip.config.text_config.max_position_embeddings)
        )
    except BackboneMismatchError:
        if not allow_backbone_mismatch:
            raise
    config_overrides.setdefault("num_deep_prompts", len(deep_prompt_keys(state)))
    if deep_prompt_keys(state):
        config_overrides.setdefault("deep_prompt_length", state[deep_prompt_keys(state)[0]].shape[0])
    model = CraneForAnomalyDetection.from_backbones(clip, dino, **config_overrides)
    apply_original_prompts(state, model)
    model.config.converted_from = {"checkpoint": os.path.basename(checkpoint), "sha256": file_sha256(checkpoint)}
    return model.eval()


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
