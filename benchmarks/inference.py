"""Inference cost of Crane and Crane+ against their backbones: time, throughput, peak memory, FLOPs, precision.

    python benchmarks/inference.py                          # small shape, quick (a few minutes on 2 cores)
    python benchmarks/inference.py --shape paper --repeats 1  # CLIP ViT-L/14@336 + DINOv2-B/14-reg at S = 518

Rows (random weights; each configuration runs in a fresh subprocess so that its peak memory is its own):
    floor CLIP            transformers' CLIP vision tower (SDPA) on the input, plus the visual projection
    floor CLIP + DINOv2   the same plus transformers' DINOv2 forward on the same input (the Crane+ floor)
    Crane / Crane+        CraneForAnomalyDetection.forward under torch.inference_mode, then Gaussian smoothing
                          (sigma 4) of the maps on the model's device: everything between pixels and results
    ... materialized      the same model with E-Attn / D-Attn attention matrices materialized as the published
                          code does (`benchmarks/materialized_attention.py`)

Time is the median over `--repeats` timed calls after one warm-up call at batch 1. Memory: "peak RSS" is the
process's peak resident set (weights included); "forward MiB" is the peak above the resident set just before the
first forward (VmHWM reset through /proc/self/clear_refs), i.e. what inference itself needs. On CUDA the same is
taken from torch.cuda's allocator statistics, and bf16 / fp16 autocast rows are added.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from materialized_attention import materialized_attention  # noqa: E402

from crane_hf import CraneConfig, CraneForAnomalyDetection  # noqa: E402
from crane_hf.configuration_crane import CLIP_VIT_L14_336, DINOV2_REG_B14  # noqa: E402
from crane_hf.gaussian_smoothing import gaussian_smooth  # noqa: E402

# The paper's backbones at S = 518, and a narrower pair for quick runs (ViT-B/14 width CLIP, DINOv2-S/14-reg).
SMALL_CLIP = {
    "projection_dim": 512,
    "text_config": {**CLIP_VIT_L14_336["text_config"], "hidden_size": 512, "intermediate_size": 2048,
                    "num_attention_heads": 8, "projection_dim": 512},
    "vision_config": {**CLIP_VIT_L14_336["vision_config"], "hidden_size": 768, "intermediate_size": 3072,
                      "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "projection_dim": 512},
}  # fmt: skip
SMALL_DINO = {**DINOV2_REG_B14, "hidden_size": 384, "num_attention_heads": 6, "image_size": 224}
SHAPES: dict[str, dict[str, Any]] = {
    "small": {"clip": SMALL_CLIP, "dino": SMALL_DINO, "image_size": 224},
    "paper": {"clip": CLIP_VIT_L14_336, "dino": DINOV2_REG_B14, "image_size": 518},
}
ROWS = ("floor-clip", "floor-clip+dino", "crane", "crane+", "crane-materialized", "crane+-materialized")
ROW_LABELS = {
    "floor-clip": "floor: CLIP vision",
    "floor-clip+dino": "floor: CLIP vision + DINOv2",
    "crane": "Crane",
    "crane+": "Crane+",
    "crane-materialized": "Crane, materialized attn",
    "crane+-materialized": "Crane+, materialized attn",
}
FLOOR_OF = {"crane": "floor-clip", "crane+": "floor-clip+dino"}
SMOOTHING_SIGMA = 4.0


def build_config(shape: str, variant: str) -> CraneConfig:
    spec = SHAPES[shape]
    return CraneConfig.for_variant(
        variant, spec["clip"], spec["dino"] if variant == "crane+" else None, image_size=spec["image_size"]
    )


def build_model(shape: str, variant: str, device: str | torch.device = "cpu") -> CraneForAnomalyDetection:
    """Crane or Crane+ at `shape` with random weights (seeded), in eval mode."""
    torch.manual_seed(0)
    with torch.device(device):
        model = CraneForAnomalyDetection(build_config(shape, variant))
    return model.eval()


# ---------------------------------------------------------------------------------------------------- FLOPs
def analytic_flops(config: CraneConfig, size: int) -> dict[str, float]:
    """FLOPs per image (a multiply-add counts 2) of the matrix products, derived from the architecture.

    Keys: "clip" (the floor's CLIP vision tower), "dino" (its DINOv2 forward), "eattn" (the E-Attn stream's extra
    attentions and output projections), "dattn" (D-Attn similarity, weighted values, output projection) and
    "heads" (post-LayerNorm projection of every map, patch and image logits). Text features are cached: 0.
    """
    vision = config.clip_config.vision_config
    c, layers, inner, patch = vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size, vision.patch_size
    n = (size // patch) ** 2
    t = n + 1
    per_layer = 8 * t * c * c + 4 * t * c * inner + 4 * t * t * c  # q, k, v, out; MLP; q k^T and weights @ v
    flops = {"clip": 2 * n * 3 * patch * patch * c + layers * per_layer + 2 * c * config.clip_config.projection_dim}
    pairs = {"qq+kk+vv": 3, "qq+kk": 2, "qq": 1, "kk": 1, "vv": 1}.get(config.eattn_type)
    self_attention = pairs * 4 * t * t * c if pairs else 8 * t * t * c  # "(q+k+v)^2": 3c-wide keys, then v
    flops["eattn"] = config.eattn_layers * (self_attention + 2 * t * c * c)
    projection = config.clip_config.projection_dim
    flops["heads"] = config.num_maps * (2 * n * c * projection + 2 * n * projection * 2) + 2 * projection * 2
    flops["dino"] = flops["dattn"] = 0
    if config.use_dattn:
        dino = config.dino_config
        w, dl, dp = dino.hidden_size, dino.num_hidden_layers, dino.patch_size
        m = (size // dp) ** 2
        td = m + 1 + getattr(dino, "num_register_tokens", 0)
        mlp = int(w * dino.mlp_ratio)
        flops["dino"] = 2 * m * 3 * dp * dp * w + dl * (8 * td * w * w + 4 * td * w * mlp + 4 * td * td * w)
        flops["dattn"] = len(config.feature_layers) * (2 * m * m * w + 2 * m * m * c + 2 * m * c * c)
    return flops


def counted_flops(shape: str, variant: str) -> dict[str, float]:
    """FLOPs per image counted by torch.utils.flop_counter on meta tensors (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(shape, variant, device="meta")
    size = model.config.image_size
    pixels = torch.zeros(1, 3, size, size, device="meta")
    counts = {}
    with torch.inference_mode():
        model.static_text_embeds()  # cached once, not per image
        for name, run in (
            ("model", lambda: _crane_forward(model, pixels, sigma=0)),
            ("floor", lambda: _floor_forward(model, pixels)),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                run()
            counts[name] = counter.get_total_flops()
    return counts


# ---------------------------------------------------------------------------------------------------- workloads
def _floor_forward(model: CraneForAnomalyDetection, pixel_values: torch.Tensor) -> torch.Tensor:
    vision = model.clip.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True)
    embeds = model.clip.visual_projection(vision.pooler_output)
    if model.dino is not None:
        model.dino(pixel_values=pixel_values)
    return embeds


def _crane_forward(model: CraneForAnomalyDetection, pixel_values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Scores and maps from pixels: the forward (without its input scan on meta tensors) and the smoothing."""
    if pixel_values.device.type == "meta":
        image_embeds, features, grid = model.encode_image(pixel_values)
        output = model.forward_from_features(image_embeds, features, grid, tuple(pixel_values.shape[-2:]))
    else:
        output = model(pixel_values)
    return gaussian_smooth(output.anomaly_maps, sigma) if sigma else output.anomaly_maps


@dataclass
class Measurement:
    row: str
    batch: int
    precision: str
    seconds: list[float]
    peak_rss_mib: float
    forward_mib: float
    device: str


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def run_worker(spec: dict[str, Any]) -> Measurement:
    """One configuration in this (fresh) process: warm-up at batch 1, then `repeats` timed calls."""
    device = torch.device(spec["device"])
    variant = "crane+" if spec["row"] in ("crane+", "crane+-materialized", "floor-clip+dino") else "crane"
    model = build_model(spec["shape"], variant, device)
    size = model.config.image_size
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(spec["batch"], 3, size, size, generator=generator).to(device)
    if spec["row"].startswith("floor"):

        def call(x):
            return _floor_forward(model, x)
    else:

        def call(x):
            return _crane_forward(model, x, SMOOTHING_SIGMA)

    materialized = materialized_attention() if spec["row"].endswith("materialized") else contextlib.nullcontext()
    autocast = (
        torch.autocast(device.type, dtype=getattr(torch, spec["precision"]))
        if spec["precision"] != "float32"
        else contextlib.nullcontext()
    )
    cuda = device.type == "cuda"
    build_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _rss_kib("VmRSS") * 1024
    seconds = []
    with torch.inference_mode(), materialized, autocast:
        call(pixels[:1])
        for _ in range(spec["repeats"]):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            call(pixels)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        total_peak = peak
    else:
        peak = _rss_kib("VmHWM") * 1024
        total_peak = max(peak, build_peak_kib * 1024)
    return Measurement(spec["row"], spec["batch"], spec["precision"], seconds, total_peak / 2**20,
                       (peak - before) / 2**20, str(device))  # fmt: skip


def measure(spec: dict[str, Any], timeout: float) -> Measurement:
    """Run one configuration in a fresh subprocess."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{result.stderr[-3000:]}")
    return Measurement(**json.loads(result.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------------------------------- reports
def _load() -> str:
    load = os.getloadavg()
    return f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        cpu = names[0] if names else cpu
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available on this machine"
    return (
        f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"CUDA: {cuda}"
    )


def print_table(results: list[Measurement], flops: dict[str, dict[str, float]]) -> None:
    by_key = {(r.row, r.batch, r.precision): r for r in results}
    header = (
        f"| {'model':<28} | batch | precision | s/image | images/s | x floor | GFLOP/s | peak RSS MiB "
        "| forward MiB | materialized / this memory |"
    )
    print(header)
    print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    for r in results:
        per_image = statistics.median(r.seconds) / r.batch
        base = r.row.replace("-materialized", "")
        floor = by_key.get((FLOOR_OF.get(base, ""), r.batch, r.precision))
        ratio = f"{per_image / (statistics.median(floor.seconds) / floor.batch):.2f}" if floor else ""
        gflop = flops.get("crane+" if "+" in r.row else "crane", {}).get("floor" if "floor" in r.row else "model")
        rate = f"{gflop / per_image / 1e9:.0f}" if gflop else ""
        materialized = by_key.get((f"{r.row}-materialized", r.batch, r.precision))
        memory = f"{materialized.forward_mib / r.forward_mib:.1f}x" if materialized and r.forward_mib > 0 else ""
        print(
            f"| {ROW_LABELS[r.row]:<28} | {r.batch:>5} | {r.precision:<9} | {per_image:7.3f} | {1 / per_image:8.2f} "
            f"| {ratio:>7} | {rate:>7} | {r.peak_rss_mib:12.0f} | {r.forward_mib:11.0f} | {memory:>26} |"
        )


def print_flops(shape: str) -> dict[str, dict[str, float]]:
    size = SHAPES[shape]["image_size"]
    print(f"\nFLOPs per image at S = {size} (multiply-add = 2; GFLOP):")
    print("| variant | CLIP | DINOv2 | E-Attn extra | D-Attn | heads | analytic total | counted model "
          "| counted floor | analytic / floor | counted / floor |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    counted_all = {}
    for variant in ("crane", "crane+"):
        parts = analytic_flops(build_config(shape, variant), size)
        total = sum(parts.values())
        floor = parts["clip"] + parts["dino"]
        counted = counted_flops(shape, variant)
        counted_all[variant] = counted
        cells = [parts[key] for key in ("clip", "dino", "eattn", "dattn", "heads")] + [total]
        cells += [counted["model"], counted["floor"]]
        print(
            f"| {variant} | "
            + " | ".join(f"{value / 1e9:.1f}" for value in cells)
            + f" | {total / floor:.3f} | {counted['model'] / counted['floor']:.3f} |"
        )
    return counted_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (median reported)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", choices=["float32", "bfloat16", "float16"], default=None,
                        help="autocast dtypes (default: float32 on CPU; all three on CUDA)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asdict(run_worker(json.loads(args.worker)))))
        return
    precisions = args.precisions or (["float32", "bfloat16", "float16"] if args.device == "cuda" else ["float32"])
    print(machine_description())
    print(f"shape {args.shape}: S = {SHAPES[args.shape]['image_size']}, {args.repeats} timed call(s); {_load()}")
    flops = print_flops(args.shape)
    results = []
    for batch in args.batch_sizes:
        for precision in precisions:
            for row in args.rows:
                spec = {"row": row, "batch": batch, "precision": precision, "shape": args.shape,
                        "repeats": args.repeats, "device": args.device}  # fmt: skip
                result = measure(spec, args.timeout)
                results.append(result)
                seconds = ", ".join(f"{s:.2f}" for s in result.seconds)
                print(f"  measured {row} batch {batch} {precision}: {seconds} s per batch; {_load()}", flush=True)
    print()
    print_table(results, flops)
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(r) for r in results], out, indent=1)


if __name__ == "__main__":
    main()
