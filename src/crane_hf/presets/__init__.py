"""The paper's trained prompts, bundled: named presets for `CraneForAnomalyDetection.from_preset`.

| preset | model | prompts trained on | use for |
|---|---|---|---|
| `crane+/mvtec` (default) | Crane+ | MVTec-AD, epoch 5 | industrial datasets except MVTec-AD |
| `crane+/visa` | Crane+ | VisA, epoch 5 | MVTec-AD |
| `crane+/mvtec-epoch1` | Crane+ (soft_mean) | MVTec-AD, epoch 1 | medical datasets |
| `crane/mvtec` | Crane | MVTec-AD, epoch 5 | every dataset except MVTec-AD |
| `crane/visa` | Crane | VisA, epoch 5 | MVTec-AD |

A preset holds only the learned tensors and their metadata (a few hundred kilobytes); the backbones
(openai/clip-vit-large-patch14-336 and facebook/dinov2-with-registers-base) come from the Hugging Face cache or
the Hub, or from local folders you name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from ..hub_availability import (
    BackboneUnavailableError,
    backbone_unavailable_message,
    local_dir_name,
    unavailable_reason,
)
from .catalog import PRESET_SOURCES, preset_file_name

if TYPE_CHECKING:  # tensors come from safe_open; the module imports no torch, so `crane-hf --help` starts fast
    import torch

PRESETS_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PRESET = "crane+/mvtec"
FINGERPRINT_RTOL = 1e-3


class PresetBackboneMismatchError(ValueError):
    """The CLIP backbone is not the one the preset's prompts were trained with."""


@dataclass
class Preset:
    """A bundled set of official prompts with the paper's settings for them."""

    name: str
    variant: str
    training_set: str
    epoch: int
    use_for: str
    clip_backbone: str
    dino_backbone: str | None
    settings: dict[str, Any]
    published_results: list[dict[str, Any]]
    source: str
    source_sha256: str
    prompt_state: dict[str, torch.Tensor] = field(repr=False)
    fingerprint_token_ids: torch.Tensor = field(repr=False)
    fingerprint_embeddings: torch.Tensor = field(repr=False)


def list_presets() -> list[str]:
    """Names of the bundled presets."""
    return list(PRESET_SOURCES)


def is_preset_name(name: str) -> bool:
    return name in PRESET_SOURCES


def load_preset(name: str) -> Preset:
    """Read a bundled preset (tensors and metadata)."""
    if name not in PRESET_SOURCES:
        raise ValueError(f"Unknown preset {name!r}; available: {', '.join(PRESET_SOURCES)}.")
    path = os.path.join(PRESETS_DIR, preset_file_name(name))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The preset file {path} is missing from the installation; reinstall crane_hf.")
    with safe_open(path, framework="pt") as reader:
        metadata = reader.metadata()
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return Preset(
        name=name,
        variant=metadata["variant"],
        training_set=metadata["training_set"],
        epoch=int(metadata["epoch"]),
        use_for=metadata["use_for"],
        clip_backbone=metadata["clip_backbone"],
        dino_backbone=metadata["dino_backbone"] or None,
        settings=json.loads(metadata["settings"]),
        published_results=json.loads(metadata["published_results"]),
        source=metadata["source"],
        source_sha256=metadata["source_sha256"],
        prompt_state={k: v for k, v in tensors.items() if k.startswith("prompt_learner.")},
        fingerprint_token_ids=tensors["fingerprint.token_ids"],
        fingerprint_embeddings=tensors["fingerprint.token_embeddings"],
    )


def check_fingerprint(preset: Preset, token_embedding: torch.Tensor) -> None:
    """Refuse a CLIP whose token embeddings of the prompts' fixed tokens differ from the preset's."""
    # A CLIP loaded in reduced precision (dtype=bfloat16 / float16) has its embeddings rounded to that dtype: the
    # rounding (half its epsilon, relative) is allowed on top of the tolerance.
    import torch

    tolerance = FINGERPRINT_RTOL + torch.finfo(token_embedding.dtype).eps / 2
    embeddings = token_embedding.detach().float().cpu()
    if embeddings.shape[1] != preset.fingerprint_embeddings.shape[1]:
        raise PresetBackboneMismatchError(
            f"Preset {preset.name} was trained with a {preset.fingerprint_embeddings.shape[1]}-wide CLIP text tower "
            f"({preset.clip_backbone}); this CLIP's is {embeddings.shape[1]}-wide."
        )
    if int(preset.fingerprint_token_ids.max()) >= embeddings.shape[0]:
        raise PresetBackboneMismatchError(f"This CLIP's vocabulary is too small for preset {preset.name}.")
    ours = embeddings[preset.fingerprint_token_ids]
    error = (ours - preset.fingerprint_embeddings).abs().max() / preset.fingerprint_embeddings.abs().max()
    if error > tolerance:
        raise PresetBackboneMismatchError(
            f"This CLIP is not {preset.clip_backbone}, the backbone preset {preset.name} was trained with (token "
            f"embeddings differ, relative error {error:.2e}). To use it anyway: allow_backbone_mismatch=True in "
            "Python, --allow-backbone-mismatch on the command line (crane-hf predict, evaluate, push)."
        )


def _unavailable_message(preset: Preset, missing: str, reason: str) -> str:
    backbones = [preset.clip_backbone, *([preset.dino_backbone] if preset.dino_backbone else [])]
    folders = [local_dir_name(backbone) for backbone in backbones]
    python_args = f'clip="{folders[0]}"' + (f', dino="{folders[1]}"' if preset.dino_backbone else "")
    cli_args = f"--clip {folders[0]}" + (f" --dino {folders[1]}" if preset.dino_backbone else "")
    usage = (
        f'  CraneForAnomalyDetection.from_preset("{preset.name}", {python_args})\n'
        f"  crane-hf predict IMAGES --model {preset.name} {cli_args}"
    )
    return backbone_unavailable_message(f"Preset {preset.name}", missing, reason, backbones, usage)


def _check_backbone_available(source: str, preset: Preset, cache_dir: Any = None) -> None:
    """A backbone given as a Hub id (not a local folder) that is neither cached nor downloadable here fails at once
    (one connection attempt, no download retries) with `BackboneUnavailableError`."""
    source = os.path.expanduser(source) if source.startswith("~") else source
    if not os.path.isdir(source):
        reason = unavailable_reason(source, cache_dir=cache_dir)
        if reason:
            raise BackboneUnavailableError(_unavailable_message(preset, source, reason))


def check_preset_backbones(name: str, clip: Any = None, dino: Any = None) -> None:
    """That the backbones the preset `name` would load (its Hub ids, or the `clip` / `dino` given as paths or Hub ids;
    loaded models pass) can be had here, without loading them: what `model_from_preset` checks first, for callers
    that must fail before starting work (several processes, an output folder).

    Raises:
        BackboneUnavailableError: a backbone Hub id neither cached nor downloadable here, with the download commands.
    """
    preset = load_preset(name)
    sources = [preset.clip_backbone if clip is None else clip]
    if preset.variant == "crane+":
        sources.append(preset.dino_backbone if dino is None else dino)
    for source in sources:
        if isinstance(source, (str, os.PathLike)):
            _check_backbone_available(os.fspath(source), preset)


def _load_backbone(loader: Any, source: str, preset: Preset, backbone_kwargs: dict[str, Any]) -> Any:
    """`loader(source)`; a Hub id that is neither cached nor downloadable fails at once (no download retries). A
    leading "~" is the home folder."""
    source = os.path.expanduser(source) if source.startswith("~") else source
    _check_backbone_available(source, preset, backbone_kwargs.get("cache_dir"))
    try:
        return loader(source, **backbone_kwargs)
    except OSError as error:
        if os.path.isdir(source):
            raise
        detail = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}"
        raise BackboneUnavailableError(_unavailable_message(preset, source, detail)) from error


def model_from_preset(
    name: str = DEFAULT_PRESET,
    clip: Any = None,
    dino: Any = None,
    allow_backbone_mismatch: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
):
    """A `CraneForAnomalyDetection` with a preset's prompts and the paper's settings for it.

    Args:
        name: preset name (see `list_presets()`).
        clip / dino: backbones to use instead of the preset's Hub ids: loaded models or local folders.
        allow_backbone_mismatch: use a CLIP whose token embeddings differ from the preset's fingerprint.
        backbone_kwargs: passed to the backbones' `from_pretrained` (e.g. `dtype`, `cache_dir`).
        **config_overrides: `CraneConfig` fields (e.g. `soft_mean=True`, `image_size=336`); without them the model
            computes what the published code computes (the `CraneConfig` defaults).
    """
    from transformers import AutoModel, CLIPModel

    from ..models.crane.configuration_crane import CraneConfig
    from ..models.crane.modeling_crane import CraneForAnomalyDetection

    CraneConfig.check_field_names(config_overrides, "from_preset")  # before any backbone is loaded
    preset = load_preset(name)
    backbone_kwargs = backbone_kwargs or {}
    if preset.variant == "crane" and dino is not None:
        raise ValueError(f"Preset {name} is Crane (no D-Attn); it takes no dino backbone.")
    clip_source = preset.clip_backbone if clip is None else clip
    clip_model = (
        _load_backbone(CLIPModel.from_pretrained, os.fspath(clip_source), preset, backbone_kwargs)
        if isinstance(clip_source, (str, os.PathLike))
        else clip_source
    )
    dino_model = None
    if preset.variant == "crane+":
        dino_source = preset.dino_backbone if dino is None else dino
        dino_model = (
            _load_backbone(AutoModel.from_pretrained, os.fspath(dino_source), preset, backbone_kwargs)
            if isinstance(dino_source, (str, os.PathLike))
            else dino_source
        )
    try:
        check_fingerprint(preset, clip_model.text_model.embeddings.token_embedding.weight)
    except PresetBackboneMismatchError:
        width = preset.fingerprint_embeddings.shape[1]
        if not allow_backbone_mismatch or clip_model.config.text_config.hidden_size != width:
            raise
    settings = {**preset.settings, **config_overrides}
    model = CraneForAnomalyDetection.from_backbones(clip_model, dino_model, **settings)
    if clip is None:
        model.config.clip_backbone = preset.clip_backbone
    if preset.variant == "crane+" and dino is None:
        model.config.dino_backbone = preset.dino_backbone
    model.config.preset = preset.name
    model.load_prompt_state(preset.prompt_state, source=f"preset {name}")
    return model
