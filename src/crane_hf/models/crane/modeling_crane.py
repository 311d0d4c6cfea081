"""CraneForAnomalyDetection: Crane and Crane+ zero-shot anomaly detection on transformers' CLIP and DINOv2.

The computation is ``crane-method.md`` sections 2-6; each concept lives in its own module:

- E-Attn (self-correlation stream of the last vision layers): `e_attention.py`
- D-Attn (DINOv2-similarity attention, Crane+): `d_attention.py`
- learned and deep prompts, context conditioning: `prompt_learning.py`
- score-based pooling of the image feature: `score_pooling.py`
- training loss: `anomaly_losses.py`; bilinear position embeddings: `position_embeddings.py`
- few-shot: the reference memory (memory bank) of normal images, nearest-patch scoring and fusion:
  `reference_memory.py`
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModel, CLIPModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import (
    IMAGE_PROCESSOR_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    ModelOutput,
    cached_file,
)

from .anomaly_losses import crane_loss
from .checkpoint_validation import (
    check_checkpoint,
    check_finite,
    check_floating_point,
    check_loading_info,
    read_safetensors,
    resolve_safetensors_files,
    safetensors_header,
)
from .clip_layers import clip_block
from .configuration_crane import CraneConfig, _as_int, end_of_text_id
from .d_attention import dattn_features, dino_similarity_attention
from .e_attention import eattn_block
from .position_embeddings import resize_position_embeddings
from .prompt_learning import CranePromptLearner, encode_prompts
from .reference_memory import (
    FEATURE_FIELDS,
    MEMORY_FILE_NAME,
    ReferenceMemory,
    fuse,
    is_reference_memory_file,
    probe_pixel_values,
)
from .reproducibility import align_tensors, per_sample
from .score_pooling import mean_over_maps, score_based_pooling

PROMPT_PREFIX = "prompt_learner."
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
# Architecture fields that must agree between a config and the backbone loaded for it.
_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "vocab_size",
    "num_register_tokens",
    "projection_dim",
)


def _is_path_or_id(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _backbone_source(argument: Any, model: PreTrainedModel | None) -> str | None:
    """Where a backbone came from: the Hub id or absolute folder the user gave, else the model's own record."""
    if model is None:
        return None
    source = os.fspath(argument) if _is_path_or_id(argument) else getattr(model, "name_or_path", "") or ""
    if source and os.path.isdir(source):
        return os.path.abspath(source)
    return source or None


def _torch_dtype(name: str | None) -> torch.dtype | None:
    """ "float16" -> torch.float16; None -> None."""
    return None if name is None else getattr(torch, name)


def _requested_dtype(value: Any) -> torch.dtype | None:
    """The floating-point dtype a `dtype=` loading option asks for (a torch dtype or its name), or None ("auto",
    absent, or not a floating-point dtype: transformers then reports it)."""
    if isinstance(value, str) and value != "auto":
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def _autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """A region that runs in the tensors' own dtypes even inside `torch.autocast` (a no-op outside one)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _check_backbone_architecture(expected: PreTrainedConfig, actual: PreTrainedConfig, name: str) -> None:
    """Refuse a backbone whose architecture differs from the config's (compared field by field)."""
    pairs = [(expected, actual, "")]
    if hasattr(expected, "vision_config"):
        pairs = [
            (expected.vision_config, actual.vision_config, "vision_config."),
            (expected.text_config, actual.text_config, "text_config."),
            (expected, actual, ""),
        ]
    different = [
        f"{prefix}{field}: config {getattr(want, field)!r}, backbone {getattr(got, field, None)!r}"
        for want, got, prefix in pairs
        for field in _ARCHITECTURE_FIELDS
        if hasattr(want, field) and getattr(want, field) != getattr(got, field, None)
    ]
    if different:
        raise ValueError(f"The {name} backbone does not have the config's architecture: " + "; ".join(different) + ".")


def is_crane_config(config: Any) -> bool:
    """Whether `config` is a `CraneConfig`, from this module or from another copy of it.

    A folder loaded with `trust_remote_code=True` has its configuration module imported twice, under different
    module names (once by `AutoConfig`, once by the model module's relative import), so the config `AutoModel`
    hands over (with the user's overrides applied) is not an instance of the class this module imported. It is
    recognised by its class name, its `model_type` and the fields the model reads.
    """
    if isinstance(config, CraneConfig):
        return True
    return (
        isinstance(config, PreTrainedConfig)
        and type(config).__name__ == CraneConfig.__name__
        and getattr(config, "model_type", None) == CraneConfig.model_type
        and all(hasattr(config, name) for name in ("with_overrides", "map_slots", "prompt_token_ids"))
    )


@dataclass
class CraneAnomalyDetectionOutput(ModelOutput):
    """Outputs of [`CraneForAnomalyDetection`].

    Args:
        loss: training loss (spec section 6), when `labels` and `masks` are given.
        anomaly_scores: image anomaly scores in [0, 1], [B].
        anomaly_maps: pixel anomaly maps in [0, 1] at the input resolution, unsmoothed, [B, H, W].
        image_logits: image logits (normal, anomalous) at the inference temperature, [B, 2].
        patch_logits: per-map patch logits, a tuple of `config.num_maps` tensors [B, N, 2] (N = patch grid cells), per
            feature layer the D-Attn map then the E-Attn map; maps that are one computed map (`config.map_slots`,
            e.g. Crane's four E-Attn maps under `eattn_map_source="last_layer"`) are views of one tensor.
        image_embeds: normalized global CLIP image embeddings, [B, D].
        text_embeds: normalized text features of the normal and anomalous prompts, [2, D] (or [B, 2, D] when the
            prompts were conditioned on each image).
        focal_loss, dice_loss, image_loss: the loss components (unweighted; focal and dice summed over the maps).
        few_shot_scores / few_shot_maps: with a reference memory (few-shot), the image scores [B] and unsmoothed
            maps [B, H, W] of the nearest-patch branch alone (`reference_memory.py`), in [0, 1].
        fused_scores / fused_maps: with a reference memory, the zero-shot and few-shot scores [B] and maps
            [B, H, W] combined by `config.few_shot_fusion_weight`; `anomaly_scores` and `anomaly_maps` stay the
            zero-shot ones.
    """

    loss: torch.FloatTensor | None = None
    anomaly_scores: torch.FloatTensor | None = None
    anomaly_maps: torch.FloatTensor | None = None
    image_logits: torch.FloatTensor | None = None
    patch_logits: tuple[torch.FloatTensor, ...] | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    focal_loss: torch.FloatTensor | None = None
    dice_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    few_shot_scores: torch.FloatTensor | None = None
    few_shot_maps: torch.FloatTensor | None = None
    fused_scores: torch.FloatTensor | None = None
    fused_maps: torch.FloatTensor | None = None


class CranePreTrainedModel(PreTrainedModel):
    config_class = CraneConfig
    config: CraneConfig
    base_model_prefix = "crane"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["CLIPEncoderLayer", "Dinov2WithRegistersLayer", "Dinov2Layer"]

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, CranePromptLearner):
            for tensor in (module.ctx_normal, module.ctx_anomalous, module.deep_prompts):
                init.normal_(tensor, mean=0.0, std=0.02)
            ids, eot = module.token_id_tensors()
            init.copy_(module.prompt_token_ids, ids)
            init.copy_(module.eot_positions, eot)


class _EvalOnlyTrain:
    """`train` of a frozen backbone: whatever mode is asked for, the backbone and its submodules stay in eval mode."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, mode: bool = True) -> torch.nn.Module:
        return torch.nn.Module.train(self.module, False)


class CraneForAnomalyDetection(CranePreTrainedModel):
    """Crane (CLIP with E-Attn) or Crane+ (plus DINOv2 D-Attn) with learned prompts.

    Only the prompt tensors (`prompt_learner.*`) are trainable; the CLIP and DINOv2 backbones are frozen and stay
    in eval mode whatever `train()` is called with.
    """

    # `from_preset`'s loader, set by the crane_hf package (crane_hf/registration.py): this model folder ships as remote
    # code and imports nothing of crane_hf, whose bundled presets are not part of it.
    preset_loader: Callable[..., PreTrainedModel] | None = None

    def __init__(self, config: CraneConfig, **kwargs: Any):
        if kwargs:  # what `from_pretrained` left over: neither a config field nor a loading option
            raise TypeError(
                f"{type(self).__name__} got unknown keyword argument(s) {CraneConfig.name_unknown(kwargs)}: "
                "neither CraneConfig fields nor loading options of from_pretrained."
            )
        super().__init__(config)
        text_config = config.clip_config.text_config
        self.clip = CLIPModel(config.clip_config)
        self.dino = AutoModel.from_config(config.dino_config) if config.use_dattn else None
        self.prompt_learner = CranePromptLearner(
            prompt_token_ids=config.prompt_token_ids,
            eos_token_id=end_of_text_id(text_config),
            prompt_length=config.prompt_length,
            num_deep_prompts=config.num_deep_prompts,
            deep_prompt_length=config.deep_prompt_length,
            width=text_config.hidden_size,
        )
        self._position_cache: dict[tuple, torch.Tensor] = {}
        self._text_cache: tuple[tuple, torch.Tensor] | None = None
        # Few-shot: the memory bank used by `forward` when none is passed (`set_reference_memory`; saved beside the
        # weights by `save_pretrained`, loaded by `from_pretrained`).
        self.reference_memory: ReferenceMemory | None = None
        self.post_init()
        self._freeze_backbones()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbones(
        cls,
        clip: str | os.PathLike | CLIPModel,
        dino: str | os.PathLike | PreTrainedModel | None = None,
        config: CraneConfig | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        **config_overrides: Any,
    ) -> CraneForAnomalyDetection:
        """Crane (no `dino`) or Crane+ around pretrained backbones, with freshly initialized prompts.

        Args:
            clip: a `CLIPModel`, or a Hub id / local folder of one (e.g. "openai/clip-vit-large-patch14-336").
            dino: a `Dinov2WithRegistersModel` / `Dinov2Model`, or a Hub id / folder of one; enables D-Attn.
            config: a complete `CraneConfig` to use instead of the paper's setting (its backbone architectures must
                match the given backbones).
            backbone_kwargs: passed to the backbones' `from_pretrained` (e.g. `dtype`, `cache_dir`, `token`).
            **config_overrides: any `CraneConfig` field (e.g. `image_size=336`, `soft_mean=True`,
                `eattn_map_source="per_layer"`); an unknown name raises `TypeError` naming it.

        The paper's setting for the variant, computed as the published code computes it, is used unless overridden
        (`CraneConfig.for_variant`). The backbone
        weights are copied unchanged into the new model, and where they came from is recorded in the config
        (`clip_backbone`, `dino_backbone`) so that prompts-only checkpoints can find them again.
        """
        backbone_kwargs = backbone_kwargs or {}
        clip_model = CLIPModel.from_pretrained(clip, **backbone_kwargs) if _is_path_or_id(clip) else clip
        if not isinstance(clip_model, CLIPModel):
            raise TypeError(f"clip must be a CLIPModel or a path/Hub id of one, got {type(clip_model).__name__}.")
        dino_model = AutoModel.from_pretrained(dino, **backbone_kwargs) if _is_path_or_id(dino) else dino
        if dino_model is not None and dino_model.config.model_type not in ("dinov2_with_registers", "dinov2"):
            raise TypeError(
                f"dino must be a DINOv2 model (with or without registers), got model_type="
                f"{dino_model.config.model_type!r}."
            )
        sources = {
            "clip_backbone": config_overrides.pop("clip_backbone", None) or _backbone_source(clip, clip_model),
            "dino_backbone": config_overrides.pop("dino_backbone", None) or _backbone_source(dino, dino_model),
        }
        CraneConfig.check_field_names(config_overrides, f"{cls.__name__}.from_backbones")
        if config is None:
            config = CraneConfig.for_variant(
                "crane+" if dino_model is not None else "crane",
                clip_config=clip_model.config,
                dino_config=dino_model.config if dino_model is not None else None,
                **sources,
                **config_overrides,
            )
        else:
            config = copy.deepcopy(config)
            _check_backbone_architecture(config.clip_config, clip_model.config, "clip")
            if (dino_model is None) != (config.dino_config is None):
                raise ValueError(
                    f"The config is for {config.variant}, which {'needs' if dino is None else 'has no'} dino."
                )
            if dino_model is not None:
                _check_backbone_architecture(config.dino_config, dino_model.config, "dino")
            sources = {key: value or getattr(config, key) for key, value in sources.items()}
            config = config.with_overrides(**sources, **config_overrides, backbones_in_checkpoint=True)
        model = cls(config)
        model.clip.load_state_dict(clip_model.state_dict())
        if dino_model is not None:
            model.dino.load_state_dict(dino_model.state_dict())
        # One dtype for the whole model: the one asked for, else the CLIP's. (transformers may leave the CLIP's
        # sub-models in the dtype their own configs record when another one is asked for.)
        model.to(_requested_dtype(backbone_kwargs.get("dtype")) or clip_model.dtype)
        return model.eval()

    @classmethod
    def from_preset(cls, name: str = "crane+/mvtec", **kwargs: Any) -> CraneForAnomalyDetection:
        """The paper's model with its official prompts: "crane+/mvtec", "crane+/visa", "crane+/mvtec-epoch1",
        "crane/mvtec" or "crane/visa" (see `crane_hf.presets`).

        The backbones are loaded from the Hugging Face cache or the Hub, or from `clip=` / `dino=` (local folders
        or loaded models); other keyword arguments are `CraneConfig` overrides.

        Raises:
            ImportError: in this class as loaded from a model folder's remote code: the presets are part of the
                crane_hf package (which sets `preset_loader` when imported), not of the model folder.
        """
        if cls.preset_loader is None:
            raise ImportError(
                "from_preset needs the crane_hf package, which holds the presets: install crane_hf and use "
                "crane_hf.CraneForAnomalyDetection.from_preset (this class was loaded from a model folder's code)."
            )
        return cls.preset_loader(name, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, also for prompts-only checkpoints; backbones frozen after loading.

        A prompts-only folder (`save_pretrained(..., include_backbones=False)`) holds the config and the prompt
        tensors; its backbones are loaded from the config's `clip_backbone` / `dino_backbone` (Hub cache first).

        Keyword arguments that are `CraneConfig` fields override the saved config, as transformers does for every
        model (e.g. `from_pretrained(path, soft_mean=True, eattn_map_source="per_layer")`), for full and
        prompts-only folders, local or on the Hub; they are validated as a new config would be
        (`CraneConfig.with_overrides`). The other keyword arguments are loading options (`dtype`, `cache_dir`,
        `token`, ...); an unknown one raises `TypeError` naming it.
        """
        config = kwargs.pop("config", None)
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in CraneConfig.field_names()}
        if not is_crane_config(config):
            hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
            # An untrusted config.json: a refused value is named with the file and the field (CraneConfig).
            config = CraneConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        if overrides:
            config = config.with_overrides(**overrides)
        if config.backbones_in_checkpoint:
            loaded = cls._from_full_checkpoint(pretrained_model_name_or_path, config, *args, **kwargs)
        else:
            loaded = cls._from_prompts_checkpoint(pretrained_model_name_or_path, config, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        memory_file = cached_file(
            os.fspath(pretrained_model_name_or_path),
            MEMORY_FILE_NAME,
            _raise_exceptions_for_missing_entries=False,
            **hub_kwargs,
        )
        if memory_file is not None:  # the folder's few-shot memory bank, checked against this model
            model.set_reference_memory(ReferenceMemory.load(memory_file), source=memory_file)
        return loaded

    @staticmethod
    def _to_requested_dtype(model: CraneForAnomalyDetection, dtype: Any) -> None:
        """Cast every floating-point tensor to the `dtype` loading option, when one is given: transformers leaves
        the CLIP's text and vision sub-models in the dtype their own configs record (float32), which a forward in
        another dtype cannot mix."""
        requested = _requested_dtype(dtype)
        if requested is not None:
            model.to(requested)

    @classmethod
    def _from_full_checkpoint(cls, path: str | os.PathLike, config: CraneConfig, *args: Any, **kwargs: Any):
        """transformers' loading, from safetensors only, refusing any tensor that does not fit (named).

        The file headers are checked first (every tensor must be floating point); transformers then maps the
        checkpoint's names to the model's and reports missing, unexpected and mis-shaped tensors, which are refused
        instead of being left randomly initialized.
        """
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}

        def resolve(name: str) -> str | None:
            return cached_file(os.fspath(path), name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

        files = resolve_safetensors_files(resolve, os.fspath(path), SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
        check_floating_point(safetensors_header(files), f"The checkpoint {path}")
        wants_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("use_safetensors", True)
        kwargs.setdefault("ignore_mismatched_sizes", True)  # mismatches are refused below, with their names
        model, info = super().from_pretrained(path, *args, config=config, output_loading_info=True, **kwargs)
        check_loading_info(info, f"The checkpoint {path}")
        cls._to_requested_dtype(model, kwargs.get("dtype"))
        prompts = {name: t for name, t in model.state_dict().items() if name.startswith(PROMPT_PREFIX)}
        check_finite(prompts, f"The checkpoint {path}")
        align_tensors(model)  # the same bits as a model built in memory (reproducibility.py)
        model._freeze_backbones()
        return (model, info) if wants_info else model

    @classmethod
    def _from_prompts_checkpoint(cls, path: str | os.PathLike, config: CraneConfig, **kwargs: Any):
        # Options this path applies, and transformers' own markers and defaults that have nothing to apply here.
        applied = {*_HUB_KWARGS, "dtype"}
        unusable = [
            key
            for key, value in kwargs.items()
            if key not in applied
            and not key.startswith("_")
            and key not in ("trust_remote_code", "use_safetensors")
            and value is not None
        ]
        if unusable:
            raise TypeError(
                f"{path} is a prompts-only checkpoint, whose loading takes only {', '.join(sorted(applied))} (for the "
                f"backbones) and CraneConfig fields; got {CraneConfig.name_unknown(unusable)}."
            )
        needed = ["clip_backbone", "dino_backbone"] if config.use_dattn else ["clip_backbone"]
        unknown = [name for name in needed if not getattr(config, name)]
        if unknown:
            raise ValueError(
                f"{path} is a prompts-only checkpoint but its config does not say where the backbones come from "
                f"({', '.join(unknown)} missing)."
            )
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        weights = cached_file(os.fspath(path), SAFE_WEIGHTS_NAME, **hub_kwargs)
        backbone_kwargs = {
            key: kwargs[key] for key in ("cache_dir", "local_files_only", "token", "dtype") if key in kwargs
        }
        model = cls.from_backbones(
            config.clip_backbone,
            config.dino_backbone if config.use_dattn else None,
            config=config,
            backbone_kwargs=backbone_kwargs,
        )
        model.load_prompt_state(read_safetensors(weights), source=weights)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, include_backbones: bool = True, **kwargs):
        """`PreTrainedModel.save_pretrained`; with `include_backbones=False` only the prompt tensors are written.

        A prompts-only folder is a few hundred kilobytes and loads with `from_pretrained` by fetching the backbones
        named in its config (`clip_backbone`, `dino_backbone`).

        Every folder also carries what `pipeline("zero-shot-anomaly-detection", model=folder)` needs:
        `custom_pipelines` in config.json and, with the model code (`auto_map`), the pipeline code, so that it runs
        with `trust_remote_code=True` where crane_hf is not installed; and `preprocessor_config.json` matching the
        config (`CraneImageProcessor.from_crane_config`) unless the folder already has one.

        Raises:
            ValueError: prompts only, but the config does not say where the backbones come from.
        """
        self._save_reference_memory(save_directory)
        if include_backbones:
            self._save_pipeline_files(save_directory, kwargs.get("is_main_process", True))
            return super().save_pretrained(save_directory, *args, **kwargs)
        needed = ["clip_backbone", "dino_backbone"] if self.config.use_dattn else ["clip_backbone"]
        unknown = [name for name in needed if not getattr(self.config, name)]
        if unknown:
            raise ValueError(
                "Cannot save prompts only: the config does not say where the backbones come from "
                f"({', '.join(unknown)}). Build the model with from_backbones(<Hub id or folder>), set the config "
                "field, or save with include_backbones=True."
            )
        self._save_pipeline_files(save_directory, kwargs.get("is_main_process", True))
        state = {name: tensor for name, tensor in self.state_dict().items() if name.startswith(PROMPT_PREFIX)}
        previous = self.config.backbones_in_checkpoint
        self.config.backbones_in_checkpoint = False
        try:
            return super().save_pretrained(save_directory, *args, state_dict=state, **kwargs)
        finally:
            self.config.backbones_in_checkpoint = previous

    def _save_pipeline_files(self, save_directory: str | os.PathLike, is_main_process: bool) -> None:
        """`custom_pipelines` in the config; the pipeline code and a processor config in the folder (see
        `save_pretrained`). Written before the model, so that `save_pretrained(push_to_hub=True)` uploads them."""
        from .image_processing_crane import CraneImageProcessor
        from .pipeline_zero_shot_anomaly_detection import ZeroShotAnomalyDetectionPipeline, custom_pipelines

        self.config.custom_pipelines = custom_pipelines()
        if not is_main_process or os.path.isfile(save_directory):
            return  # transformers' save_pretrained reports a file in the folder's place
        os.makedirs(save_directory, exist_ok=True)
        if self._auto_class is not None:
            custom_object_save(ZeroShotAnomalyDetectionPipeline, save_directory)
        if not os.path.isfile(os.path.join(save_directory, IMAGE_PROCESSOR_NAME)):
            processor = CraneImageProcessor.from_crane_config(self.config)
            if self._auto_class is not None:  # the processor's code and auto_map, as the model's
                processor._auto_class = "AutoImageProcessor"
            processor.save_pretrained(save_directory)

    def _save_reference_memory(self, save_directory: str | os.PathLike) -> None:
        """Write the reference memory beside the weights; a memory file left there by an earlier save of a model
        with a memory is removed when this model has none (a file of another format is left alone)."""
        path = os.path.join(save_directory, MEMORY_FILE_NAME)
        if self.reference_memory is not None:
            os.makedirs(save_directory, exist_ok=True)
            self.reference_memory.save(path)
        elif is_reference_memory_file(path):
            os.remove(path)

    def load_prompt_state(self, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Load the prompt tensors (`prompt_learner.*`), refusing missing, unexpected or mis-shaped tensors."""
        expected = {name: tensor for name, tensor in self.state_dict().items() if name.startswith(PROMPT_PREFIX)}
        found = {name: (tuple(t.shape), _SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype))) for name, t in state.items()}
        check_checkpoint(found, expected, source)
        check_finite({name: state[name] for name in expected}, source)
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(state[name].to(tensor.dtype))
        self._text_cache = None

    def _freeze_backbones(self) -> None:
        for backbone in self.backbones():
            backbone.requires_grad_(False)
            backbone.eval()
            backbone.train = _EvalOnlyTrain(backbone)  # `model.clip.train()` keeps it in eval mode too

    def backbones(self) -> list[torch.nn.Module]:
        """The frozen pretrained towers: CLIP, and DINOv2 for Crane+."""
        return [self.clip] if self.dino is None else [self.clip, self.dino]

    def train(self, mode: bool = True) -> CraneForAnomalyDetection:
        """Train mode for the prompts only; the backbones stay in eval mode. Drops the text-feature cache."""
        super().train(mode)
        for backbone in self.backbones():
            backbone.eval()
        self._text_cache = None
        return self

    # ------------------------------------------------------------------ text side
    def _text_state_key(self, device: torch.device) -> tuple:
        tensors = [
            *self.prompt_learner.parameters(),
            *self.clip.text_model.parameters(),
            self.clip.text_projection.weight,
        ]
        # identity, in-place version and storage: `.data = ...` keeps the first two but changes the storage
        state = tuple((id(t), t._version, t.data_ptr()) for t in tensors)
        return (state, device, torch.is_inference_mode_enabled())

    def encode_text(self, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized prompt text features: [2, D], or [B, 2, D] conditioned on normalized image embeddings [B, D]."""
        embeddings, eot = self.prompt_learner.prompt_embeddings(
            self.clip.text_model.embeddings.token_embedding, image_embeds
        )
        return encode_prompts(
            self.clip.text_model,
            self.clip.text_projection,
            embeddings,
            eot,
            self.prompt_learner.deep_prompts,
            deep_prompt_rounding_dtype=_torch_dtype(self.config.deep_prompt_rounding_dtype),
            num_positions=self.prompt_learner.positions_used(conditioned=image_embeds is not None),
        )

    def static_text_embeds(self) -> torch.Tensor:
        """Text features of the static prompts [2, D]; computed once and cached in eval mode.

        Under `torch.compile` they are computed inside the graph instead (two short prompts, a few GFLOP): a Python
        cache keyed on tensor versions cannot be traced without graph breaks, and a graph that reads a cache
        without checking it would keep stale features after the prompts change.
        """
        if self.training:
            return self.encode_text()
        if torch.compiler.is_compiling():
            return self._encode_static_text()
        key = self._text_state_key(self.prompt_learner.ctx_normal.device)
        if self._text_cache is None or self._text_cache[0] != key:
            self._text_cache = (key, self._encode_static_text())
        return self._text_cache[1]

    def _encode_static_text(self) -> torch.Tensor:
        """`encode_text()` without autograd and outside autocast (full precision of the weights, at no cost)."""
        with torch.no_grad(), _autocast_disabled(self.prompt_learner.ctx_normal.device):
            return self.encode_text()

    # ------------------------------------------------------------------ vision side
    def _position_embeddings(self, grid: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        table = self.clip.vision_model.embeddings.position_embedding.weight
        if torch.compiler.is_compiling():  # traced: always current, and no cache to guard (see static_text_embeds)
            return resize_position_embeddings(table, grid).to(dtype)
        key = (grid, dtype, device, id(table), table._version, table.data_ptr(), torch.is_inference_mode_enabled())
        if key not in self._position_cache:
            with torch.no_grad():
                resized = resize_position_embeddings(table.detach(), grid)
            self._position_cache = {key: resized.to(device=device, dtype=dtype)}
        return self._position_cache[key]

    def _dino_patch_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """DINOv2 last-layer patch tokens [B, M, C] (class and register tokens dropped) and their grid."""
        config = self.config
        shape = (1, 3, 1, 1)
        clip_mean = pixel_values.new_tensor(config.clip_image_mean).view(shape)
        clip_std = pixel_values.new_tensor(config.clip_image_std).view(shape)
        dino_mean = pixel_values.new_tensor(config.dino_image_mean).view(shape)
        dino_std = pixel_values.new_tensor(config.dino_image_std).view(shape)
        raw = (pixel_values * clip_std + clip_mean).clamp(0.0, 1.0)
        dino_inputs = ((raw - dino_mean) / dino_std).to(self.dino.dtype)
        tokens = self.dino(pixel_values=dino_inputs).last_hidden_state
        registers = getattr(config.dino_config, "num_register_tokens", 0)
        patch = _as_int(config.dino_config.patch_size)
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        return tokens[:, 1 + registers :], grid

    def encode_image(
        self,
        pixel_values: torch.Tensor,
        return_dino_tokens: bool = False,
        dattn_weights: torch.Tensor | None = None,
    ) -> tuple:
        """Run the vision towers.

        With `return_dino_tokens`, a fourth value follows: the DINOv2 last-layer patch tokens [B, M, C_dino] on the
        maps' grid (Crane+), or `None` (Crane); the other values are the same.

        `dattn_weights` (Crane+ only): D-Attn weights [B, M, M] computed elsewhere from the DINOv2 patch tokens
        (`d_attention.dino_similarity_attention` or its float64 form); DINOv2 is then not run here (its tokens are
        returned as `None`). An exported OpenVINO graph takes them as an input (docs/export.md).

        Raises:
            ValueError: `dattn_weights` for a model without D-Attn, or not of shape [B, M, M].

        Returns:
            image_embeds: normalized global embeddings [B, D].
            patch_features: normalized dense features of the distinct maps [M', B, N, D]; `config.map_slots` says
                which of them each of the `config.num_maps` maps is. With `eattn_map_source="per_layer"` they are
                the maps in the order of `config.feature_layers` (for Crane+: the D-Attn map, then the E-Attn map of
                each layer). With "last_layer" (the published code) every E-Attn map is the final e stream, computed
                once and placed after the D-Attn maps: Crane gives one map, M' = 1.
            grid: the maps' patch grid (gh, gw).
        """
        config = self.config
        given_grid = None if dattn_weights is None else self._check_dattn_weights(dattn_weights, pixel_values)
        vision = self.clip.vision_model
        layers = vision.encoder.layers
        dtype = vision.embeddings.patch_embedding.weight.dtype
        patches = vision.embeddings.patch_embedding(pixel_values.to(dtype))
        grid = (patches.shape[-2], patches.shape[-1])
        patches = patches.flatten(2).transpose(1, 2)
        cls_token = vision.embeddings.class_embedding.to(dtype).expand(patches.shape[0], 1, -1)
        o = torch.cat([cls_token, patches], dim=1) + self._position_embeddings(grid, dtype, patches.device)
        o = vision.pre_layrnorm(o)

        use_dattn = config.use_dattn
        dino_tokens, map_grid = None, grid
        if given_grid is not None:
            map_grid = given_grid
        elif use_dattn:
            dino_tokens, map_grid = self._dino_patch_tokens(pixel_values)
        # dattn_weights [B, M, M]: given, or built at the first D-Attn layer and shared by the later ones
        eattn_maps = not use_dattn or config.both_eattn_dattn
        final_eattn_map = config.eattn_map_source == "last_layer"
        dattn_after_attention = config.dattn_input == "after_attention"
        first_eattn = len(layers) - config.eattn_layers
        wanted = set(config.feature_layers)
        # After the last layer only the class token of o is used (the global embedding; the maps come from e and
        # D-Attn), so an E-Attn last layer runs the o stream for that token alone; when D-Attn reads that layer's o
        # stream after its attention (dattn_input "after_attention"), the attention runs for every token and only
        # the MLP for the class token.
        trim_last = config.eattn_layers > 0
        keep_last_o_mid = use_dattn and dattn_after_attention and len(layers) in wanted
        maps: list[torch.Tensor] = []
        e = o
        for index, layer in enumerate(layers):
            layer_input = o
            values = None
            if index < first_eattn:
                o = clip_block(layer, o)
                e = o
                after_attention = layer_input  # an ordinary block adds nothing to its input in the published code
            else:
                last = trim_last and index == len(layers) - 1
                o, e, o_mid, values = eattn_block(layer, o, e, config.eattn_type, last, last and keep_last_o_mid)
                # The published code adds the attention output to the layer's input in place: in the first E-Attn
                # layer that input is also the e stream, so it becomes o_(l-1) + OutProj(a_self).
                after_attention = e if index == first_eattn else o_mid
            if index + 1 not in wanted:
                continue
            if use_dattn:
                if dattn_weights is None:
                    dattn_weights = dino_similarity_attention(dino_tokens, config.dattn_beta, config.dattn_gamma)
                if dattn_after_attention:
                    maps.append(dattn_features(layer, after_attention, dattn_weights, grid, map_grid))
                else:
                    maps.append(dattn_features(layer, layer_input, dattn_weights, grid, map_grid, values=values))
            if eattn_maps and not final_eattn_map:
                maps.append(self._regrid(e[:, 1:], grid, map_grid))
        if eattn_maps and final_eattn_map:
            # One map for every feature layer (the published code's views of one tensor, see CraneConfig)
            maps.append(self._regrid(e[:, 1:], grid, map_grid))
        dense = torch.stack(maps) if len(maps) > 1 else maps[0].unsqueeze(0)
        patch_features = F.normalize(self.clip.visual_projection(vision.post_layernorm(dense)), dim=-1)
        global_embeds = per_sample(lambda token: self.clip.visual_projection(vision.post_layernorm(token)), o[:, 0])
        image_embeds = F.normalize(global_embeds, dim=-1)
        if return_dino_tokens:
            return image_embeds, patch_features, map_grid, dino_tokens
        return image_embeds, patch_features, map_grid

    def _check_dattn_weights(self, weights: torch.Tensor, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The maps' grid (DINOv2's) for D-Attn weights given to `encode_image`, after checking them."""
        if not self.config.use_dattn:
            raise ValueError(f"dattn_weights were given, but this {self.config.variant} model has no D-Attn.")
        patch = _as_int(self.config.dino_config.patch_size)
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        cells = grid[0] * grid[1]
        expected = (pixel_values.shape[0], cells, cells)
        if not torch.compiler.is_exporting() and tuple(weights.shape) != expected:
            raise ValueError(
                f"dattn_weights must have shape {list(expected)} ([B, M, M], M = {cells} DINOv2 patches), got "
                f"{list(weights.shape)}."
            )
        return grid

    @staticmethod
    def _regrid(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
        """Bilinearly resize patch tokens [B, N, C] from `grid` to `target` (a no-op when equal)."""
        if grid == target:
            return tokens
        batch, _, channels = tokens.shape
        maps = tokens.transpose(1, 2).reshape(batch, channels, *grid)
        maps = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
        return maps.flatten(2).transpose(1, 2)

    # ------------------------------------------------------------------ few-shot: the reference memory
    def memory_features(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The features a reference memory keeps, for images [B, 3, H, W]: source name -> L2-normalized float32
        [B, N, C] on the maps' grid: "clip_0", "clip_1", ... (the distinct dense CLIP maps of `encode_image`) and,
        for Crane+, "dino" (the DINOv2 patch tokens)."""
        self._check_inputs(pixel_values)
        _, patch_features, _, dino_tokens = self.encode_image(pixel_values, return_dino_tokens=True)
        return self._memory_sources(patch_features, dino_tokens)

    @staticmethod
    def _memory_sources(patch_features: torch.Tensor, dino_tokens: torch.Tensor | None) -> dict[str, torch.Tensor]:
        sources = {f"clip_{index}": features.float() for index, features in enumerate(patch_features)}
        if dino_tokens is not None:
            sources["dino"] = F.normalize(dino_tokens.float(), dim=-1)
        return sources

    def feature_settings(self) -> dict[str, Any]:
        """The config values that decide the features of a reference memory (`reference_memory.FEATURE_FIELDS`),
        and the backbones' names (informative)."""
        settings = {name: getattr(self.config, name) for name in FEATURE_FIELDS}
        settings.update(clip_backbone=self.config.clip_backbone, dino_backbone=self.config.dino_backbone)
        return settings

    def probe_features(self) -> dict[str, torch.Tensor]:
        """`memory_features` of the fixed probe image (`reference_memory.probe_pixel_values`), one image: [N, C]."""
        probe = probe_pixel_values(self.config.image_size).to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            return {name: features[0].cpu() for name, features in self.memory_features(probe).items()}

    def build_reference_memory(
        self,
        pixel_values: torch.Tensor | Any,
        fingerprints: list[str],
        class_name: str | None = None,
    ) -> ReferenceMemory:
        """The memory bank of k normal images.

        Args:
            pixel_values: the processed images [k, 3, S, S] (`CraneImageProcessor`), or an iterable of such batches
                (so that k images need not be held at once).
            fingerprints: one per image (`reference_memory.file_fingerprint` / `array_fingerprint`).
            class_name: the class the images show (stored with the memory).

        Returns:
            a `ReferenceMemory` with float32 features on the CPU: per source [k * N, C].

        Raises:
            ValueError: no images, a fingerprint count that differs from the images, images of different sizes.
        """
        batches = [pixel_values] if isinstance(pixel_values, torch.Tensor) else pixel_values
        collected: dict[str, list[torch.Tensor]] = {}
        grid: tuple[int, int] | None = None
        count = 0
        with torch.inference_mode():
            for batch in batches:
                batch = batch.to(device=self.device, dtype=self.dtype)
                sources = self.memory_features(batch)
                image_grid = self._feature_grid(batch.shape[-2:])
                if grid is not None and image_grid != grid:
                    raise ValueError(f"reference images give patch grids {list(grid)} and {list(image_grid)}.")
                grid = image_grid
                count += batch.shape[0]
                for name, features in sources.items():
                    collected.setdefault(name, []).append(features.reshape(-1, features.shape[-1]).cpu())
        if count == 0 or grid is None:
            raise ValueError("a reference memory needs at least one normal image.")
        if len(fingerprints) != count:
            raise ValueError(f"{len(fingerprints)} fingerprints were given for {count} reference images.")
        features = {name: torch.cat(parts) for name, parts in collected.items()}
        return ReferenceMemory(
            features=features,
            grid=grid,
            fingerprints=[str(item) for item in fingerprints],
            class_name=class_name,
            settings=self.feature_settings(),
            probe=self.probe_features(),
        )

    def _feature_grid(self, size: tuple[int, int] | torch.Size) -> tuple[int, int]:
        """The maps' patch grid for an input of `size` (H, W): the DINOv2 grid for Crane+, else CLIP's."""
        config = self.config
        patch = _as_int(
            config.dino_config.patch_size if config.use_dattn else config.clip_config.vision_config.patch_size
        )
        return (int(size[0]) // patch, int(size[1]) // patch)

    def check_reference_memory(self, memory: ReferenceMemory, source: str = "the reference memory") -> None:
        """Refuse a memory built for another model: other feature settings or sizes, or (by the probe image's
        features) other backbone weights. Raises `ValueError` naming `source` and the difference."""
        memory.check_consistent(source)
        memory.check_matches(self.feature_settings(), self.probe_features(), source)

    def set_reference_memory(self, memory: ReferenceMemory | None, source: str = "the reference memory") -> None:
        """Use `memory` in every `forward` without an explicit one (and save it with `save_pretrained`); `None`
        returns to zero-shot. The memory is checked first (`check_reference_memory`)."""
        if memory is not None:
            self.check_reference_memory(memory, source)
        self.reference_memory = memory

    def _few_shot(
        self,
        memory: ReferenceMemory,
        patch_features: torch.Tensor,
        dino_tokens: torch.Tensor | None,
        grid: tuple[int, int],
        size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Few-shot scores [B] and unsmoothed maps [B, H, W] from the test features and `memory`."""
        sources = self._memory_sources(patch_features, dino_tokens)
        sizes = {name: int(features.shape[-1]) for name, features in sources.items()}
        stored = {name: int(features.shape[-1]) for name, features in memory.features.items()}
        if sizes != stored or tuple(memory.grid) != tuple(grid):
            raise ValueError(
                f"the reference memory holds features {stored} on a {list(memory.grid)} grid; this model computes "
                f"{sizes} on {list(grid)} for these images (build the memory with this model and image size)."
            )
        memory.to(patch_features.device)
        with _autocast_disabled(patch_features.device):
            patch_map = memory.few_shot_patch_map(sources, self.config.few_shot_features)
            scores = patch_map.amax(dim=1)
            maps = F.interpolate(patch_map.reshape(-1, 1, *grid), size=size, mode="bilinear", align_corners=False)
        return scores, maps[:, 0]

    # ------------------------------------------------------------------ heads
    def _logits(self, features: torch.Tensor, text_embeds: torch.Tensor, temperature: float) -> torch.Tensor:
        """(features . t) / temperature for features [..., B, N, D] or [B, D] and text [2, D] or [B, 2, D]."""
        text = text_embeds.to(features.dtype)
        if text.dim() == 2 and features.dim() == 2:  # one row per image: image by image (reproducibility.py)
            return per_sample(lambda rows: rows @ text.T, features) / temperature
        if text.dim() == 2:
            return (features @ text.T) / temperature
        if features.dim() == 2:
            return torch.einsum("bd,bcd->bc", features, text) / temperature
        return torch.einsum("...bnd,bcd->...bnc", features, text) / temperature

    def _anomaly_maps(
        self,
        patch_logits: torch.Tensor,
        grid: tuple[int, int],
        size: tuple[int, int],
        map_counts: list[int] | None = None,
    ) -> torch.Tensor:
        """Anomaly maps [B, H, W] from patch logits [M', B, N, 2] (spec section 5, bilinear upsampling).

        `map_counts`: how many of the configured maps each distinct map stands for (the mean over maps counts it
        that often; default once each). Upsampling and averaging are linear, so they are done in the cheaper order:
        soft_mean averages the anomalous probabilities at patch level and upsamples once; otherwise
        softmax(mean of logits)[1] is sigmoid of the upsampled mean logit difference.
        """
        if self.config.soft_mean:
            patch_map = mean_over_maps(patch_logits.float().softmax(dim=-1)[..., 1], map_counts)
        else:
            mean_logits = mean_over_maps(patch_logits.float(), map_counts)
            patch_map = mean_logits[..., 1] - mean_logits[..., 0]
        patch_map = patch_map.reshape(-1, 1, *grid)
        upsampled = F.interpolate(patch_map, size=size, mode="bilinear", align_corners=False)[:, 0]
        return upsampled if self.config.soft_mean else torch.sigmoid(upsampled)

    def _check_inputs(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have shape [batch, 3, height, width], got {list(pixel_values.shape)}; "
                "use CraneImageProcessor to prepare images."
            )
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}.")
        patches = [_as_int(self.config.clip_config.vision_config.patch_size)]
        if self.config.use_dattn:
            patches.append(_as_int(self.config.dino_config.patch_size))
        height, width = pixel_values.shape[-2:]
        for patch in patches:
            if height % patch or width % patch or height == 0 or width == 0:
                raise ValueError(
                    f"pixel_values height and width ({height} x {width}) must be positive multiples of the patch "
                    f"size {patch}."
                )
        message = "pixel_values contains NaN or infinite values."
        if not torch.compiler.is_compiling():
            if not torch.isfinite(pixel_values).all():
                raise ValueError(message)
        elif pixel_values.device.type == "cpu":
            # A data-dependent `if` would break the compiled graph; the assert stays inside it (RuntimeError). On
            # CUDA a failing device-side assert would poison the context, so compiled CUDA graphs skip the scan.
            torch._assert_async(torch.isfinite(pixel_values).all(), message)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        return_dict: bool | None = None,
        reference_memory: ReferenceMemory | None = None,
        **kwargs: Any,
    ) -> CraneAnomalyDetectionOutput | tuple:
        r"""Score images and map their anomalies.

        Args:
            pixel_values: normalized images [B, 3, H, W] (`CraneImageProcessor`), H and W multiples of the patch size.
            labels: image labels [B] (0 normal, 1 anomalous); with `masks`, the loss is computed.
            masks: binary ground-truth masks [B, H, W] (or [B, 1, H, W]).
            reference_memory: a few-shot memory bank (`build_reference_memory`); default `self.reference_memory`.
                With one, the outputs also hold the few-shot and fused scores and maps; the zero-shot outputs are
                the same as without it.
        """
        self._check_inputs(pixel_values)
        memory = reference_memory if reference_memory is not None else self.reference_memory
        size = tuple(pixel_values.shape[-2:])
        if memory is None:  # zero-shot: exactly the computation of a model that knows no memory
            image_embeds, patch_features, grid = self.encode_image(pixel_values)
            output = self.forward_from_features(image_embeds, patch_features, grid, size, labels=labels, masks=masks)
        else:
            image_embeds, patch_features, grid, dino_tokens = self.encode_image(pixel_values, return_dino_tokens=True)
            output = self.forward_from_features(image_embeds, patch_features, grid, size, labels=labels, masks=masks)
            scores, maps = self._few_shot(memory, patch_features, dino_tokens, grid, size)
            weight = self.config.few_shot_fusion_weight
            output["few_shot_scores"], output["few_shot_maps"] = scores, maps
            output["fused_scores"] = fuse(output.anomaly_scores.float(), scores, weight)
            output["fused_maps"] = fuse(output.anomaly_maps.float(), maps, weight)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def forward_from_features(
        self,
        image_embeds: torch.Tensor,
        patch_features: torch.Tensor,
        grid: tuple[int, int],
        image_size: tuple[int, int],
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> CraneAnomalyDetectionOutput:
        """Everything after the frozen backbones: prompts, logits, maps, score-based pooling and the loss.

        `forward` is `encode_image` followed by this; training with cached backbone outputs calls it directly.

        Args:
            image_embeds: normalized global embeddings [B, D] (`encode_image`).
            patch_features: normalized dense features of the distinct maps [M', B, N, D] (`encode_image`); each
                counts as often as `config.map_slots` names it, in the map and score averages and in the loss (so
                that one computed map standing for four feature layers trains as four identical maps do).
            grid: the patch grid (gh, gw) of the maps, gh * gw = N.
            image_size: (H, W) of the maps to return (the input size).
            labels, masks: as for `forward`.
            text_embeds: normalized text features [2, D] to use instead of the model's own (an exported graph
                holds them as constants, `crane_hf.export`); `None` computes or reads the cached ones.

        Raises:
            ValueError: `patch_features` does not hold the config's distinct maps, or labels without masks.
        """
        if (labels is None) != (masks is None):
            missing = "masks" if masks is None else "labels"
            raise ValueError(f"The loss needs both labels and masks; {missing} is missing.")
        slots = self.config.map_slots
        map_counts = [slots.count(index) for index in range(max(slots) + 1)]
        if patch_features.dim() != 4 or patch_features.shape[0] != len(map_counts):
            raise ValueError(
                f"patch_features must hold the {len(map_counts)} distinct map(s) this config computes "
                f"([{len(map_counts)}, B, N, D], as encode_image returns them), got {list(patch_features.shape)}."
            )
        size = (int(image_size[0]), int(image_size[1]))
        prob = self.config.context_conditioning_prob
        conditioned = self.training and prob > 0 and (prob >= 1.0 or torch.rand(()).item() < prob)
        if text_embeds is None:
            text_embeds = self.encode_text(image_embeds) if conditioned else self.static_text_embeds()

        # The heads are cheap: they run in float32 whatever precision (or autocast) the backbones ran in.
        with _autocast_disabled(patch_features.device):
            features, global_embeds = patch_features.float(), image_embeds.float()
            patch_logits = self._logits(features, text_embeds, self.config.logit_temperature)
            anomaly_maps = self._anomaly_maps(patch_logits, grid, size, map_counts)
            if self.config.use_score_based_pooling:
                image_features = score_based_pooling(
                    features, patch_logits, global_embeds, self.config.pooling_alpha, map_counts
                )
            else:
                image_features = global_embeds
            image_logits = self._logits(image_features, text_embeds, self.config.logit_temperature)
            anomaly_scores = image_logits.softmax(dim=-1)[:, 1]

            losses: dict[str, torch.Tensor] = {}
            if labels is not None:
                masks = self._check_masks(masks, image_embeds.shape[0], size)
                losses = crane_loss(
                    list(patch_logits),
                    grid,
                    masks.to(device=patch_logits.device, dtype=torch.float32),
                    self._logits(image_features, text_embeds, self.config.image_loss_temperature),
                    labels.to(patch_logits.device),
                    focal_weight=self.config.focal_loss_weight,
                    dice_weight=self.config.dice_loss_weight,
                    image_weight=self.config.image_loss_weight,
                    map_counts=map_counts,
                )
        return CraneAnomalyDetectionOutput(
            loss=losses.get("loss"),
            anomaly_scores=anomaly_scores,
            anomaly_maps=anomaly_maps,
            image_logits=image_logits,
            patch_logits=tuple(patch_logits[slot] for slot in slots),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            focal_loss=losses.get("focal_loss"),
            dice_loss=losses.get("dice_loss"),
            image_loss=losses.get("image_loss"),
        )

    @staticmethod
    def _check_masks(masks: torch.Tensor, batch: int, size: tuple[int, int]) -> torch.Tensor:
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.dim() != 3 or masks.shape[0] != batch or tuple(masks.shape[-2:]) != size:
            raise ValueError(
                f"masks must have shape [{batch}, {size[0]}, {size[1]}] to match pixel_values, "
                f"got {list(masks.shape)}."
            )
        if not ((masks == 0) | (masks == 1)).all():
            raise ValueError("masks must be binary (0 normal, 1 anomalous); use CraneImageProcessor to prepare them.")
        return masks


__all__ = ["CraneAnomalyDetectionOutput", "CraneForAnomalyDetection", "CranePreTrainedModel"]
