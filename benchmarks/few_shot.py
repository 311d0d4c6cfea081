"""Few-shot against zero-shot on the synthetic defect dataset, and the cost of the reference memory as k grows.

    python benchmarks/few_shot.py                      # both parts, a few minutes on two CPU cores
    python benchmarks/few_shot.py --part accuracy --seeds 5 --shots 1 4 16

Part "accuracy": Crane+ on the small random backbones (`crane_hf.small_backbones`, random prompts) at 224 pixels, on
the synthetic defect dataset (`crane_hf.data.synthetic`); for each k and seed, each class's memory of k normal train
images drawn as `crane-hf evaluate --shots` draws them, and the pixel and image AUROC (mean over classes) of the
zero-shot, few-shot and fused outputs, reported as mean ± std over the seeds. The code path is evaluate's
(`evaluation/few_shot.py`).

Part "cost": per test image, the nearest-patch search of the few-shot branch
(`reference_memory.nearest_patch_distances` through `ReferenceMemory.few_shot_patch_map`) at the paper's shape:
518-pixel input, a 37 x 37 grid, Crane+'s three 768-wide sources (D-Attn map, E-Attn map, DINOv2 tokens), for k = 1,
4, 16, 64 memory images (random unit features: the search costs the same whatever the values); the memory bank's
size, and the growth of the process's peak resident memory while scoring (the search itself holds at most
`DISTANCE_CHUNK_ELEMENTS` similarities at a time).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from crane_hf import CraneForAnomalyDetection, CraneImageProcessor
from crane_hf.data import generate_synthetic_dataset, load_anomaly_dataset
from crane_hf.evaluation.evaluate import _class_table, _merge_states
from crane_hf.evaluation.few_shot import (
    FEW_SHOT_KINDS,
    build_class_memory,
    draw_references,
    mean_and_spread,
    normal_train_rows,
    score_with_memories,
)
from crane_hf.models.crane.reference_memory import DISTANCE_CHUNK_ELEMENTS, ReferenceMemory
from crane_hf.small_backbones import small_random_backbones
from crane_hf.training.data_loading import ProcessedImages, undecoded

CLASSES = ("brick", "grass", "coins", "tissue")


def accuracy(args: argparse.Namespace) -> None:
    size = 224
    clip, dino = small_random_backbones(seed=0, image_size=size)
    model = CraneForAnomalyDetection.from_backbones(clip, dino, image_size=size).eval()
    processor = CraneImageProcessor.from_crane_config(model.config)
    with tempfile.TemporaryDirectory() as folder:
        root = generate_synthetic_dataset(
            os.path.join(folder, "data"),
            classes=CLASSES,
            image_size=size,
            train_good=max(args.shots),
            test_good=args.test_good,
            test_defective=1,
            seed=0,
        )
        test = undecoded(load_anomaly_dataset(root, "test"))
        train = undecoded(load_anomaly_dataset(root, "train"))
        available = normal_train_rows(train)
        train_images = ProcessedImages(train, processor)
        rows = list(range(len(test)))
        print(
            "Crane+ on small random backbones (CLIP width 64, 6 layers; DINOv2 width 48, 2 layers), "
            f"{size} px, random prompts; synthetic classes {', '.join(CLASSES)}: "
            f"{len(test) // len(CLASSES)} test images per class "
            f"({args.test_good} good, 5 defective); fusion weight {model.config.few_shot_fusion_weight}; "
            f"seeds {list(range(args.seeds))}.\n"
        )
        print(
            "| k | zero-shot pixel AUROC | few-shot pixel AUROC | fused pixel AUROC "
            "| zero-shot image AUROC | few-shot image AUROC | fused image AUROC |"
        )
        print("|---|---|---|---|---|---|---|")
        for shots in args.shots:
            tables: dict[str, list] = {kind: [] for kind in FEW_SHOT_KINDS}
            for seed in range(args.seeds):
                draws = draw_references(available, CLASSES, shots, seed)
                memories = {name: build_class_memory(model, train_images, draws[name], name, 8) for name in CLASSES}
                accumulators, skipped = score_with_memories(model, processor, test, rows, memories, 8, 4.0, False)
                assert not skipped, skipped
                for kind in FEW_SHOT_KINDS:
                    tables[kind].append(_class_table(_merge_states([accumulators[kind]]), list(CLASSES), "official"))
            cells = []
            for metric in ("pixel_auroc", "image_auroc"):
                for kind in ("zero_shot", "few_shot", "fused"):
                    mean, spread = mean_and_spread(tables[kind])
                    cells.append(f"{100 * mean['mean'][metric]:.1f} ± {100 * spread['mean'][metric]:.1f}")
            print(f"| {shots} | " + " | ".join(cells) + " |", flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cost(args: argparse.Namespace) -> None:
    grid, width = (37, 37), 768
    sources = ("clip_0", "clip_1", "dino")
    patches = grid[0] * grid[1]
    generator = torch.Generator().manual_seed(0)
    test = {name: F.normalize(torch.randn(1, patches, width, generator=generator), dim=-1) for name in sources}
    print(
        f"\nNearest-patch search per test image at the paper's shape: {patches} patches x 3 sources x {width} "
        f"channels, float32, CPU ({torch.get_num_threads()} threads); chunks of {DISTANCE_CHUNK_ELEMENTS} "
        "similarities.\n"
    )
    print("| k | memory patches per source | memory bank MiB | seconds per image | peak RSS growth MiB |")
    print("|---|---|---|---|---|")
    for shots in args.cost_shots:
        features = {
            name: F.normalize(torch.randn(shots * patches, width, generator=generator), dim=-1) for name in sources
        }
        memory = ReferenceMemory(features, grid, [f"image {i}" for i in range(shots)])
        before = peak_rss_mib()
        memory.few_shot_patch_map(test)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            memory.few_shot_patch_map(test)
            times.append(time.perf_counter() - start)
        growth = peak_rss_mib() - before
        print(
            f"| {shots} | {shots * patches} | {memory.nbytes / 2**20:.0f} | {min(times):.3f} (median "
            f"{float(np.median(times)):.3f}) | {growth:.0f} |",
            flush=True,
        )
        del memory, features


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["accuracy", "cost", "both"], default="both")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--test-good", type=int, default=5)
    parser.add_argument("--cost-shots", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; command: python {' '.join(sys.argv)}\n"
    )
    if args.part in ("accuracy", "both"):
        accuracy(args)
    if args.part in ("cost", "both"):
        cost(args)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
