"""Resolve what users type as `--model` (a preset name, a local model folder or a Hub id) and the computation
options they give with it."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from .configuration_crane import DATTN_INPUTS, EATTN_MAP_SOURCES, CraneConfig
from .image_processing_crane import CraneImageProcessor
from .modeling_crane import CraneForAnomalyDetection
from .presets import is_preset_name, model_from_preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """ "auto" (or None): CUDA when available, else CPU; otherwise the named device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    spec: str,
    clip: str | None = None,
    dino: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    **config_overrides: Any,
) -> tuple[CraneForAnomalyDetection, CraneImageProcessor]:
    """A model in eval mode and its image processor.

    Args:
        spec: a preset name ("crane+/mvtec", ...), a folder written by `save_pretrained`, or a Hub id.
        clip / dino: local backbone folders for presets (instead of the Hub).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        dtype: "float32", "bfloat16", "float16" or a torch dtype.
        **config_overrides: `CraneConfig` fields (e.g. `soft_mean=True`, `eattn_map_source="per_layer"`), applied
            when the model is built, validated as a new config is (`CraneConfig.with_overrides`); an unknown name
            raises `TypeError` before anything is loaded.
    """
    CraneConfig.check_field_names(config_overrides, "load_model")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    backbone_kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    if is_preset_name(spec):
        model = model_from_preset(spec, clip=clip, dino=dino, backbone_kwargs=backbone_kwargs, **config_overrides)
        processor = CraneImageProcessor.from_crane_config(model.config)
    else:
        if clip or dino:
            raise ValueError("--clip/--dino apply to presets only; a model folder names its own backbones.")
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = CraneForAnomalyDetection.from_pretrained(spec, **kwargs, **config_overrides)
        processor = _processor_for(spec, model)
    model.to(resolve_device(device))
    return model.eval(), processor


def _processor_for(spec: str, model: CraneForAnomalyDetection) -> CraneImageProcessor:
    """The folder's saved processor if it has one, else the one matching the model's config."""
    if os.path.isfile(os.path.join(spec, "preprocessor_config.json")):
        return CraneImageProcessor.from_pretrained(spec)
    return CraneImageProcessor.from_crane_config(model.config)


def add_computation_arguments(
    parser: argparse.ArgumentParser,
    title: str = "computation (default: the model's config; presets and converted official checkpoints: the "
    "published code's)",
) -> None:
    """Options that override what the model computes (`computation_overrides` reads them back)."""
    group = parser.add_argument_group(title)
    group.add_argument(
        "--soft-mean",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average the maps' anomaly probabilities (--soft-mean) or softmax their averaged logits (--no-soft-mean)",
    )
    group.add_argument(
        "--eattn-maps",
        dest="eattn_map_source",
        choices=EATTN_MAP_SOURCES,
        default=None,
        help="E-Attn maps from the e stream after the last layer (last_layer, the published code) or after each "
        "feature layer (per_layer)",
    )
    group.add_argument(
        "--dattn-input",
        choices=DATTN_INPUTS,
        default=None,
        help="o stream point D-Attn reads: after the layer's attention (after_attention, the published code) or the "
        "layer input (layer_input)",
    )
    group.add_argument(
        "--deep-prompt-rounding",
        dest="deep_prompt_rounding_dtype",
        choices=["float16", "bfloat16", "none"],
        default=None,
        help="dtype the deep prompts are rounded through (float16: the published code; none: no rounding)",
    )


def computation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `CraneConfig` overrides given with `add_computation_arguments`'s options (only those given)."""
    overrides = {
        name: getattr(args, name, None)
        for name in ("soft_mean", "eattn_map_source", "dattn_input", "deep_prompt_rounding_dtype")
        if getattr(args, name, None) is not None
    }
    if overrides.get("deep_prompt_rounding_dtype") == "none":
        overrides["deep_prompt_rounding_dtype"] = None
    return overrides


def computation_summary(model: CraneForAnomalyDetection) -> dict[str, Any]:
    """The variant, the three computation fields (`CraneConfig.computation`), whether they are the published
    code's, and soft_mean: what decides the numbers a model gives, for the records the commands write."""
    config = model.config
    return {
        "variant": config.variant,
        **config.computation,
        "published_computation": config.computes_published_code,
        "soft_mean": config.soft_mean,
    }


def prompts_origin(spec: str, model: CraneForAnomalyDetection) -> dict[str, Any]:
    """Where the model's prompts come from: a bundled preset, a local folder (and the official checkpoint it was
    converted from, or the preset it was saved from, when its config records one) or a Hub id."""
    preset = getattr(model.config, "preset", None)
    converted = getattr(model.config, "converted_from", None)
    if is_preset_name(spec):
        origin: dict[str, Any] = {"kind": "preset", "preset": spec}
    elif os.path.isdir(spec):
        origin = {"kind": "folder", "path": os.path.abspath(spec)}
    else:
        origin = {"kind": "hub", "repo_id": spec}
    if origin["kind"] != "preset" and preset:
        origin["preset"] = preset
    if converted:
        origin["converted_from"] = converted
    return origin


def load_detector(
    model: str = "crane+/mvtec",
    clip: str | None = None,
    dino: str | None = None,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = None,
    **config_overrides: Any,
):
    """The "zero-shot-anomaly-detection" pipeline for a preset name, a model folder or a Hub id.

    Same as `transformers.pipeline("zero-shot-anomaly-detection", model=...)`, which takes folders and Hub ids,
    but also for the bundled presets (backbones from the Hub cache, or `clip=` / `dino=` local folders).
    """
    from .predict import make_pipeline

    return make_pipeline(*load_model(model, clip=clip, dino=dino, device=device, dtype=dtype, **config_overrides))
