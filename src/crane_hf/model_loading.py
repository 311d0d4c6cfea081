"""What a user types as a model, resolved into a model and its image processor: the one path that
`load_detector`, the pipeline helper `make_pipeline` and every `crane-hf` command (`--model`) take.

- a preset name ("crane+/mvtec", "crane/visa", ...), kind `preset`: `crane_hf.presets.model_from_preset`, backbones
  from the Hub cache, the Hub, or `clip=` / `dino=` local folders;
- a folder written by `save_pretrained`, `crane-hf convert`, `train` or `push --dry-run`, kind `folder`, and
- a Hub id ("org/name"), kind `hub`: `CraneForAnomalyDetection.from_pretrained`;
- a folder written by `crane-hf export` (it holds `crane_export.json`), kind `exported`:
  `crane_hf.export.ExportedCraneModel`, the ONNX Runtime / OpenVINO graph behind the same pipeline, on the CPU,
  in float32 (other devices and dtypes, `clip=` / `dino=` and config fields computed inside the graph are refused).

A new kind of model source is one more kind in `model_kind` and one more branch in `load_model`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from .export.folder import is_exported_folder
from .models.crane.image_processing_crane import CraneImageProcessor
from .models.crane.modeling_crane import CraneForAnomalyDetection
from .models.crane.pipeline_zero_shot_anomaly_detection import ZeroShotAnomalyDetectionPipeline
from .presets import is_preset_name, model_from_preset

if TYPE_CHECKING:
    from .export.runner import ExportedCraneModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """ "auto" (or None): CUDA when available, else CPU; otherwise the named device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_kind(spec: str) -> str:
    """ "preset", "exported", "folder" or "hub": how `load_model` reads `spec` (see the module docstring)."""
    if is_preset_name(spec):
        return "preset"
    if is_exported_folder(spec):
        return "exported"
    return "folder" if os.path.isdir(spec) else "hub"


def load_model(
    spec: str,
    clip: str | None = None,
    dino: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    allow_exported: bool = True,
    **config_overrides: Any,
) -> tuple[CraneForAnomalyDetection | ExportedCraneModel, CraneImageProcessor]:
    """A model in eval mode and its image processor.

    Args:
        spec: a preset name ("crane+/mvtec", ...), a folder written by `save_pretrained` or by `crane-hf export`,
            or a Hub id.
        clip / dino: local backbone folders for presets (instead of the Hub).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        dtype: "float32", "bfloat16", "float16" or a torch dtype.
        allow_exported: False where the caller needs the PyTorch model (push, export): an exported folder is refused.
        **config_overrides: `CraneConfig` fields set on the loaded model (e.g. `soft_mean=True`).

    Returns:
        For an exported folder, an `ExportedCraneModel` (the pipeline's model interface, CPU, float32).

    Raises:
        ValueError: `clip` / `dino` given for a folder or Hub id (they name their own backbones); for an exported
            folder also a dtype other than float32, a device other than the CPU, an override of a field the graph
            computes, or a folder that fails its checks (`crane_hf/export/folder.py`).
        ImportError: an exported folder whose runtime (onnxruntime / openvino) is not installed.
        OSError: a folder or Hub id that cannot be loaded; for presets, `BackboneUnavailableError` (an `OSError`)
            when a backbone is neither cached nor downloadable.
    """
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    backbone_kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    kind = model_kind(spec)
    if kind == "exported":
        if not allow_exported:
            raise ValueError(
                f"{spec} is an exported ONNX/OpenVINO folder: it runs (predict, calibrate, evaluate) but cannot be "
                "saved, published or exported again; use the model folder it was exported from."
            )
        return _load_exported(spec, clip, dino, device, torch_dtype, config_overrides)
    if kind == "preset":
        model = model_from_preset(spec, clip=clip, dino=dino, backbone_kwargs=backbone_kwargs, **config_overrides)
        processor = CraneImageProcessor.from_crane_config(model.config)
    else:
        if clip or dino:
            raise ValueError("--clip/--dino apply to presets only; a model folder names its own backbones.")
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = CraneForAnomalyDetection.from_pretrained(spec, **kwargs)
        for key, value in config_overrides.items():
            setattr(model.config, key, value)
        processor = _processor_for(spec, model)
    model.to(resolve_device(device))
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


def _processor_for(spec: str, model: CraneForAnomalyDetection) -> CraneImageProcessor:
    """The folder's saved processor if it has one, else the one matching the model's config."""
    if os.path.isfile(os.path.join(spec, "preprocessor_config.json")):
        return CraneImageProcessor.from_pretrained(spec)
    return CraneImageProcessor.from_crane_config(model.config)


def make_pipeline(model: Any, processor: Any) -> ZeroShotAnomalyDetectionPipeline:
    """The anomaly-detection pipeline around an already loaded model and processor."""
    return ZeroShotAnomalyDetectionPipeline(model=model, image_processor=processor, device=model.device)


def load_detector(
    model: str = "crane+/mvtec",
    clip: str | None = None,
    dino: str | None = None,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = None,
    **config_overrides: Any,
) -> ZeroShotAnomalyDetectionPipeline:
    """The "zero-shot-anomaly-detection" pipeline for a preset name, a model folder, an exported folder or a Hub id.

    Same as `transformers.pipeline("zero-shot-anomaly-detection", model=...)`, which takes folders and Hub ids,
    but also for the bundled presets (backbones from the Hub cache, or `clip=` / `dino=` local folders).
    """
    return make_pipeline(*load_model(model, clip=clip, dino=dino, device=device, dtype=dtype, **config_overrides))
