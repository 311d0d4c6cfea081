"""Score images with Crane+ built on small random backbones (no download needed).

    python examples/quickstart.py

With random weights the scores are meaningless; this script shows the API end to end. Real use takes the paper's
model with its official prompts, which crane_hf bundles as presets (the backbones come from the Hugging Face Hub or
its cache):
    CraneForAnomalyDetection.from_preset("crane+/mvtec")
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from crane_hf import CraneForAnomalyDetection, CraneImageProcessor
from crane_hf.small_backbones import small_random_backbones


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    clip, dino = small_random_backbones(image_size=112)
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
