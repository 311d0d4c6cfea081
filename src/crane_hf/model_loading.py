"""What a user types as a model, resolved into a model and its image processor: the one path that
`load_detector`, the pipeline helper `make_pipeline` and every `crane-hf` command (`--model`) take.

- a preset name ("crane+/mvtec", "crane/visa", ...), kind `preset`: `crane_hf.presets.model_from_preset`, backbones
  from the Hub cache, the Hub, or `clip=` / `dino=` local folders;
- a folder written by `save_pretrained`, `crane-hf convert`, `train` or `push --dry-run`, kind `folder`, and
- a Hub id ("org/name"), kind `hub`: `CraneForAnomalyDetection.from_pretrained`.

The computation options given with it (`--soft-mean`, `--eattn-maps`, ...: `computation_options.py`) arrive here as
`CraneConfig` overrides and are validated before anything is loaded; `computation_summary` and `prompts_origin` say
what ran, for the records the commands write.

A new kind of model source (an exported file, for example) is one more kind in `model_kind` and one more branch in
`load_model`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .models.crane.configuration_crane import CraneConfig
from .models.crane.image_processing_crane import CraneImageProcessor
from .models.crane.modeling_crane import CraneForAnomalyDetection
from .models.crane.pipeline_zero_shot_anomaly_detection import ZeroShotAnomalyDetectionPipeline
from .presets import is_preset_name, model_from_preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """ "auto" (or None): CUDA when available, else CPU; otherwise the named device, which must exist here.

    Raises `ValueError` naming the device for an unknown name ("foo"), a device type this machine or this torch
    build does not have ("cuda" without a GPU, "mps" off Apple silicon) and an index past the last device
    ("cuda:7" on a 2-GPU machine), before anything is loaded.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is unknown; use auto, cpu, cuda, cuda:N or mps.") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, parsed.type, None)
        available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
        count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    if not available:
        raise ValueError(
            f"device {device!r}: this machine (torch {torch.__version__}) has no {parsed.type} device; "
            "use --device cpu or auto."
        )
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(
            f"device {device!r}: this machine has {count} {parsed.type} device(s), numbered 0 to {count - 1}."
        )
    return parsed


def model_kind(spec: str) -> str:
    """ "preset", "folder" or "hub": how `load_model` reads `spec` (see the module docstring)."""
    if is_preset_name(spec):
        return "preset"
    return "folder" if os.path.isdir(spec) else "hub"


def load_model(
    spec: str,
    clip: str | None = None,
    dino: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    allow_backbone_mismatch: bool = False,
    **config_overrides: Any,
) -> tuple[CraneForAnomalyDetection, CraneImageProcessor]:
    """A model in eval mode and its image processor.

    Args:
        spec: a preset name ("crane+/mvtec", ...), a folder written by `save_pretrained`, or a Hub id.
        clip / dino: local backbone folders for presets (instead of the Hub).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        dtype: "float32", "bfloat16", "float16" or a torch dtype: every weight is cast to it (the inputs are cast
            where they enter the towers; scores and maps are computed and returned in float32).
        allow_backbone_mismatch: for presets, use a `clip` whose token embeddings differ from the preset's
            fingerprint (`--allow-backbone-mismatch`).
        **config_overrides: `CraneConfig` fields (e.g. `soft_mean=True`, `eattn_map_source="per_layer"`), applied
            when the model is built, validated as a new config is (`CraneConfig.with_overrides`).

    Raises:
        TypeError: an override that is not a `CraneConfig` field (named), before anything is loaded.
        ValueError: `clip` / `dino` / `allow_backbone_mismatch` given for a folder or Hub id (they name their own
            backbones); an override value the field does not accept.
        OSError: a folder or Hub id that cannot be loaded; for presets, `BackboneUnavailableError` (an `OSError`)
            when a backbone is neither cached nor downloadable.
    """
    CraneConfig.check_field_names(config_overrides, "load_model")
    target = resolve_device(device)  # an unusable device is refused before anything is loaded
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    backbone_kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    if model_kind(spec) == "preset":
        model = model_from_preset(
            spec,
            clip=clip,
            dino=dino,
            allow_backbone_mismatch=allow_backbone_mismatch,
            backbone_kwargs=backbone_kwargs,
            **config_overrides,
        )
        processor = CraneImageProcessor.from_crane_config(model.config)
    else:
        if clip or dino or allow_backbone_mismatch:
            raise ValueError(
                "--clip/--dino/--allow-backbone-mismatch apply to presets only; a model folder names its own "
                "backbones."
            )
        check_model_source(spec)
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = CraneForAnomalyDetection.from_pretrained(spec, **kwargs, **config_overrides)
        processor = _processor_for(spec, model)
    model.to(target) if torch_dtype is None else model.to(device=target, dtype=torch_dtype)
    return model.eval(), processor


def check_model_source(spec: str) -> None:
    """Refuse a model folder that does not exist or has no config.json, naming it (Hub ids pass through)."""
    looks_local = os.path.isabs(spec) or spec.startswith((".", "~")) or spec.count("/") > 1  # else a Hub id
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise FileNotFoundError(f"{os.path.join(spec, 'config.json')} is missing: {spec} is not a model folder.")
    elif os.path.exists(spec):
        raise NotADirectoryError(f"model {spec} is a file; give the model folder (it holds config.json).")
    elif looks_local:
        raise FileNotFoundError(f"no such model folder: {spec}")


def _processor_for(spec: str, model: CraneForAnomalyDetection) -> CraneImageProcessor:
    """The folder's saved processor if it has one, else the one matching the model's config."""
    if os.path.isfile(os.path.join(spec, "preprocessor_config.json")):
        return CraneImageProcessor.from_pretrained(spec)
    return CraneImageProcessor.from_crane_config(model.config)


def make_pipeline(model: Any, processor: Any) -> ZeroShotAnomalyDetectionPipeline:
    """The anomaly-detection pipeline around an already loaded model and processor."""
    return ZeroShotAnomalyDetectionPipeline(model=model, image_processor=processor, device=model.device)


def computation_summary(model: CraneForAnomalyDetection | CraneConfig) -> dict[str, Any]:
    """The variant, the three computation fields (`CraneConfig.computation`), whether they are the published
    code's, soft_mean, and the fields that do not apply to this variant (e.g. `dattn_input` for Crane, which has no
    D-Attn: left out of `published_computation`): what decides the numbers a model gives, for the records the
    commands write. Takes a model or its config."""
    config = getattr(model, "config", model)
    return {
        "variant": config.variant,
        **config.computation,
        "published_computation": config.computes_published_code,
        "soft_mean": config.soft_mean,
        "not_applicable": [name for name in config.not_applicable_fields if name in config.computation],
    }


def computation_changes(before: CraneConfig, after: CraneConfig) -> dict[str, dict[str, Any]]:
    """The inference fields (`CraneConfig.inference_computation`) whose values differ between two configs, as
    {name: {"from": value, "to": value}}."""
    old, new = before.inference_computation, after.inference_computation
    return {name: {"from": old[name], "to": new[name]} for name in new if old.get(name) != new[name]}


def prompts_origin(spec: str, model: CraneForAnomalyDetection) -> dict[str, Any]:
    """Where the model's prompts come from: a bundled preset, a local folder (and the official checkpoint it was
    converted from, or the preset it was saved from, when its config records one) or a Hub id."""
    preset = getattr(model.config, "preset", None)
    converted = getattr(model.config, "converted_from", None)
    kind = model_kind(spec)
    if kind == "preset":
        origin: dict[str, Any] = {"kind": kind, "preset": spec}
    elif kind == "folder":
        origin = {"kind": kind, "path": os.path.abspath(spec)}
    else:
        origin = {"kind": kind, "repo_id": spec}
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
    allow_backbone_mismatch: bool = False,
    **config_overrides: Any,
) -> ZeroShotAnomalyDetectionPipeline:
    """The "zero-shot-anomaly-detection" pipeline for a preset name, a model folder or a Hub id.

    Same as `transformers.pipeline("zero-shot-anomaly-detection", model=...)`, which takes folders and Hub ids,
    but also for the bundled presets (backbones from the Hub cache, or `clip=` / `dino=` local folders).
    """
    loaded = load_model(
        model,
        clip=clip,
        dino=dino,
        device=device,
        dtype=dtype,
        allow_backbone_mismatch=allow_backbone_mismatch,
        **config_overrides,
    )
    return make_pipeline(*loaded)
