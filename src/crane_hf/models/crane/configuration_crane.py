"""CraneConfig: the CLIP backbone, the optional DINOv2 backbone (Crane+) and every Crane hyperparameter.

Defaults are the paper's Crane setting on CLIP ViT-L/14@336 (``crane-method.md`` sections 2-8), computed as the
published code computes it (section 3, (a)-(c): `PUBLISHED_COMPUTATION`); ``for_variant`` builds the published
Crane and Crane+ settings around any pair of backbone configs.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import numbers
import os
from collections.abc import Iterator
from typing import Any

from transformers import AutoConfig, CLIPConfig, PreTrainedConfig

from .gaussian_smoothing import MAX_SMOOTHING_SIGMA
from .json_reading import DuplicateJSONKeyError, load_json_without_duplicates
from .reference_memory import FEW_SHOT_FEATURES
from .thresholds import THRESHOLD_FIELDS, check_threshold

# OpenAI's CLIP configs on the Hub predate transformers' fix of CLIP's special ids and say eos_token_id 2 (bos 0,
# pad 1); transformers' CLIPTextTransformer keeps a special case for them. The real <|endoftext|> is the last id.
LEGACY_CLIP_EOS_TOKEN_ID = 2


def end_of_text_id(text_config: Any) -> int:
    """The id of CLIP's end-of-text token for a CLIP text config.

    `text_config.eos_token_id`, except in the original OpenAI configs (eos_token_id 2): there, as transformers reads
    them (end of text = the largest id of the sequence), it is the last id of the vocabulary, 49407 in OpenAI's.
    """
    if text_config.eos_token_id == LEGACY_CLIP_EOS_TOKEN_ID:
        return int(text_config.vocab_size) - 1
    return int(text_config.eos_token_id)


EATTN_TYPES = ("qq+kk+vv", "qq+kk", "qq", "kk", "vv", "(q+k+v)^2")
VARIANTS = ("crane", "crane+")
EATTN_MAP_SOURCES = ("last_layer", "per_layer")
DATTN_INPUTS = ("after_attention", "layer_input")
DEEP_PROMPT_ROUNDING_DTYPES = ("float16", "bfloat16", None)

# The three behaviours of the published code that the official prompts were trained with (crane-method.md
# section 3, (a)-(c); docs/parity.md), and the per-layer reading of the specification's text.
PUBLISHED_COMPUTATION: dict[str, Any] = {
    "eattn_map_source": "last_layer",
    "dattn_input": "after_attention",
    "deep_prompt_rounding_dtype": "float16",
}
PER_LAYER_COMPUTATION: dict[str, Any] = {
    "eattn_map_source": "per_layer",
    "dattn_input": "layer_input",
    "deep_prompt_rounding_dtype": None,
}
# The switch these fields replace; configs saved with it still load (True: published, False: per-layer).
LEGACY_COMPUTATION_SWITCH = "official_code_compat"
COMPUTATION_CHOICES: dict[str, tuple] = {
    "eattn_map_source": EATTN_MAP_SOURCES,
    "dattn_input": DATTN_INPUTS,
    "deep_prompt_rounding_dtype": DEEP_PROMPT_ROUNDING_DTYPES,
}


class _NotGiven:
    """The default of the three computation fields and of the old switch: "not given" (the computation fields then
    take the published code's values), so that a value given explicitly, even the default one, can be told apart
    from one left out (an old switch contradicting an explicitly given field is refused)."""

    def __repr__(self) -> str:
        return "<not given: the published code's value>"

    def __copy__(self) -> _NotGiven:
        return self

    def __deepcopy__(self, memo: dict) -> _NotGiven:
        return self


NOT_GIVEN: Any = _NotGiven()

# The fields that decide the scores and maps a model gives at inference (training-only fields, the thresholds
# themselves and where the backbones are read from excluded; the backbones' architectures cannot change at loading).
# Calibrated thresholds hold for these values only: `threshold_computation` records them beside the thresholds.
INFERENCE_FIELDS = (
    "image_size",
    "prompt_length",
    "normal_prompt_words",
    "anomalous_prompt_words",
    "num_deep_prompts",
    "deep_prompt_length",
    "eattn_layers",
    "eattn_type",
    "feature_layers",
    "dattn_beta",
    "dattn_gamma",
    "both_eattn_dattn",
    "use_score_based_pooling",
    "pooling_alpha",
    "logit_temperature",
    "soft_mean",
    "smoothing_sigma",
    "clip_image_mean",
    "clip_image_std",
    "dino_image_mean",
    "dino_image_std",
    "eattn_map_source",
    "dattn_input",
    "deep_prompt_rounding_dtype",
    "few_shot_fusion_weight",
    "few_shot_features",
)
# The key of `threshold_computation` (no config field) naming the reference memory the calibrated scores were fused
# with (`ReferenceMemory.identity`; None or absent: zero-shot scores). Thresholds hold for that memory only.
FEW_SHOT_MEMORY = "few_shot_memory"
# The key of `threshold_computation` (no config field) naming the dtype the model ran in when the thresholds were
# calibrated ("float32", "bfloat16", "float16"; absent in older records: "float32"). Reduced precision moves scores
# by more than the distance between neighbouring calibrated scores, so thresholds hold for their dtype only.
THRESHOLD_DTYPE = "dtype"
# Fields that decide nothing without a reference memory: left out of the check for zero-shot thresholds and calls.
FEW_SHOT_FIELDS = ("few_shot_fusion_weight", "few_shot_features")
# Fields that change the maps only: the image score (and so the image threshold) does not depend on them.
MAP_ONLY_FIELDS = ("smoothing_sigma",)
# `prompt_token_ids` is derived from these (with the text tower's context length): recomputed when they change.
PROMPT_TEXT_FIELDS = ("prompt_length", "normal_prompt_words", "anomalous_prompt_words")
DEFAULT_THRESHOLD = 0.5  # "anomalous is the more probable class": holds whatever the computation

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Architecture of openai/clip-vit-large-patch14-336, the paper's CLIP backbone.
CLIP_VIT_L14_336 = {
    "projection_dim": 768,
    "text_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
    },
}

# Architecture of facebook/dinov2-with-registers-base, the paper's D-Attn backbone (Crane+).
DINOV2_REG_B14 = {
    "model_type": "dinov2_with_registers",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "image_size": 518,
    "patch_size": 14,
    "num_register_tokens": 4,
    "layerscale_value": 1.0,
    "qkv_bias": True,
}

# Published settings (spec section 8). Backbone configs are added by `for_variant`.
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "crane": {"feature_layers": [6, 12, 18, 24], "soft_mean": True},
    "crane+": {"feature_layers": [24], "soft_mean": False},
}


def _as_config(
    config: PreTrainedConfig | dict | None, default_model_type: str | None = None
) -> PreTrainedConfig | None:
    if config is None or isinstance(config, PreTrainedConfig):
        return config
    if not isinstance(config, dict):
        raise TypeError(f"Expected a config object or a dict, got {type(config).__name__}.")
    config = dict(config)
    model_type = config.pop("model_type", default_model_type)
    if model_type is None:
        raise ValueError("dino_config needs a `model_type` ('dinov2_with_registers' or 'dinov2').")
    return AutoConfig.for_model(model_type, **config)


class CraneConfig(PreTrainedConfig):
    r"""Configuration of [`CraneForAnomalyDetection`].

    Args:
        clip_config (`CLIPConfig` or `dict`, *optional*): the CLIP backbone; defaults to ViT-L/14@336's architecture.
        dino_config (`Dinov2WithRegistersConfig`, `Dinov2Config` or `dict`, *optional*): the DINOv2 backbone. When
            given, D-Attn is used (Crane+); when `None`, the model is Crane.
        image_size (`int`): input side S; a multiple of both patch sizes. Paper: 518.
        prompt_length (`int`): learned context tokens per prompt ("X" placeholders). Paper: 12.
        normal_prompt_words / anomalous_prompt_words (`str`): the words after the placeholders.
        num_deep_prompts (`int`): learned deep prompts P_1..P_n inserted before text layers 2..n+1. Paper: 8.
        deep_prompt_length (`int`): tokens per deep prompt (hidden positions 1..n). Paper: 4.
        eattn_layers (`int`): number of last vision layers that run the E-Attn stream. Paper: 19.
        eattn_type (`str`): E-Attn self-correlation; one of "qq+kk+vv" (paper), "qq+kk", "qq", "kk", "vv", "(q+k+v)^2".
        feature_layers (`list[int]`): 1-indexed vision layers whose dense features make the maps.
        dattn_beta / dattn_gamma (`float`): D-Attn threshold and sharpness. Paper: 1.2 and 3.
        both_eattn_dattn (`bool`): with D-Attn, also use the E-Attn map of each feature layer. Paper: True.
        use_score_based_pooling (`bool`) and pooling_alpha (`float`): score-based pooling of patch features into the
            image feature, mixed with the global embedding as alpha * pooled + (1 - alpha) * global. Paper: 0.5.
        logit_temperature (`float`): tau of the patch and image logits. Paper: 0.07.
        image_loss_temperature (`float`): tau of the image logits in the training CE. Paper: 0.01.
        soft_mean (`bool`): average softmaxed maps (True) or softmax the averaged logits (False).
        smoothing_sigma (`float`): Gaussian sigma for smoothed maps (evaluation, display). Paper: 4.
        context_conditioning_prob (`float`): probability, in training, of inserting the image embedding into the
            prompts. Paper: 1.0.
        focal_loss_weight / dice_loss_weight / image_loss_weight (`float`): loss weights. Paper: 2, 2, 0.2.
        clip_image_mean / clip_image_std, dino_image_mean / dino_image_std: normalizations of the two backbones.
        image_threshold (`float`): default decision threshold on the image score.
        pixel_threshold (`float`): default decision threshold on the smoothed anomaly map.
        eattn_map_source (`str`): which e stream the E-Attn map of each feature layer is read from.
            "last_layer" (default, the published code): every E-Attn map is the e stream after the LAST vision layer.
            The published code collects views of one tensor that later layers update in place, so the maps of
            layers 6, 12 and 18 never reach its output: Crane's four maps are one map counted four times, and the
            official prompts and the paper's numbers come from that computation. The map is computed once and
            counted once per feature layer (in the map and score averages and in the training loss).
            "per_layer": the e stream after each feature layer (the per-layer reading of crane-method.md
            section 3); a variant to train prompts for, not what the official prompts were trained with.
        dattn_input (`str`): the point of the o stream that D-Attn (Crane+) takes LN1 and the value projection of.
            "after_attention" (default, the published code, which adds the layer's attention output to its input
            in place before D-Attn reads it): o_(l-1) + OutProj(a_orig), and for the first E-Attn layer
            o_(l-1) + OutProj(a_self). "layer_input": o_(l-1), the o stream entering the layer (per-layer variant).
            A feature layer before the E-Attn layers reads o_(l-1) either way, as the published code does.
        deep_prompt_rounding_dtype (`str` or `None`): dtype the deep prompts are rounded through before they
            enter the text layers. "float16" (default, the published code casts them with `.half()`: a relative
            rounding of up to 5e-4; gradients flow through the rounding as they do there); "bfloat16"; `None`: no
            rounding (per-layer variant).
            The three fields default to the published code's values when not given. The D-Attn field has no effect
            on Crane (no DINOv2), nor the rounding without deep prompts (`not_applicable_fields`): they are then
            left out of `computes_published_code` and of what the thresholds are checked against.
        official_code_compat (`bool`, *optional*): the single switch these three fields replace, accepted so that
            configs saved with it load as they computed: True means the published values above, False means
            "per_layer", "layer_input" and `None`. It is not saved. Any of the three fields given with it (in
            `CraneConfig(...)`, in config.json or as a `from_pretrained` keyword, whatever its value) must be the
            value the switch implies, else `ValueError` names both (`resolve_computation`).
        few_shot_fusion_weight (`float`): weight w of the few-shot branch when a reference memory (few-shot) is used:
            fused map = (1 - w) * zero-shot map + w * few-shot map, and the same for the image scores. Default 0.5,
            the average of the two as WinCLIP+ (Jeong et al., CVPR 2023) combines them; 1: few-shot alone
            (`reference_memory.py`). Without a reference memory it has no effect.
        few_shot_features (`str`): which memory features the few-shot map compares: "all" (default: every distinct
            dense CLIP map and, for Crane+, the DINOv2 patch tokens, averaged), "clip" or "dino" (Crane+ only; the
            AnomalyDINO setting).
        clip_backbone / dino_backbone (`str`, *optional*): where the backbone weights come from (Hub id or local
            folder); recorded by `from_backbones`, needed to load a prompts-only checkpoint.
        backbones_in_checkpoint (`bool`): whether the saved weights include the backbones (False for a
            prompts-only checkpoint, whose backbones are loaded from `clip_backbone` / `dino_backbone`).
        prompt_token_ids (`list[list[int]]`, *optional*): ids of the two prompt texts; computed from the bundled CLIP
            tokenizer when omitted, and recomputed when the prompt words or length change (`with_overrides`, or
            setting `config.normal_prompt_words`).
        threshold_computation (`dict`, *optional*): the computation `image_threshold` and `pixel_threshold` were
            calibrated with: the values of `INFERENCE_FIELDS` (`crane-hf calibrate` writes it). Thresholds hold for
            that computation only: when the config selects another one (an override at loading, for example),
            `check_thresholds` refuses them and the pipeline and `crane-hf predict` make no decision without
            thresholds given explicitly. When omitted: the config's own computation if its thresholds are not the
            defaults (configs saved before the record existed), else `None` (the default 0.5, the more probable
            class, holds under any computation).
    """

    model_type = "crane"
    sub_configs = {"clip_config": CLIPConfig, "dino_config": AutoConfig}

    def __init__(
        self,
        clip_config: CLIPConfig | dict | None = None,
        dino_config: PreTrainedConfig | dict | None = None,
        image_size: int = 518,
        prompt_length: int = 12,
        normal_prompt_words: str = "object.",
        anomalous_prompt_words: str = "damaged object.",
        num_deep_prompts: int = 8,
        deep_prompt_length: int = 4,
        eattn_layers: int = 19,
        eattn_type: str = "qq+kk+vv",
        feature_layers: list[int] | tuple[int, ...] = (6, 12, 18, 24),
        dattn_beta: float = 1.2,
        dattn_gamma: float = 3.0,
        both_eattn_dattn: bool = True,
        use_score_based_pooling: bool = True,
        pooling_alpha: float = 0.5,
        logit_temperature: float = 0.07,
        image_loss_temperature: float = 0.01,
        soft_mean: bool = True,
        smoothing_sigma: float = 4.0,
        context_conditioning_prob: float = 1.0,
        focal_loss_weight: float = 2.0,
        dice_loss_weight: float = 2.0,
        image_loss_weight: float = 0.2,
        clip_image_mean: list[float] | tuple[float, ...] = OPENAI_CLIP_MEAN,
        clip_image_std: list[float] | tuple[float, ...] = OPENAI_CLIP_STD,
        dino_image_mean: list[float] | tuple[float, ...] = IMAGENET_MEAN,
        dino_image_std: list[float] | tuple[float, ...] = IMAGENET_STD,
        image_threshold: float = DEFAULT_THRESHOLD,
        pixel_threshold: float = DEFAULT_THRESHOLD,
        eattn_map_source: str = NOT_GIVEN,
        dattn_input: str = NOT_GIVEN,
        deep_prompt_rounding_dtype: str | None = NOT_GIVEN,
        few_shot_fusion_weight: float = 0.5,
        few_shot_features: str = "all",
        clip_backbone: str | None = None,
        dino_backbone: str | None = None,
        backbones_in_checkpoint: bool = True,
        prompt_token_ids: list[list[int]] | None = None,
        threshold_computation: dict[str, Any] | None = None,
        **kwargs,
    ):
        if clip_config is None:
            clip_config = copy.deepcopy(CLIP_VIT_L14_336)
        if isinstance(clip_config, dict):
            _check_size_fields("clip_config", clip_config)
            with _field_errors("clip_config"):
                clip_config = CLIPConfig(**{k: v for k, v in clip_config.items() if k != "model_type"})
        if not isinstance(clip_config, CLIPConfig):
            raise TypeError(f"clip_config must be a CLIPConfig or a dict, got {type(clip_config).__name__}.")
        self.clip_config = clip_config
        if isinstance(dino_config, dict):
            _check_size_fields("dino_config", dino_config)
        with _field_errors("dino_config"):
            self.dino_config = _as_config(dino_config)

        self.image_size = _integer("image_size", image_size)
        self.prompt_length = _integer("prompt_length", prompt_length)
        self.normal_prompt_words = normal_prompt_words
        self.anomalous_prompt_words = anomalous_prompt_words
        self.num_deep_prompts = _integer("num_deep_prompts", num_deep_prompts, minimum=0)
        self.deep_prompt_length = _integer("deep_prompt_length", deep_prompt_length, minimum=0)
        self.eattn_layers = _integer("eattn_layers", eattn_layers, minimum=0)
        self.eattn_type = eattn_type
        if not isinstance(feature_layers, (list, tuple)):
            raise TypeError(f"feature_layers must be a list of layer numbers, got {feature_layers!r}.")
        self.feature_layers = [_integer("feature_layers", layer) for layer in feature_layers]
        self.dattn_beta = float(dattn_beta)
        self.dattn_gamma = float(dattn_gamma)
        self.both_eattn_dattn = bool(both_eattn_dattn)
        self.use_score_based_pooling = bool(use_score_based_pooling)
        self.pooling_alpha = float(pooling_alpha)
        self.logit_temperature = float(logit_temperature)
        self.image_loss_temperature = float(image_loss_temperature)
        self.soft_mean = bool(soft_mean)
        self.smoothing_sigma = float(smoothing_sigma)
        self.context_conditioning_prob = float(context_conditioning_prob)
        self.focal_loss_weight = float(focal_loss_weight)
        self.dice_loss_weight = float(dice_loss_weight)
        self.image_loss_weight = float(image_loss_weight)
        self.clip_image_mean = [float(x) for x in clip_image_mean]
        self.clip_image_std = [float(x) for x in clip_image_std]
        self.dino_image_mean = [float(x) for x in dino_image_mean]
        self.dino_image_std = [float(x) for x in dino_image_std]
        self.image_threshold = check_threshold(image_threshold, "image_threshold")  # true, null, NaN: refused
        self.pixel_threshold = check_threshold(pixel_threshold, "pixel_threshold")
        given = {
            "eattn_map_source": eattn_map_source,
            "dattn_input": dattn_input,
            "deep_prompt_rounding_dtype": deep_prompt_rounding_dtype,
        }
        computation = resolve_computation(
            kwargs.pop(LEGACY_COMPUTATION_SWITCH, NOT_GIVEN),
            {name: value for name, value in given.items() if value is not NOT_GIVEN},
        )
        self.eattn_map_source = computation["eattn_map_source"]
        self.dattn_input = computation["dattn_input"]
        self.deep_prompt_rounding_dtype = computation["deep_prompt_rounding_dtype"]
        self.few_shot_fusion_weight = float(few_shot_fusion_weight)
        self.few_shot_features = few_shot_features
        self.clip_backbone = clip_backbone
        self.dino_backbone = dino_backbone
        self.backbones_in_checkpoint = bool(backbones_in_checkpoint)
        self._validate_hyperparameters()
        if prompt_token_ids is None:
            from .prompt_tokenization import tokenize_prompts

            prompt_token_ids = tokenize_prompts(
                self.prompt_texts, self.clip_config.text_config.max_position_embeddings
            )
        self.prompt_token_ids = [[int(i) for i in ids] for ids in prompt_token_ids]
        self._validate_token_ids()
        self.threshold_computation = self._threshold_record(threshold_computation)
        # `use_dattn`, `variant`, ... in an edited config.json: not settings (was: AttributeError, a traceback)
        for name in kwargs:
            attribute = getattr(type(self), name, None)
            if isinstance(attribute, property) and attribute.fset is None:
                raise ValueError(
                    f"{name} is derived from the other fields (not a setting); remove it "
                    f"({name}={kwargs[name]!r} was given)."
                )
        super().__init__(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> CraneConfig:
        """`PreTrainedConfig.from_pretrained`; a value this config refuses is reported with the file it came from."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except (TypeError, ValueError) as error:
            name = f"{os.fspath(pretrained_model_name_or_path)}/config.json"
            if str(error).startswith(name) or isinstance(error, DuplicateJSONKeyError):
                raise
            raise ValueError(f"{name}: {error}") from error

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        """`PreTrainedConfig._dict_from_json_file` with keys repeated within an object refused
        (`DuplicateJSONKeyError` naming the file and the key) instead of the last one silently kept."""
        return cls._decode_special_floats(load_json_without_duplicates(json_file))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in THRESHOLD_FIELDS:  # also `model.config.image_threshold = ...` and overrides at loading
            value = check_threshold(value, name)
        changes_prompts = (
            name in PROMPT_TEXT_FIELDS and "prompt_token_ids" in self.__dict__ and getattr(self, name) != value
        )
        super().__setattr__(name, value)
        if changes_prompts:  # `config.normal_prompt_words = ...`: the derived ids follow
            from .prompt_tokenization import tokenize_prompts

            context = self.clip_config.text_config.max_position_embeddings
            self.prompt_token_ids = tokenize_prompts(self.prompt_texts, context)
            self._validate_token_ids()

    # ------------------------------------------------------------------ published pipeline code
    @property
    def custom_pipelines(self) -> dict:
        """Pipeline code a published folder declares (`custom_pipelines` in config.json).

        Empty where the task is registered in this process (crane_hf installed and imported), so that
        `pipeline(...)` uses the installed implementation without `trust_remote_code`; elsewhere transformers
        loads the folder's copy of the pipeline code.
        """
        declared = self.__dict__.get("_declared_custom_pipelines") or {}
        if not declared:
            return {}
        from transformers.pipelines import PIPELINE_REGISTRY

        return {} if set(declared) <= set(PIPELINE_REGISTRY.get_supported_tasks()) else declared

    @custom_pipelines.setter
    def custom_pipelines(self, value: dict) -> None:
        self.__dict__["_declared_custom_pipelines"] = dict(value or {})

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        declared = output.pop("_declared_custom_pipelines", None)
        if declared:
            output["custom_pipelines"] = declared
        return output

    # ------------------------------------------------------------------ derived properties
    @property
    def use_dattn(self) -> bool:
        """Crane+ (D-Attn with DINOv2) when a DINO config is present."""
        return self.dino_config is not None

    @property
    def variant(self) -> str:
        return "crane+" if self.use_dattn else "crane"

    @property
    def prompt_texts(self) -> list[str]:
        """The normal and the anomalous prompt texts, e.g. "X X X X X X X X X X X X damaged object."."""
        return build_prompt_texts(self.prompt_length, self.normal_prompt_words, self.anomalous_prompt_words)

    @property
    def num_maps(self) -> int:
        """Number of patch-feature maps per image (one or two per feature layer)."""
        per_layer = (2 if self.both_eattn_dattn else 1) if self.use_dattn else 1
        return per_layer * len(self.feature_layers)

    @property
    def map_slots(self) -> list[int]:
        """For each of the `num_maps` maps (per feature layer: the D-Attn map, then the E-Attn map), the index of the
        distinct map `CraneForAnomalyDetection.encode_image` computes for it.

        With ``eattn_map_source="per_layer"`` every map is distinct: ``[0, 1, ..., num_maps - 1]``. With
        "last_layer" every E-Attn map is the same final e-stream map, computed once after the D-Attn maps: e.g.
        ``[0, 0, 0, 0]`` for Crane's four feature layers, ``[0, 2, 1, 2]`` for Crane+ on two feature layers.
        """
        kinds = []
        for _ in self.feature_layers:
            if self.use_dattn:
                kinds.append("dattn")
            if not self.use_dattn or self.both_eattn_dattn:
                kinds.append("eattn")
        if self.eattn_map_source == "per_layer":
            return list(range(len(kinds)))
        shared = kinds.count("dattn")
        slots, next_distinct = [], 0
        for kind in kinds:
            if kind == "eattn":
                slots.append(shared)
            else:
                slots.append(next_distinct)
                next_distinct += 1
        return slots

    @property
    def computation(self) -> dict[str, Any]:
        """The three fields that select the published computation or the per-layer variant, by name."""
        return {name: getattr(self, name) for name in PUBLISHED_COMPUTATION}

    @property
    def not_applicable_fields(self) -> list[str]:
        """The fields that have no effect on this architecture: the D-Attn fields for Crane (no DINOv2),
        `eattn_map_source` for Crane+ without E-Attn maps (`both_eattn_dattn=False`), the deep prompts' rounding and
        length without deep prompts. Whatever their values, the model computes the same."""
        fields = []
        if not self.use_dattn:
            fields += [
                "dattn_input",
                "dattn_beta",
                "dattn_gamma",
                "both_eattn_dattn",
                "dino_image_mean",
                "dino_image_std",
            ]
        elif not self.both_eattn_dattn:
            fields.append("eattn_map_source")
        if self.num_deep_prompts == 0:
            fields += ["deep_prompt_rounding_dtype", "deep_prompt_length"]
        return fields

    @property
    def computes_published_code(self) -> bool:
        """Whether the computation fields that apply to this architecture (`not_applicable_fields` left out) all
        select what the published code computes (`PUBLISHED_COMPUTATION`)."""
        skip = self.not_applicable_fields
        return all(getattr(self, name) == value for name, value in PUBLISHED_COMPUTATION.items() if name not in skip)

    # ------------------------------------------------------------------ thresholds and the computation they hold for
    @property
    def inference_computation(self) -> dict[str, Any]:
        """The values of `INFERENCE_FIELDS`: everything that decides the scores and maps at inference."""
        return {name: copy.deepcopy(getattr(self, name)) for name in INFERENCE_FIELDS}

    def _threshold_record(self, record: dict[str, Any] | None) -> dict[str, Any] | None:
        """`threshold_computation` as given (validated), or, when not given, this config's own computation if its
        thresholds are not the defaults (a config saved before the record existed: its thresholds are taken as
        calibrated under its own computation). Default thresholds (0.5: the more probable class) need no record."""
        if record is None:
            defaults = (self.image_threshold, self.pixel_threshold) == (DEFAULT_THRESHOLD, DEFAULT_THRESHOLD)
            return None if defaults else self.inference_computation
        if not isinstance(record, dict):
            raise ValueError(
                f"threshold_computation must be a mapping of computation fields to values, got {record!r}."
            )
        unknown = set(record) - {*INFERENCE_FIELDS, FEW_SHOT_MEMORY, THRESHOLD_DTYPE}
        if unknown:
            raise ValueError(
                f"threshold_computation names {sorted(unknown)}, which are not computation fields "
                f"({', '.join(INFERENCE_FIELDS)})."
            )
        return {name: copy.deepcopy(value) for name, value in record.items()}

    def stale_threshold_fields(
        self,
        image: bool = True,
        pixel: bool = True,
        few_shot_memory: str | None = None,
        dtype: Any = None,
        **call_values: Any,
    ) -> dict:
        """The fields whose value differs from the one the thresholds were calibrated with (`threshold_computation`),
        as {name: (calibrated value, current value)}; empty when the thresholds hold.

        Args:
            image / pixel: which thresholds are asked about (the image threshold does not depend on
                `MAP_ONLY_FIELDS`).
            few_shot_memory: `ReferenceMemory.identity` of the memory the scores are fused with, None for zero-shot
                scores. Thresholds calibrated with another memory, or with none (zero-shot), do not hold:
                `FEW_SHOT_MEMORY` is then named.
            dtype: the dtype the model runs in (`torch.dtype` or its name); thresholds calibrated in another one
                do not hold (`THRESHOLD_DTYPE`). None: not checked (a caller that does not know it).
            **call_values: values a call uses instead of the config's (e.g. the pipeline's `smoothing_sigma`).

        Fields that do not apply to this architecture (`not_applicable_fields`), and the few-shot fields when
        neither the thresholds nor the call use a memory, are left out: they change nothing.
        """
        record = dict(self.threshold_computation or {})
        if not (image or pixel) or not record:
            return {}  # no record: the default thresholds, which hold for any computation
        calibrated_memory = record.pop(FEW_SHOT_MEMORY, None)
        calibrated_dtype = record.pop(THRESHOLD_DTYPE, "float32")
        skip = set(self.not_applicable_fields) | (set() if pixel else set(MAP_ONLY_FIELDS))
        if calibrated_memory is None and few_shot_memory is None:
            skip |= set(FEW_SHOT_FIELDS)
        stale = {}
        if calibrated_memory != few_shot_memory:
            stale[FEW_SHOT_MEMORY] = (calibrated_memory, few_shot_memory)
        if dtype is not None and dtype_name(dtype) != calibrated_dtype:
            stale[THRESHOLD_DTYPE] = (calibrated_dtype, dtype_name(dtype))
        for name, calibrated in record.items():
            current = call_values.get(name) if call_values.get(name) is not None else getattr(self, name)
            if name not in skip and _comparable(current) != _comparable(calibrated):
                stale[name] = (calibrated, current)
        return stale

    def check_thresholds(self, image: bool = True, pixel: bool = True, **call_values: Any) -> None:
        """Raise `ValueError` (one line, naming the fields) if the thresholds asked for (`image`: image_threshold,
        `pixel`: pixel_threshold) were calibrated under another computation than the one this config selects:
        decisions are never made with thresholds that do not hold. See `stale_threshold_fields`."""
        stale = self.stale_threshold_fields(image, pixel, **call_values)
        if not stale:
            return
        names = [name for name, asked in (("image_threshold", image), ("pixel_threshold", pixel)) if asked]
        changes = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in stale.items())
        raise ValueError(
            f"the model's {' and '.join(names)} {'were' if len(names) > 1 else 'was'} calibrated for another "
            "computation than the one asked for "
            f"({changes}): they do not hold for it, so no decision is made. Recalibrate under this computation "
            f"(crane-hf calibrate with the same options{', with that --reference' if FEW_SHOT_MEMORY in stale else ''}"
            f"{', with that --dtype' if THRESHOLD_DTYPE in stale else ''}), or give the thresholds explicitly "
            "(--threshold / "
            "--pixel-threshold; threshold= / pixel_threshold= in Python)."
        )

    # ------------------------------------------------------------------ overrides
    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The names a config can be built or overridden with: the parameters of `__init__` and the legacy
        `official_code_compat`."""
        parameters = inspect.signature(cls.__init__).parameters
        names = {name for name, p in parameters.items() if name != "self" and p.kind is not p.VAR_KEYWORD}
        return frozenset(names | {LEGACY_COMPUTATION_SWITCH})

    @classmethod
    def check_field_names(cls, names: Any, what: str = "CraneConfig") -> None:
        """Raise `TypeError` naming every name in `names` that is not a `CraneConfig` field."""
        unknown = set(names) - cls.field_names()
        if unknown:
            raise TypeError(
                f"{what} got unknown keyword argument(s) {cls.name_unknown(unknown)}: not CraneConfig fields."
            )

    @classmethod
    def name_unknown(cls, names: Any) -> str:
        """`names` quoted, each with the closest `CraneConfig` field: "'sof_mean' (did you mean 'soft_mean'?)"."""
        fields = cls.field_names()
        return ", ".join(
            f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
            for name in sorted(names)
            for close in [difflib.get_close_matches(name, fields, n=1)]
        )

    def with_overrides(self, **fields: Any) -> CraneConfig:
        """A copy of this config with `fields` replaced, built and validated as a new config.

        The one path for overrides (`from_pretrained(path, soft_mean=True)`, `from_backbones`, the command line):
        an unknown name raises `TypeError` naming it, an invalid value `ValueError` naming the field. The legacy
        `official_code_compat=True/False` sets the three computation fields; a computation field given with it must
        agree with it (`resolve_computation`, the rule of `CraneConfig(...)` and config.json too).

        Derived fields follow their sources: `prompt_token_ids` is recomputed when the prompt words, the prompt
        length or the CLIP config change (unless given too). `threshold_computation` (what the thresholds were
        calibrated with) is kept, so that overrides that change the computation make the thresholds refused
        (`check_thresholds`), unless both thresholds are given with them: they are then taken as given for the
        new computation.
        """
        self.check_field_names(fields)
        data = self.to_dict()
        if LEGACY_COMPUTATION_SWITCH in fields:  # the switch replaces the three saved fields
            for name in PUBLISHED_COMPUTATION:
                data.pop(name, None)
        if "prompt_token_ids" not in fields and (
            "clip_config" in fields or any(fields.get(name, data[name]) != data[name] for name in PROMPT_TEXT_FIELDS)
        ):
            data.pop("prompt_token_ids", None)
        if "threshold_computation" not in fields and set(THRESHOLD_FIELDS) <= set(fields):
            data.pop("threshold_computation", None)
        data.update(fields)
        return type(self)(**data)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """`PreTrainedConfig.from_dict`, with `CraneConfig` fields among `kwargs` applied through `with_overrides`
        (validated) instead of set unchecked (this is the path of `AutoModel.from_pretrained(path, soft_mean=True)`).
        """
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in cls.field_names()}
        result = super().from_dict(config_dict, **kwargs)
        if not overrides:
            return result
        if isinstance(result, tuple):
            return result[0].with_overrides(**overrides), result[1]
        return result.with_overrides(**overrides)

    # ------------------------------------------------------------------ validation
    def _validate_hyperparameters(self) -> None:
        _validate_backbone_sizes(self.clip_config, self.dino_config, self.image_size)
        vision = self.clip_config.vision_config
        text = self.clip_config.text_config
        num_layers = vision.num_hidden_layers
        if self.eattn_type not in EATTN_TYPES:
            raise ValueError(f"eattn_type={self.eattn_type!r} is unknown; choose one of {', '.join(EATTN_TYPES)}.")
        if not 0 <= self.eattn_layers <= num_layers:
            raise ValueError(
                f"eattn_layers={self.eattn_layers} must be between 0 and the CLIP vision tower's {num_layers} layers."
            )
        if not self.feature_layers:
            raise ValueError("feature_layers must name at least one vision layer.")
        for layer in self.feature_layers:
            if not 1 <= layer <= num_layers:
                raise ValueError(
                    f"feature_layers contains {layer}, outside the CLIP vision tower's layers 1..{num_layers}."
                )
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise ValueError(f"feature_layers={self.feature_layers} repeats a layer.")
        patch = _as_int(vision.patch_size)
        if self.image_size <= 0 or self.image_size % patch:
            raise ValueError(
                f"image_size={self.image_size} must be a positive multiple of the CLIP patch size {patch}."
            )
        if self.dino_config is not None:
            dino_patch = _as_int(self.dino_config.patch_size)
            if self.image_size % dino_patch:
                raise ValueError(
                    f"image_size={self.image_size} must be a multiple of the DINOv2 patch size {dino_patch}."
                )
            if self.dino_config.model_type not in ("dinov2_with_registers", "dinov2"):
                raise ValueError(
                    f"dino_config.model_type={self.dino_config.model_type!r}: D-Attn needs 'dinov2_with_registers' "
                    "or 'dinov2'."
                )
        context = text.max_position_embeddings
        if self.prompt_length < 1 or self.prompt_length + 4 > context:
            raise ValueError(f"prompt_length={self.prompt_length} does not fit the text context of {context} tokens.")
        if self.num_deep_prompts < 0 or self.num_deep_prompts > text.num_hidden_layers - 1:
            raise ValueError(
                f"num_deep_prompts={self.num_deep_prompts} must be between 0 and the text layers after the first "
                f"({text.num_hidden_layers - 1})."
            )
        if self.num_deep_prompts and not 1 <= self.deep_prompt_length < context - 1:
            raise ValueError(f"deep_prompt_length={self.deep_prompt_length} must be between 1 and {context - 2}.")
        if not 0.0 <= self.context_conditioning_prob <= 1.0:
            raise ValueError(f"context_conditioning_prob={self.context_conditioning_prob} must be in [0, 1].")
        if self.context_conditioning_prob > 0 and self.clip_config.projection_dim != text.hidden_size:
            raise ValueError(
                f"context_conditioning_prob={self.context_conditioning_prob} inserts the image embedding as a text "
                f"token, which needs projection_dim ({self.clip_config.projection_dim}) == text hidden size "
                f"({text.hidden_size}); set context_conditioning_prob=0 for this CLIP."
            )
        if not 0.0 <= self.pooling_alpha <= 1.0:
            raise ValueError(f"pooling_alpha={self.pooling_alpha} must be in [0, 1].")
        if not 0.0 <= self.few_shot_fusion_weight <= 1.0:
            raise ValueError(f"few_shot_fusion_weight={self.few_shot_fusion_weight} must be in [0, 1].")
        if self.few_shot_features not in FEW_SHOT_FEATURES:
            raise ValueError(
                f"few_shot_features={self.few_shot_features!r} is unknown; choose one of "
                f"{', '.join(FEW_SHOT_FEATURES)}."
            )
        if self.few_shot_features == "dino" and self.dino_config is None:
            raise ValueError("few_shot_features='dino' needs Crane+ (a DINOv2 backbone); this config is Crane.")
        for name in ("logit_temperature", "image_loss_temperature", "smoothing_sigma", "dattn_gamma", "dattn_beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive.")
        if not self.smoothing_sigma <= MAX_SMOOTHING_SIGMA:
            raise ValueError(f"smoothing_sigma={self.smoothing_sigma} exceeds the limit of {MAX_SMOOTHING_SIGMA:g}.")
        for name in ("clip_image_mean", "clip_image_std", "dino_image_mean", "dino_image_std"):
            values = getattr(self, name)
            if len(values) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {values}.")
            if name.endswith("std") and min(values) <= 0:
                raise ValueError(f"{name} must be positive, got {values}.")
        for name in ("image_threshold", "pixel_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1].")
        for name, choices in (
            ("eattn_map_source", EATTN_MAP_SOURCES),
            ("dattn_input", DATTN_INPUTS),
            ("deep_prompt_rounding_dtype", DEEP_PROMPT_ROUNDING_DTYPES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is unknown; choose one of {choices}.")

    def _validate_token_ids(self) -> None:
        text = self.clip_config.text_config
        if len(self.prompt_token_ids) != 2:
            raise ValueError("prompt_token_ids must hold two sequences: the normal and the anomalous prompt.")
        for ids in self.prompt_token_ids:
            if len(ids) != text.max_position_embeddings:
                raise ValueError(
                    f"prompt_token_ids sequences must have {text.max_position_embeddings} ids, got {len(ids)}."
                )
            if max(ids) >= text.vocab_size or min(ids) < 0:
                raise ValueError(
                    f"prompt_token_ids has ids outside the CLIP vocabulary of {text.vocab_size} tokens; Crane needs "
                    "the OpenAI CLIP vocabulary (49408 tokens)."
                )
            eos = end_of_text_id(text)
            if eos not in ids:
                raise ValueError(f"prompt_token_ids must contain the end-of-text id {eos}.")
            eot = ids.index(eos)
            if eot < self.prompt_length + 2:
                raise ValueError("prompt_token_ids: the end-of-text token comes before the prompt words.")
            if self.context_conditioning_prob > 0 and eot + 1 >= len(ids):
                raise ValueError("prompt_token_ids: no room to insert the image token before the context ends.")

    # ------------------------------------------------------------------ presets
    @classmethod
    def for_variant(
        cls,
        variant: str = "crane+",
        clip_config: CLIPConfig | dict | None = None,
        dino_config: PreTrainedConfig | dict | None = None,
        **overrides,
    ) -> CraneConfig:
        """The published setting of `variant` ("crane" or "crane+", spec section 8) around the given backbones.

        The computation is the published code's (`PUBLISHED_COMPUTATION`, the defaults) unless overridden.
        Without backbone configs, the paper's backbones are used: CLIP ViT-L/14@336 and, for Crane+, DINOv2 ViT-B/14
        with registers. Layers are given for 24 vision and 12 text layers; on other depths, feature and E-Attn layers
        keep their relative depths and the deep prompts are capped at the text layers after the first.
        """
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is unknown; choose 'crane' or 'crane+'.")
        clip_config = _as_clip_config(clip_config)
        if variant == "crane+":
            dino_config = _as_config(dino_config) if dino_config is not None else _as_config(DINOV2_REG_B14)
        elif dino_config is not None:
            raise ValueError("variant='crane' uses no DINOv2 backbone; pass dino_config only with variant='crane+'.")
        cls.check_field_names(overrides, "CraneConfig.for_variant")
        settings = copy.deepcopy(PAPER_SETTINGS[variant])
        num_layers = clip_config.vision_config.num_hidden_layers
        scaled = [max(1, round(layer * num_layers / 24)) for layer in settings["feature_layers"]]
        settings["feature_layers"] = list(dict.fromkeys(scaled))  # shallow towers: distinct layers only
        settings["eattn_layers"] = max(1, round(19 * num_layers / 24))
        settings["num_deep_prompts"] = min(8, clip_config.text_config.num_hidden_layers - 1)
        settings.update(overrides)
        return cls(clip_config=clip_config, dino_config=dino_config, **settings)


MAX_IMAGE_SIZE = 2048  # largest input side S: the maps are [batch, S, S] and each tower sees (S / patch)^2 tokens
MAX_BACKBONE_PARAMETERS = 3_000_000_000  # 12 GB in float32; CLIP ViT-L/14@336 + DINOv2-B/14 have 0.5e9


@contextlib.contextmanager
def _field_errors(prefix: str) -> Iterator[None]:
    """Backbone config errors (transformers' strict type checks among them) as one `ValueError` naming the field."""
    try:
        yield
    except (ValueError, TypeError, ArithmeticError) as error:
        raise ValueError(f"{prefix}: {_one_line(error)}") from error
    except Exception as error:
        if not type(error).__name__.startswith("StrictDataclass"):  # huggingface_hub's validation errors
            raise
        raise ValueError(f"{prefix}: {_one_line(error)}") from error


def _one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _integer(name: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int of at least `minimum`; `TypeError` / `ValueError` naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}.")
    return int(value)


SIZE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "patch_size",
    "image_size",
    "vocab_size",
    "max_position_embeddings",
    "projection_dim",
)


def _check_size_fields(prefix: str, config: dict) -> None:
    """The size fields present in a backbone config dict (and its text/vision sub-dicts) are positive integers."""
    for name, value in config.items():
        if name in ("text_config", "vision_config") and isinstance(value, dict):
            _check_size_fields(f"{prefix}.{name}", value)
        elif name in SIZE_FIELDS and not isinstance(value, (list, tuple)):
            _integer(f"{prefix}.{name}", value)
    width, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise ValueError(f"{prefix}.hidden_size={width} is not a multiple of num_attention_heads={heads}.")


def _square(name: str, value: Any) -> int:
    """A square size given as an int or as equal (height, width) values."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name}={list(value)} must be square (one value, or two equal values).")
        value = value[0]
    return _integer(name, value)


def _validate_backbone_sizes(clip: CLIPConfig, dino: PreTrainedConfig | None, image_size: int) -> None:
    """Refuse backbone sizes that are not positive integers, or imply more than `MAX_BACKBONE_PARAMETERS` weights,
    and inputs larger than `MAX_IMAGE_SIZE`, before any tensor is allocated; errors name the config field."""
    if image_size > MAX_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} exceeds the largest supported input side {MAX_IMAGE_SIZE}.")
    towers = [("clip_config.text_config", clip.text_config), ("clip_config.vision_config", clip.vision_config)]
    if dino is not None:
        towers.append(("dino_config", dino))
    _integer("clip_config.projection_dim", clip.projection_dim)
    parameters = 0
    for prefix, tower in towers:
        sizes = {
            name: _integer(f"{prefix}.{name}", getattr(tower, name, None))
            for name in ("hidden_size", "num_hidden_layers", "num_attention_heads")
        }
        width = sizes["hidden_size"]
        if width % sizes["num_attention_heads"]:
            heads = sizes["num_attention_heads"]
            raise ValueError(f"{prefix}.hidden_size={width} is not a multiple of num_attention_heads={heads}.")
        if prefix == "dino_config":
            ratio = getattr(tower, "mlp_ratio", 4)
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 64:
                raise ValueError(f"{prefix}.mlp_ratio={ratio!r} must be a number in (0, 64].")
            hidden = int(width * ratio)
            _integer(f"{prefix}.num_register_tokens", getattr(tower, "num_register_tokens", 0), minimum=0)
        else:
            hidden = _integer(f"{prefix}.intermediate_size", getattr(tower, "intermediate_size", None))
        if prefix.endswith("text_config"):
            positions = _integer(f"{prefix}.max_position_embeddings", tower.max_position_embeddings)
            positions += _integer(f"{prefix}.vocab_size", tower.vocab_size)
            patch_inputs = 0
        else:
            patch = _square(f"{prefix}.patch_size", tower.patch_size)
            side = _square(f"{prefix}.image_size", tower.image_size)
            if patch > side:
                raise ValueError(f"{prefix}.patch_size={patch} is larger than its image_size={side}.")
            positions = (side // patch) ** 2 + 1 + getattr(tower, "num_register_tokens", 0)
            patch_inputs = 3 * patch * patch * width
        per_layer = 4 * width * width + 2 * width * hidden
        parameters += sizes["num_hidden_layers"] * per_layer + positions * width + patch_inputs
    if parameters > MAX_BACKBONE_PARAMETERS:
        raise ValueError(
            f"the backbone sizes imply about {parameters / 1e9:.3g} billion weights ({4 * parameters / 2**30:.0f} GiB "
            f"in float32), more than the limit of {MAX_BACKBONE_PARAMETERS / 1e9:g} billion: refused before "
            "allocating (check hidden_size, intermediate_size, num_hidden_layers, vocab_size and image_size)."
        )


def resolve_computation(legacy: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The three computation fields from the old switch `official_code_compat` and the new fields given.

    The one rule of `CraneConfig(...)`, config.json and `from_pretrained` / `with_overrides` keywords: `given` holds
    the new fields that were given (present, whatever their value); each must be one of its choices. Without the
    switch (`legacy` is `NOT_GIVEN`), the fields not given take the published code's values. With it (true: the
    published values, false: the per-layer ones), every field given must be the value the switch implies, else
    `ValueError` names both.
    """
    for name, value in given.items():
        if value not in COMPUTATION_CHOICES[name]:
            raise ValueError(f"{name}={value!r} is unknown; choose one of {COMPUTATION_CHOICES[name]}.")
    if legacy is NOT_GIVEN:
        return {**PUBLISHED_COMPUTATION, **given}
    if not isinstance(legacy, bool):
        raise ValueError(
            f"{LEGACY_COMPUTATION_SWITCH}={legacy!r} is not a valid value: the old switch must be true or false "
            f"(better, give the fields it stood for: {', '.join(PUBLISHED_COMPUTATION)})."
        )
    implied = PUBLISHED_COMPUTATION if legacy else PER_LAYER_COMPUTATION
    conflicting = [f"{name}={value!r}" for name, value in given.items() if value != implied[name]]
    if conflicting:
        meaning = ", ".join(f"{name}={value!r}" for name, value in implied.items())
        raise ValueError(
            f"{LEGACY_COMPUTATION_SWITCH}={legacy} (the old switch, meaning {meaning}) contradicts "
            f"{', '.join(conflicting)}, given with it; give only the new fields."
        )
    return dict(implied)


def threshold_context(model: Any, memory: Any = None) -> dict[str, Any]:
    """The call values of `CraneConfig.check_thresholds` that only a loaded model knows: the reference memory its
    scores are fused with (`few_shot_memory`: `memory`, else the model's own; None: zero-shot) and the dtype it runs
    in (`dtype`; None where the model has none)."""
    memory = memory if memory is not None else getattr(model, "reference_memory", None)
    return {"few_shot_memory": memory.identity if memory is not None else None, "dtype": getattr(model, "dtype", None)}


def dtype_name(dtype: Any) -> str:
    """ "float32" for `torch.float32` or "float32" (the name a threshold record keeps)."""
    return str(dtype).removeprefix("torch.")


def _comparable(value: Any) -> Any:
    """A value as saved in JSON, for comparing a recorded computation with the current one (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_comparable(item) for item in value]
    return value


def build_prompt_texts(prompt_length: int, normal_words: str, anomalous_words: str) -> list[str]:
    """Crane's two prompt texts: `prompt_length` "X" placeholders followed by the normal / anomalous words."""
    placeholders = " ".join(["X"] * prompt_length)
    return [f"{placeholders} {normal_words}", f"{placeholders} {anomalous_words}"]


def _as_clip_config(config: CLIPConfig | dict | None) -> CLIPConfig:
    if config is None:
        return CLIPConfig(**copy.deepcopy(CLIP_VIT_L14_336))
    if isinstance(config, dict):
        return CLIPConfig(**{k: v for k, v in config.items() if k != "model_type"})
    return config


def _as_int(value: int | list[int] | tuple[int, ...]) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"Only square patches are supported, got {value}.")
        return int(value[0])
    return int(value)


__all__ = [
    "FEW_SHOT_MEMORY",
    "INFERENCE_FIELDS",
    "PER_LAYER_COMPUTATION",
    "PUBLISHED_COMPUTATION",
    "THRESHOLD_DTYPE",
    "CraneConfig",
    "resolve_computation",
    "threshold_context",
]
