"""What a user types as a model, resolved into a model and its image processor: the one path that
`load_detector`, the pipeline helper `make_pipeline` and every `crane-hf` command (`--model`) take.

- a preset name ("crane+/mvtec", "crane/visa", ...), kind `preset`: `crane_hf.presets.model_from_preset`, backbones
  from the Hub cache, the Hub, or `clip=` / `dino=` local folders;
- a folder written by `save_pretrained`, `crane-hf convert`, `train` or `push --dry-run`, kind `folder`, and
- a Hub id ("org/name"), kind `hub`: `CraneForAnomalyDetection.from_pretrained`;
- a folder written by `crane-hf export` (it holds `crane_export.json`), kind `exported`:
  `crane_hf.export.ExportedCraneModel`, the ONNX Runtime / OpenVINO graph behind the same pipeline, on the CPU,
  in float32 (other devices and dtypes, `clip=` / `dino=` and config fields computed inside the graph are refused).

A name that is none of these fails at once, with the presets listed and the closest one suggested: a name that is
not a valid Hub id ("crane+/mvtc"), a path that does not exist ("./missing-folder"), or a Hub id that is not in the
Hugging Face cache where the Hub cannot be reached (no download retries: `hub_availability.py`). A folder without
config.json and a file are named as such (`check_model_source`).

`transformers.pipeline("zero-shot-anomaly-detection", model=...)` takes this path too for presets and for no model
(the default preset): see `pipeline_with_presets`, which crane_hf's registration puts in place of
`transformers.pipeline`.

The computation options given with it (`--soft-mean`, `--eattn-maps`, ...: `computation_options.py`) arrive here as
`CraneConfig` overrides and are validated before anything is loaded; `computation_summary` and `prompts_origin` say
what ran, for the records the commands write. An exported folder's computation was fixed when it was exported: an
override of a field computed inside its graph that differs from its config is refused (thresholds and the smoothing
sigma, applied after the graph, may change).

A new kind of model source is one more kind in `model_kind` and one more branch in `load_model`.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .export.folder import is_exported_folder
from .hub_availability import (
    BackboneUnavailableError,
    backbone_unavailable_message,
    is_cached,
    is_valid_hub_id,
    local_dir_name,
    unavailable_reason,
)
from .models.crane.configuration_crane import CraneConfig
from .models.crane.image_processing_crane import CraneImageProcessor
from .models.crane.modeling_crane import CraneForAnomalyDetection
from .models.crane.pipeline_zero_shot_anomaly_detection import PIPELINE_TASK, ZeroShotAnomalyDetectionPipeline
from .presets import check_preset_backbones, is_preset_name, list_presets, model_from_preset

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .export.runner import ExportedCraneModel

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


def check_device(spec: str | None, device: str | torch.device | None) -> None:
    """Refuse, before anything is loaded, a device the model `spec` cannot run on: for an exported folder anything
    but the CPU ("auto" means the CPU there; the message names the folder), otherwise a device this machine does not
    have (`resolve_device`). Raises `ValueError`."""
    spec = spec if spec is None else model_path(spec)
    if spec is not None and is_exported_folder(spec):  # not model_kind: a missing folder is named where it loads
        from .export.runner import check_cpu_device

        check_cpu_device(device, spec)
    else:
        resolve_device(device)


def model_path(spec: str) -> str:
    """`spec` with a leading "~" expanded (a folder typed in quotes or given from code); a preset name or a Hub id
    never starts with "~" and comes back unchanged."""
    return os.path.expanduser(spec) if spec.startswith("~") else spec


def _presets_hint(spec: str) -> str:
    close = difflib.get_close_matches(spec, list_presets(), n=1, cutoff=0.6)
    suggestion = f"Did you mean {close[0]}? " if close else ""
    return f"{suggestion}Presets: {', '.join(list_presets())}."


def model_kind(spec: str) -> str:
    """ "preset", "exported", "folder" or "hub": how `load_model` reads `spec` (see the module docstring).

    Raises:
        ValueError: `spec` is no preset, no folder here, and not a valid Hub id (the message lists the presets).
    """
    spec = model_path(spec)
    if is_preset_name(spec):
        return "preset"
    if is_exported_folder(spec):
        return "exported"
    if os.path.isdir(spec):
        return "folder"
    if not is_valid_hub_id(spec):
        raise ValueError(
            f"Unknown model {spec!r}: not a preset, no folder of that name here, and not a valid Hub id. "
            + _presets_hint(spec)
        )
    return "hub"


def check_model_available(spec: str) -> str:
    """`model_kind(spec)`, after `check_model_source` (a folder without config.json, a path that does not exist and a
    file are named as such), and for a Hub id that is not in the Hugging Face cache, that the Hub can be reached (one
    connection attempt, no download retries).

    Raises:
        FileNotFoundError / NotADirectoryError: see `check_model_source`.
        ValueError: see `model_kind`.
        OSError: a Hub id that is neither cached nor downloadable here (the message lists the presets).
    """
    spec = model_path(spec)
    if not is_preset_name(spec):
        check_model_source(spec)
    kind = model_kind(spec)
    if kind == "hub":
        reason = unavailable_reason(spec)
        if reason:
            raise OSError(
                f"Model {spec!r} is not a preset, there is no folder of that name here, and as a Hub id it is neither "
                f"in the Hugging Face cache nor downloadable here ({reason}). " + _presets_hint(spec)
            )
    return kind


def check_folder_backbones(folder: str) -> None:
    """For a prompts-only folder (`save_pretrained(include_backbones=False)`, training outputs), that the backbones
    its config names as Hub ids are cached or downloadable here (one connection attempt, no retries).

    Raises:
        BackboneUnavailableError: a backbone neither cached nor downloadable, with the commands that get it.
    """
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as stream:
            config = json.load(stream)
    except (OSError, ValueError):
        return  # from_pretrained names the problem
    if not isinstance(config, dict) or config.get("backbones_in_checkpoint", True):
        return
    fields = ["clip_backbone", *(["dino_backbone"] if config.get("dino_config") else [])]
    sources = {field: config.get(field) for field in fields}
    hub_ids = {
        field: source
        for field, source in sources.items()
        if isinstance(source, str) and not os.path.isdir(source) and is_valid_hub_id(source)
    }
    for source in hub_ids.values():
        reason = unavailable_reason(source)
        if reason:
            settings = ", ".join(f'"{field}": "/path/to/{local_dir_name(repo)}"' for field, repo in hub_ids.items())
            usage = f"  set {settings} in {os.path.join(folder, 'config.json')}"
            raise BackboneUnavailableError(
                backbone_unavailable_message(f"Model {folder}", source, reason, list(hub_ids.values()), usage)
            )


def check_model_loadable(spec: str, clip: str | None = None, dino: str | None = None) -> str:
    """`check_model_available(spec)`, and that the backbones it needs can be had here (a preset's, or `clip` /
    `dino` given for it; those a prompts-only folder names): every check of a model name that needs no loading, for
    callers that must fail at once, before starting work or processes. Returns the kind (`model_kind`).

    Raises:
        the errors of `check_model_available`; `BackboneUnavailableError` (an `OSError`) for a backbone neither
        cached nor downloadable here, with the commands that get it.
    """
    kind = check_model_available(spec)
    if kind == "preset":
        check_preset_backbones(spec, clip=clip, dino=dino)
    elif kind == "folder":
        check_folder_backbones(spec)
    return kind


def load_model(
    spec: str,
    clip: str | None = None,
    dino: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    allow_exported: bool = True,
    allow_backbone_mismatch: bool = False,
    **config_overrides: Any,
) -> tuple[CraneForAnomalyDetection | ExportedCraneModel, CraneImageProcessor]:
    """A model in eval mode and its image processor.

    Args:
        spec: a preset name ("crane+/mvtec", ...), a folder written by `save_pretrained` or by `crane-hf export`,
            or a Hub id.
        clip / dino: local backbone folders for presets (instead of the Hub).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        dtype: "float32", "bfloat16", "float16" or a torch dtype: every weight is cast to it (the inputs are cast
            where they enter the towers; scores and maps are computed and returned in float32).
        allow_backbone_mismatch: for presets, use a `clip` whose token embeddings differ from the preset's
            fingerprint (`--allow-backbone-mismatch`).
        allow_exported: False where the caller needs the PyTorch model (push, export): an exported folder is refused.
        **config_overrides: `CraneConfig` fields (e.g. `soft_mean=True`, `eattn_map_source="per_layer"`), applied
            when the model is built, validated as a new config is (`CraneConfig.with_overrides`); for an exported
            folder only the fields applied after the graph may differ from its config.

    Returns:
        For an exported folder, an `ExportedCraneModel` (the pipeline's model interface, CPU, float32).

    Raises:
        TypeError: an override that is not a `CraneConfig` field (named), before anything is loaded.
        ValueError: `clip` / `dino` / `allow_backbone_mismatch` given for a folder or Hub id (they name their own
            backbones); an override value the field does not accept; a name that is no preset, no folder and no valid
            Hub id; for an exported folder also a dtype other than float32, a device other than the CPU, an override
            of a field the graph computes, or a folder that fails its checks (`crane_hf/export/folder.py`).
        ImportError: an exported folder whose runtime (onnxruntime / openvino) is not installed.
        OSError: a folder or Hub id that cannot be loaded (`FileNotFoundError` / `NotADirectoryError` for a folder
            without config.json, a path that does not exist or a file; a Hub id neither cached nor downloadable here
            fails at once); `BackboneUnavailableError` (an `OSError`) when a backbone of a preset or of a
            prompts-only folder is neither cached nor downloadable.
    """
    CraneConfig.check_field_names(config_overrides, "load_model")
    spec = model_path(spec)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    backbone_kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    kind = check_model_available(spec)
    if kind == "exported":
        if not allow_exported:
            raise ValueError(
                f"{spec} is an exported ONNX/OpenVINO folder: it runs (predict, calibrate, evaluate) but cannot be "
                "saved, published or exported again; use the model folder it was exported from."
            )
        if allow_backbone_mismatch:
            raise ValueError(f"--allow-backbone-mismatch applies to presets only; {spec} is an exported graph.")
        return _load_exported(spec, clip, dino, device, torch_dtype, config_overrides)
    target = resolve_device(device)  # an unusable device is refused before anything is loaded
    if kind == "preset":
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
        if kind == "folder":
            check_folder_backbones(spec)
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        try:
            model = CraneForAnomalyDetection.from_pretrained(spec, **kwargs, **config_overrides)
        except OSError as error:
            if kind == "hub" and not is_cached(spec):  # not on the Hub either (or not a Crane model there)
                raise OSError(f"{error}\n{_presets_hint(spec)}") from error
            raise
        processor = _processor_for(spec, model)
    model.to(target) if torch_dtype is None else model.to(device=target, dtype=torch_dtype)
    return model.eval(), processor


def _load_exported(
    spec: str,
    clip: str | None,
    dino: str | None,
    device: str | None,
    dtype: torch.dtype | None,
    config_overrides: dict[str, Any],
) -> tuple[ExportedCraneModel, CraneImageProcessor]:
    """An exported folder's runner and processor; what it cannot honour is refused before the graph is loaded."""
    from .export.runner import ExportedCraneModel, check_cpu_device

    if clip or dino:
        raise ValueError(f"--clip/--dino apply to presets only; {spec} is an exported graph that holds its backbones.")
    if dtype not in (None, torch.float32):
        raise ValueError(
            f"{spec} is an exported float32 graph; dtype {str(dtype).removeprefix('torch.')} is not available for it "
            "(leave --dtype unset or use float32)."
        )
    check_cpu_device(device, spec)
    model = ExportedCraneModel(spec)
    model.apply_config_overrides(config_overrides)
    return model, model.image_processor()


def check_model_source(spec: str) -> None:
    """Refuse a model folder that does not exist or has no config.json, naming it (Hub ids pass through).

    A missing `spec` is a missing folder, not a Hub id, when it looks local: absolute, starting with "." or "~",
    more than one "/", no "/" at all (Hub ids of Crane models are "owner/name"), or its first component is an
    existing local folder ("models/crane" where ./models exists)."""
    spec = model_path(spec)
    parts = spec.replace(os.sep, "/").split("/")
    looks_local = (
        os.path.isabs(spec)
        or spec.startswith((".", "~"))
        or len(parts) != 2
        or os.path.isdir(os.path.expanduser(parts[0]))
    )
    if os.path.isdir(spec):
        check_regular_files(spec)
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise FileNotFoundError(f"{os.path.join(spec, 'config.json')} is missing: {spec} is not a model folder.")
        check_json_sizes(spec)
    elif os.path.exists(spec):
        raise NotADirectoryError(f"model {spec} is a file; give the model folder (it holds config.json).")
    elif looks_local:
        raise FileNotFoundError(f"no such model folder: {spec}. " + _presets_hint(spec))


MODEL_FILE_SUFFIXES = (".json", ".safetensors")  # the files of a model folder that crane_hf reads


def _not_regular_kind(path: str) -> str:
    if not os.path.exists(path):
        return "a symbolic link to nothing"
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    return "a device or socket"


def check_regular_files(folder: str) -> None:
    """Refuse (`ValueError`, naming it) an entry of the model folder `folder` named like a file crane_hf reads
    there (`MODEL_FILE_SUFFIXES`: config.json, preprocessor_config.json, the weights and their index) that is not a
    regular file once links are followed: a link to nothing (a half-deleted Hub cache), a named pipe (reading it
    would block), a device (/dev/zero never ends) or a folder. Such a file is never taken for a missing one (for
    preprocessor_config.json, that would silently put the defaults in its place)."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(MODEL_FILE_SUFFIXES) and not os.path.isfile(path):
            raise ValueError(
                f"{path}: not a regular file ({_not_regular_kind(path)}); put the file itself in the model folder."
            )


MAX_JSON_BYTES = 16 * 2**20  # the largest JSON file read from a model folder (a real config.json is a few kB)


def check_json_sizes(folder: str, limit: int = MAX_JSON_BYTES) -> None:
    """Refuse, naming it, a JSON file of the model folder `folder` (config.json, preprocessor_config.json, the
    shard index, ...) larger than `limit` bytes, before anything reads it whole (`ValueError`)."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".json") and os.path.isfile(path) and os.path.getsize(path) > limit:
            raise ValueError(
                f"{path}: refused, {os.path.getsize(path):,} bytes exceeds the limit of {limit:,} bytes for a JSON "
                "file of a model folder."
            )


def _processor_for(spec: str, model: CraneForAnomalyDetection) -> CraneImageProcessor:
    """The folder's saved processor if it has one, else the one matching the model's config."""
    if os.path.isfile(os.path.join(spec, "preprocessor_config.json")):
        return CraneImageProcessor.from_pretrained(spec)
    return CraneImageProcessor.from_crane_config(model.config)


def make_pipeline(model: Any, processor: Any) -> ZeroShotAnomalyDetectionPipeline:
    """The anomaly-detection pipeline around an already loaded model and processor."""
    return ZeroShotAnomalyDetectionPipeline(
        model=model, image_processor=processor, device=model.device, task=PIPELINE_TASK
    )


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
    """Where the model's prompts come from: a bundled preset, a local folder or exported folder (and the official
    checkpoint it was converted from, or the preset it was saved from, when its config records one) or a Hub id."""
    preset = getattr(model.config, "preset", None)
    converted = getattr(model.config, "converted_from", None)
    spec = model_path(spec)
    kind = model_kind(spec)
    if kind == "preset":
        origin: dict[str, Any] = {"kind": kind, "preset": spec}
    elif kind in ("folder", "exported"):
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
    """The "zero-shot-anomaly-detection" pipeline for a preset name, a model folder, an exported folder or a Hub id.

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


def default_model() -> str:
    """The task's default model, as registered with transformers (`PIPELINE_REGISTRY`, registration.py)."""
    from transformers.pipelines import PIPELINE_REGISTRY

    name, _revision = PIPELINE_REGISTRY.supported_tasks[PIPELINE_TASK]["default"]["model"]
    return name


def pipeline_with_presets(
    pipeline: Callable[..., Any], task: str | None = None, model: Any = None, *args: Any, **kwargs: Any
):
    """`pipeline(task, model, ...)` (transformers' function), also taking crane_hf's presets as `model=` for
    "zero-shot-anomaly-detection"; crane_hf's registration puts it in place of `transformers.pipeline`.

    transformers reads a string `model` as a local folder or a Hub id only: `pipeline()` loads its config before any
    code of a task or a model class runs, and huggingface_hub refuses "crane+/mvtec" as a repository id, so no hook of
    transformers' can give a name another meaning. For this task, a preset name (and no model: the registered default,
    `default_model()`) is loaded by `load_model`, as `load_detector` does (backbones failing at once with
    `BackboneUnavailableError`), and transformers gets the loaded model and processor; `model_kwargs` then go to
    `load_model` (`clip`, `dino`, `CraneConfig` fields) and `dtype` to the backbones. Any other model name of this task
    is checked first (`check_model_available`: a typo fails at once, listing the presets; `check_folder_backbones`);
    every other call is transformers' own.
    """
    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    ours = task == PIPELINE_TASK or (task is None and name is not None and is_preset_name(name))
    if not ours or args or kwargs.get("config") is not None or (model is not None and name is None):
        return pipeline(task, model, *args, **kwargs)
    if name is None:
        name = default_model()
        logger.warning("No model was supplied, defaulted to %s (crane_hf's default preset).", name)
    name = model_path(name)
    kind = check_model_loadable(name)
    if kind != "preset":
        return pipeline(PIPELINE_TASK, name, **kwargs)
    dtype = kwargs.pop("dtype", None)
    loaded, processor = load_model(
        name, device="cpu", dtype=None if dtype == "auto" else dtype, **(kwargs.pop("model_kwargs", None) or {})
    )
    kwargs.setdefault("image_processor", processor)
    return pipeline(PIPELINE_TASK, loaded, **kwargs)
