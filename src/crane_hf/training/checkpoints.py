"""Per-epoch training checkpoints: a loadable prompts-only model folder plus the state to resume from.

    <output>/checkpoint-epoch-<N>/
        config.json, model.safetensors, ...   `save_pretrained(include_backbones=False)`: the prompts as safetensors,
                                              loadable with CraneForAnomalyDetection.from_pretrained
        preprocessor_config.json              the matching CraneImageProcessor
        training_state/                       accelerate's `save_state`: optimizer (and gradient scaler) state,
                                              random states; the prompts are not duplicated there
        trainer_state.json                    epoch, optimizer steps, the run's settings, the loss history

Each checkpoint is written by the main process into a temporary folder renamed in one step when complete, so a
run killed at any moment leaves only complete checkpoints.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from typing import Any

import torch
from transformers.utils import SAFE_WEIGHTS_NAME

from ..io.atomic import atomic_output_dir, atomic_write_files, atomic_write_text
from ..io.output_names import MARKER_NAME
from ..io.output_safety import claim_entries
from ..models.crane.checkpoint_validation import read_safetensors

CHECKPOINT_PREFIX = "checkpoint-epoch-"
TRAINING_STATE = "training_state"
TRAINER_STATE = "trainer_state.json"


def checkpoint_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{int(epoch)}")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as (epoch, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(spec: str, output_dir: str) -> str:
    """A checkpoint folder from `--resume-from-checkpoint`: a path, or "latest" (the newest in `output_dir`)."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(f"No checkpoint ({CHECKPOINT_PREFIX}N with {TRAINER_STATE}) in {output_dir}.")
        return checkpoints[-1][1]
    for required in (TRAINER_STATE, TRAINING_STATE, SAFE_WEIGHTS_NAME):
        if not os.path.exists(os.path.join(spec, required)):
            raise FileNotFoundError(f"{spec} is not a training checkpoint: it has no {required}.")
    return spec


def read_trainer_state(checkpoint: str) -> dict[str, Any]:
    """The checkpoint's trainer_state.json; `ValueError` naming the file when it is not a JSON object."""
    path = os.path.join(checkpoint, TRAINER_STATE)
    try:
        with open(path, encoding="utf-8") as stream:
            state = json.load(stream)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{path}: not a readable trainer state ({error})") from None
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
        raise ValueError(f"{path}: not a trainer state (no 'settings' object)")
    return state


def check_training_state(checkpoint: str) -> None:
    """Refuse a checkpoint whose training state files are truncated or corrupt, naming the file.

    accelerate writes them with `torch.save`, as zip archives: each archive's directory and the CRC of every member
    are checked (reading the files once, a few hundred kilobytes for the prompts' optimizer state).
    """
    folder = os.path.join(checkpoint, TRAINING_STATE)
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: missing; {checkpoint} cannot be resumed")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or not name.endswith((".bin", ".pkl", ".pt", ".pth")):
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                broken = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise ValueError(f"{path}: truncated or corrupt ({error}); {checkpoint} cannot be resumed") from None
        if broken is not None:
            raise ValueError(f"{path}: corrupt (bad CRC in {broken}); {checkpoint} cannot be resumed")


def load_training_state(accelerator: Any, checkpoint: str) -> None:
    """`accelerator.load_state` of the checkpoint's training state, after `check_training_state`; a failure names
    the checkpoint instead of ending in a bare OSError."""
    check_training_state(checkpoint)
    folder = os.path.join(checkpoint, TRAINING_STATE)
    try:
        accelerator.load_state(folder)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{folder}: the training state cannot be loaded ({error})") from error


def register_prompt_state_hooks(accelerator: Any, model: Any) -> None:
    """Make `accelerator.save_state` / `load_state` skip the (frozen, large) backbone weights.

    The prompts are saved beside the training state by `save_pretrained`; loading the state reads them back from
    the checkpoint folder's model.safetensors.
    """

    def skip_model_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()

    def load_prompts(models: list, input_dir: str) -> None:
        models.clear()
        weights = os.path.join(os.path.dirname(os.path.abspath(input_dir)), SAFE_WEIGHTS_NAME)
        model.load_prompt_state(read_safetensors(weights), source=weights)

    accelerator.register_save_state_pre_hook(skip_model_weights)
    accelerator.register_load_state_pre_hook(load_prompts)


def save_checkpoint(
    accelerator: Any, model: Any, processor: Any, path: str, trainer_state: dict[str, Any], overwrite: bool
) -> None:
    """Write a checkpoint (layout in the module docstring) from the main process; all processes wait for it."""
    if accelerator.is_main_process:
        with atomic_output_dir(path, overwrite=overwrite, command="train") as staging:
            model.save_pretrained(staging, include_backbones=False)
            processor.save_pretrained(staging)
            accelerator.save_state(os.path.join(staging, TRAINING_STATE))
            atomic_write_text(os.path.join(staging, TRAINER_STATE), json.dumps(trainer_state, indent=2) + "\n")
    accelerator.wait_for_everyone()


def publish_model(checkpoint: str, output_dir: str) -> None:
    """Copy the model files of `checkpoint` (not its training state nor its marker) into `output_dir`, all or
    nothing (`atomic_write_files`), and list them in the folder's manifest."""
    sources = {
        name: os.path.join(checkpoint, name)
        for name in sorted(os.listdir(checkpoint))
        if os.path.isfile(os.path.join(checkpoint, name)) and name != MARKER_NAME
    }
    atomic_write_files(sources, output_dir)
    claim_entries(output_dir, sources, "train")


def prompt_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The trainable prompt tensors of a Crane model, detached copies on the CPU."""
    return {name: tensor.detach().cpu().clone() for name, tensor in model.named_parameters() if tensor.requires_grad}


__all__ = [
    "CHECKPOINT_PREFIX",
    "TRAINER_STATE",
    "TRAINING_STATE",
    "check_training_state",
    "checkpoint_path",
    "list_checkpoints",
    "load_training_state",
    "prompt_tensors",
    "publish_model",
    "read_trainer_state",
    "register_prompt_state_hooks",
    "resolve_checkpoint",
    "save_checkpoint",
]
