"""Registering Crane with transformers, and when it happens.

`register()` makes transformers know Crane:

- `AutoConfig` model type "crane" -> `CraneConfig`; `AutoModel` and `AutoImageProcessor` for `CraneConfig`;
- the task "zero-shot-anomaly-detection" (`PIPELINE_REGISTRY`, model class `AutoModel`), with the default preset
  "crane+/mvtec" as its default model (see below);
- `register_for_auto_class` on the three classes, so that `save_pretrained` copies the model folder's code
  (`models/crane/`) and writes `auto_map`, and saved folders load with `trust_remote_code=True` without crane_hf;
- the preset loader behind `CraneForAnomalyDetection.from_preset`: the bundled presets live in `crane_hf.presets`,
  which the model folder cannot import (it ships as remote code), so the package hands the loader to the model;
- presets as `model=` of `transformers.pipeline`: transformers reads a string model as a folder or a Hub id only, and
  huggingface_hub refuses "crane+/mvtec" as a repository id before any code of the task runs, so transformers offers
  no hook for it. `transformers.pipeline` is replaced by a thin wrapper that calls
  `model_loading.pipeline_with_presets(<transformers' pipeline>, ...)`, which for this task loads presets (and the
  default, when no model is given) through `load_model`, as `load_detector` does, and leaves every other call to
  transformers. A `pipeline` name bound before crane_hf was
  imported (`from transformers import pipeline; import crane_hf`) is transformers' own function: import crane_hf
  first, or call `transformers.pipeline`.

The default model is the preset `crane+/mvtec`, not a Hub repository: it is the paper's model with its official
prompts, bundled with the package, the default of `load_detector` and of `crane-hf predict`; its backbones are the
Hub's `openai/clip-vit-large-patch14-336` and `facebook/dinov2-with-registers-base`, and where they are neither cached
nor downloadable `pipeline("zero-shot-anomaly-detection")` fails at once with `BackboneUnavailableError`, which gives
the download commands. A Hub repository as default would duplicate the bundled prompts and add one more download.

`import crane_hf` calls `register_when_transformers_is_imported()`. Registering imports torch and transformers
(seconds), which `crane-hf --help` must not wait for, and nothing can use the registration before transformers is
imported. So it runs at once where transformers is already imported, and otherwise right after transformers' own
import has finished, from a finder on `sys.meta_path` that hands transformers' module spec on unchanged except for
running `register()` after the module has executed, then removes itself. Importing any module of `crane_hf.models`
imports transformers first (`models/__init__.py`), so the registration never meets a module of the model folder
half-imported.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
from typing import Any

PIPELINE_TASK = "zero-shot-anomaly-detection"

_registered = False


def register() -> None:
    """Register Crane with transformers (idempotent); see the module docstring for what is registered."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    from .models.crane import (
        CraneConfig,
        CraneForAnomalyDetection,
        CraneImageProcessor,
        ZeroShotAnomalyDetectionPipeline,
    )
    from .presets import DEFAULT_PRESET, model_from_preset

    AutoConfig.register("crane", CraneConfig, exist_ok=True)
    AutoModel.register(CraneConfig, CraneForAnomalyDetection, exist_ok=True)
    AutoImageProcessor.register(CraneConfig, image_processor_classes={"pil": CraneImageProcessor}, exist_ok=True)
    CraneConfig.register_for_auto_class()
    CraneForAnomalyDetection.register_for_auto_class("AutoModel")
    CraneImageProcessor.register_for_auto_class("AutoImageProcessor")
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK,
        pipeline_class=ZeroShotAnomalyDetectionPipeline,
        pt_model=AutoModel,
        default={"model": (DEFAULT_PRESET, None)},
        type="image",
    )
    CraneForAnomalyDetection.preset_loader = staticmethod(model_from_preset)
    _install_pipeline_with_presets()
    _registered = True


def _install_pipeline_with_presets() -> None:
    """`transformers.pipeline` (and `transformers.pipelines.pipeline`) becomes a wrapper calling
    `model_loading.pipeline_with_presets` with transformers' function (imported on the first call: `model_loading`
    itself may be what is importing transformers now)."""
    import transformers
    import transformers.pipelines

    original = transformers.pipelines.pipeline
    if getattr(original, "crane_hf_presets", False):
        return

    @functools.wraps(original)
    def pipeline(*args: Any, **kwargs: Any) -> Any:
        from .model_loading import pipeline_with_presets

        return pipeline_with_presets(original, *args, **kwargs)

    pipeline.crane_hf_presets = True
    transformers.pipelines.pipeline = pipeline
    transformers.pipeline = pipeline  # transformers' lazy module keeps an attribute that is set


def register_when_transformers_is_imported() -> None:
    """`register()` now if transformers is imported, else right after transformers' import finishes."""
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: returns transformers' spec, as the other finders find it, with `_RegisteringLoader`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    """transformers' own loader, then `register()`; the module keeps its own loader as `__loader__`."""

    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterAfterTransformers)]
        register()


__all__ = ["PIPELINE_TASK", "register", "register_when_transformers_is_imported"]
