"""Rebuild the bundled presets from the official Crane checkpoints (maintainers' tool).

    python -m crane_hf.presets.build --official-dir tests/fixtures/crane_official

Each official ``epoch_N.pth`` becomes a small safetensors file in this folder holding the learned tensors
(``prompt_learner.*``), the CLIP fingerprint (the token ids of the fixed prompt tokens and the token embeddings
the prompts were trained with) and metadata: variant, training set, epoch, backbones, the paper's settings for the
model, what it is meant for, its published results, and the source file's sha256.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save as save_safetensors

from ..io.atomic import atomic_write_bytes
from ..models.crane.convert_original import deep_prompt_keys, file_sha256, load_original_checkpoint
from .catalog import CLIP_BACKBONE, DINO_BACKBONE, PRESET_SOURCES, preset_file_name


def fingerprint(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct fixed-token ids of both prompts and the CLIP token embedding of each, [K] and [K, W]."""
    rows: dict[int, torch.Tensor] = {}
    for name in ("pos", "neg"):
        ids = state[f"tokenized_prompts_{name}"].reshape(-1).long()
        prefix = state[f"token_prefix_{name}"].reshape(-1, state["ctx_pos"].shape[-1])
        suffix = state[f"token_suffix_{name}"].reshape(-1, state["ctx_pos"].shape[-1])
        positions = [0, *range(ids.numel() - suffix.shape[0], ids.numel())]
        for row, position in zip(torch.cat([prefix, suffix]), positions):
            token = int(ids[position])
            if token in rows and not torch.equal(rows[token], row):
                raise ValueError(f"Token {token} has two different embeddings in the checkpoint's buffers.")
            rows[token] = row
    ids = sorted(rows)
    return torch.tensor(ids, dtype=torch.int64), torch.stack([rows[i] for i in ids]).float()


def build_preset(name: str, official_dir: str, output_dir: str) -> str:
    file_name, variant, training_set, epoch, settings, use_for, results = PRESET_SOURCES[name]
    source = os.path.join(official_dir, file_name)
    state = load_original_checkpoint(source)
    token_ids, token_embeddings = fingerprint(state)
    tensors = {
        "prompt_learner.ctx_normal": state["ctx_pos"].reshape(state["ctx_pos"].shape[-2:]).float().contiguous(),
        "prompt_learner.ctx_anomalous": state["ctx_neg"].reshape(state["ctx_neg"].shape[-2:]).float().contiguous(),
        "prompt_learner.deep_prompts": torch.stack([state[k] for k in deep_prompt_keys(state)]).float().contiguous(),
        "fingerprint.token_ids": token_ids,
        "fingerprint.token_embeddings": token_embeddings.contiguous(),
    }
    sha256 = file_sha256(source)
    metadata = {
        "name": name,
        "variant": variant,
        "training_set": training_set,
        "epoch": str(epoch),
        "use_for": use_for,
        "clip_backbone": CLIP_BACKBONE,
        "dino_backbone": DINO_BACKBONE if variant == "crane+" else "",
        "settings": json.dumps(settings),
        "published_results": json.dumps(results),
        "source": f"github AlirezaSalehy/Crane checkpoints/{file_name.replace('_epoch_', '/epoch_')}",
        "source_sha256": sha256,
        "license": "MIT (Crane authors)",
    }
    path = os.path.join(output_dir, preset_file_name(name))
    atomic_write_bytes(path, save_safetensors(tensors, metadata=metadata))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crane_hf.presets.build", description=__doc__.splitlines()[0])
    parser.add_argument("--official-dir", required=True, help="folder with the five official .pth files")
    parser.add_argument("--output-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args(argv)
    for name in PRESET_SOURCES:
        print(f"{name}: {build_preset(name, args.official_dir, args.output_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
