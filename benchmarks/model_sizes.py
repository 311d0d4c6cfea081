"""Parameter counts of the paper's two configurations and the size of their published Hub folders.

    python benchmarks/model_sizes.py

Counted from the configurations on the meta device (no weights are downloaded or allocated). The Hub folder size
is what `crane-hf push` uploads: model.safetensors (float32 tensors plus the safetensors header, computed exactly
from the tensor names and shapes), the JSON configs, the code files and the model card of a dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile

import torch

from crane_hf import CraneConfig, CraneForAnomalyDetection, CraneImageProcessor
from crane_hf.commands.push import build_model_card


def safetensors_size(model: torch.nn.Module) -> int:
    """Exact size of model.safetensors for `model`'s state dict in its dtype (header + data)."""
    offset, header = 0, {"__metadata__": {"format": "pt"}}
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(struct.pack("<Q", 0)) + len(encoded) + offset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)  # no options: --help describes the table
    rows = []
    for variant in ("crane", "crane+"):
        config = CraneConfig.for_variant(variant)
        with torch.device("meta"):
            model = CraneForAnomalyDetection(config)
        counts = {
            "CLIP ViT-L/14@336": sum(p.numel() for p in model.clip.parameters()),
            "DINOv2-B/14 reg": sum(p.numel() for p in model.dino.parameters()) if model.dino is not None else 0,
            "prompts (trainable)": sum(p.numel() for p in model.prompt_learner.parameters()),
        }
        with tempfile.TemporaryDirectory() as folder:
            config.save_pretrained(folder)
            CraneImageProcessor.from_crane_config(config).save_pretrained(folder)
            build_model_card(model, f"my-org/{variant.replace('+', '-plus')}").save(os.path.join(folder, "README.md"))
            small_files = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
        code_dir = os.path.dirname(os.path.abspath(sys.modules["crane_hf.models.crane"].__file__))
        code_files = [
            "anomaly_losses.py",
            "clip_layers.py",
            "configuration_crane.py",
            "d_attention.py",
            "e_attention.py",
            "gaussian_smoothing.py",
            "image_processing_crane.py",
            "modeling_crane.py",
            "pipeline_zero_shot_anomaly_detection.py",
            "position_embeddings.py",
            "prompt_learning.py",
            "prompt_tokenization.py",
            "score_pooling.py",
            "visualization.py",
        ]
        code = sum(os.path.getsize(os.path.join(code_dir, name)) for name in code_files)
        weights = safetensors_size(model)
        rows.append((variant, counts, weights, small_files + code))
    print("| model | CLIP params | DINOv2 params | prompt params | total params | model.safetensors | Hub folder |")
    print("|---|---|---|---|---|---|---|")
    for variant, counts, weights, rest in rows:
        total = sum(counts.values())
        values = [f"{v:,}" for v in counts.values()]
        sizes = f"{weights / 1e9:.3f} GB | {(weights + rest) / 1e9:.3f} GB"
        print(f"| {variant} | {' | '.join(values)} | {total:,} | {sizes} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
