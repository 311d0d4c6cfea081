"""Score images with Crane+ built on small random backbones (no download needed).

    python examples/quickstart.py

Real use starts from the paper's backbones instead:
    CraneForAnomalyDetection.from_backbones("openai/clip-vit-large-patch14-336",
                                            "facebook/dinov2-with-registers-base")
and the official prompts (python -m crane_hf.convert_original ...). With random weights the scores are
meaningless; this script shows the API end to end.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from crane_hf import CraneForAnomalyDetection, CraneImageProcessor


def small_random_backbones() -> tuple[CLIPModel, Dinov2WithRegistersModel]:
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            projection_dim=64,
            text_config={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 4,
                "num_attention_heads": 2,
            },
            vision_config={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 6,
                "num_attention_heads": 2,
                "image_size": 112,
                "patch_size": 14,
                "projection_dim": 64,
            },
        )
    )
    dino = Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=112
        )
    )
    return clip, dino


def main() -> None:
    clip, dino = small_random_backbones()
    model = CraneForAnomalyDetection.from_backbones(clip, dino, image_size=112)
    processor = CraneImageProcessor.from_crane_config(model.config)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (150, 200, 3), dtype=np.uint8) for _ in range(2)]
    images[1][50:80, 60:120] = (255, 0, 0)  # a red patch
    inputs = processor(images)
    with torch.inference_mode():
        outputs = model(inputs["pixel_values"])
    maps = processor.post_process_anomaly_maps(outputs.anomaly_maps, sigma=4.0, target_sizes=inputs["original_sizes"])
    print("Crane+ on small RANDOM backbones (scores are not meaningful):")
    for index, (score, anomaly_map) in enumerate(zip(outputs.anomaly_scores, maps)):
        print(f"  image {index}: score {score:.4f}, map {tuple(anomaly_map.shape)}, max {anomaly_map.max():.4f}")


if __name__ == "__main__":
    main()
