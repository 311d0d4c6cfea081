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

Each configuration runs alone in a fresh process (one warm-up call at batch 1, then `--repeats` timed calls), then
the floor and Crane rows of a variant alternate in one process (`--interleave` rounds). The table's ratios use the
best (minimum) time over all timed calls; the median is shown beside it. Memory: "peak RSS" is the
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from materialized_attention import materialized_attention  # noqa: E402

from crane_hf import CraneConfig, CraneForAnomalyDetection  # noqa: E402
from crane_hf.models.crane.configuration_crane import CLIP_VIT_L14_336, DINOV2_REG_B14  # noqa: E402
from crane_hf.models.crane.gaussian_smoothing import gaussian_smooth  # noqa: E402

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
ROWS = (
    "floor-clip",
    "floor-clip+dino",
    "crane",
    "crane+",
    "crane-materialized",
    "crane+-materialized",
    "crane-compiled",
    "crane+-compiled",
)
ROW_LABELS = {
    "floor-clip": "floor: CLIP vision",
    "floor-clip+dino": "floor: CLIP vision + DINOv2",
    "crane": "Crane",
    "crane+": "Crane+",
    "crane-materialized": "Crane, materialized attn",
    "crane+-materialized": "Crane+, materialized attn",
    "crane-compiled": "Crane, torch.compile",
    "crane+-compiled": "Crane+, torch.compile",
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

    With C the CLIP width, I its MLP width, T = N + 1 tokens, a CLIP layer costs 8TC^2 (q, k, v, output
    projections) + 4TCI (MLP) + 4T^2C (q k^T and weights @ v). Keys:
    "clip": patch embedding + L layers + projection (the floor's CLIP vision tower);
    "dino": the DINOv2 forward (same formula with its width, MLP and T = M + 1 + registers);
    "eattn": per E-Attn layer, pairs x 4T^2C for the self-correlation attentions + 2TC^2 for the e stream's
        output projection;
    "last_layer": what the class-token-only last layer saves (negative): CLIP's attention output, output
        projection and MLP for the N patch tokens, N (4TC + 2C^2 + 4CI); only the MLP, N 4CI, when D-Attn reads
        that layer's o stream after its attention (dattn_input "after_attention");
    "dattn": the M x M DINOv2 similarity once (2M^2 C_dino), then per feature layer weights @ values (2M^2 C) and
        the output projection (2MC^2); the values are the layer's own v projection, reused with dattn_input
        "layer_input", computed again (2TC^2) from the o stream after attention with "after_attention";
    "heads": visual projection of every distinct map (2NCD) and the patch logits (4ND): one map for Crane with
        eattn_map_source "last_layer" (its four maps are the final e stream).
    Text features are cached: no per-image cost.
    """
    vision = config.clip_config.vision_config
    c, layers, inner, patch = vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size, vision.patch_size
    n = (size // patch) ** 2
    t = n + 1
    projection = config.clip_config.projection_dim
    per_layer = 8 * t * c * c + 4 * t * c * inner + 4 * t * t * c
    flops = {"clip": 2 * n * 3 * patch * patch * c + layers * per_layer + 2 * c * projection}
    pairs = {"qq+kk+vv": 3, "qq+kk": 2, "qq": 1, "kk": 1, "vv": 1}.get(config.eattn_type)
    # "(q+k+v)^2": q k^T over 3C-wide keys, then the values zero-padded to 3C (fused kernel): 6T^2C + 6T^2C
    self_attention = pairs * 4 * t * t * c if pairs else 12 * t * t * c
    flops["eattn"] = config.eattn_layers * (self_attention + 2 * t * c * c)
    after_attention = config.use_dattn and config.dattn_input == "after_attention"
    keeps_attention = after_attention and layers in config.feature_layers
    flops["last_layer"] = 0
    if config.eattn_layers > 0:
        flops["last_layer"] = -n * 4 * c * inner if keeps_attention else -n * (4 * t * c + 2 * c * c + 4 * c * inner)
    distinct_maps = max(config.map_slots) + 1
    flops["heads"] = distinct_maps * (2 * n * c * projection + 4 * n * projection)
    flops["dino"] = flops["dattn"] = 0
    if config.use_dattn:
        dino = config.dino_config
        w, dino_layers, dino_patch = dino.hidden_size, dino.num_hidden_layers, dino.patch_size
        m = (size // dino_patch) ** 2
        td = m + 1 + getattr(dino, "num_register_tokens", 0)
        mlp = int(w * dino.mlp_ratio)
        dino_layer = 8 * td * w * w + 4 * td * w * mlp + 4 * td * td * w
        flops["dino"] = 2 * m * 3 * dino_patch**2 * w + dino_layers * dino_layer
        values = 2 * t * c * c if after_attention else 0
        flops["dattn"] = 2 * m * m * w + len(config.feature_layers) * (2 * m * m * c + 2 * m * c * c + values)
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


def _crane_forward(model: torch.nn.Module, pixel_values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Scores and maps from pixels: the forward (without its input scan on meta tensors) and the smoothing."""
    if pixel_values.device.type == "meta":
        image_embeds, features, grid = model.encode_image(pixel_values)
        output = model.forward_from_features(image_embeds, features, grid, tuple(pixel_values.shape[-2:]))
    else:
        output = model(pixel_values)
    return gaussian_smooth(output.anomaly_maps, sigma) if sigma else output.anomaly_maps


def workload(
    row: str, model: CraneForAnomalyDetection
) -> tuple[Callable[[torch.Tensor], Any], Callable[[], contextlib.AbstractContextManager]]:
    """The callable pixels -> result of a table row on `model` (of the row's variant), and its context factory."""
    if row.startswith("floor"):
        return (lambda x: _floor_forward(model, x)), contextlib.nullcontext
    runner = torch.compile(model) if row.endswith("compiled") else model
    context = materialized_attention if row.endswith("materialized") else contextlib.nullcontext
    return (lambda x: _crane_forward(runner, x, SMOOTHING_SIGMA)), context


def variant_of(row: str) -> str:
    return "crane+" if "+" in row else "crane"


@dataclass
class Measurement:
    row: str
    batch: int
    precision: str
    seconds: list[float]
    cpu_seconds: list[float]
    peak_rss_mib: float | None  # None: timed in an interleaved process, memory not attributable
    forward_mib: float | None
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


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))


def _timed_call(call: Callable[[torch.Tensor], Any], pixels: torch.Tensor, cuda: bool) -> tuple[float, float]:
    """Wall and process CPU seconds of one call."""
    if cuda:
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    call(pixels)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def run_worker(spec: dict[str, Any]) -> list[Measurement]:
    """Configurations in this (fresh) process, one model for all its rows (all of one variant).

    Each row gets a warm-up call at batch 1 (for compiled rows the compilation, and a call at the batch size).
    Then `repeats` rounds, each timing one call of every row in turn: interleaving spreads a varying machine load
    over all rows alike. With a single row, the peak memory of its calls is measured too.
    """
    device = torch.device(spec["device"])
    rows = spec["rows"]
    model = build_model(spec["shape"], variant_of(rows[0]), device)
    calls = {row: workload(row, model) for row in rows}
    size = SHAPES[spec["shape"]]["image_size"]
    pixels = torch.randn(spec["batch"], 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    cuda = device.type == "cuda"
    build_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _rss_kib("VmRSS") * 1024
    times: dict[str, list[tuple[float, float]]] = {row: [] for row in rows}
    with torch.inference_mode(), _autocast(device, spec["precision"]):
        for row, (call, context) in calls.items():
            with context():
                call(pixels[:1])
                if row.endswith("compiled"):
                    call(pixels)
        for _ in range(spec["repeats"]):
            for row, (call, context) in calls.items():
                with context():
                    times[row].append(_timed_call(call, pixels, cuda))
    peak_mib = forward_mib = None
    if len(rows) == 1:
        if cuda:
            peak = total_peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kib("VmHWM") * 1024
            total_peak = max(peak, build_peak_kib * 1024)
        peak_mib, forward_mib = total_peak / 2**20, (peak - before) / 2**20
    results = []
    for row, timed in times.items():
        wall, cpu = [t[0] for t in timed], [t[1] for t in timed]
        batch, precision = spec["batch"], spec["precision"]
        results.append(Measurement(row, batch, precision, wall, cpu, peak_mib, forward_mib, str(device)))
    return results


def measure(spec: dict[str, Any], timeout: float) -> list[Measurement]:
    """Run one worker in a fresh subprocess."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{result.stderr[-3000:]}")
    return [Measurement(**item) for item in json.loads(result.stdout.strip().splitlines()[-1])]


def merge_rounds(results: list[Measurement]) -> list[Measurement]:
    """One measurement per configuration: all its timed calls pooled, the largest measured peak kept."""
    merged: dict[tuple, Measurement] = {}
    for r in results:
        key = (r.row, r.batch, r.precision)
        if key not in merged:
            merged[key] = Measurement(**asdict(r))
            continue
        m = merged[key]
        m.seconds += r.seconds
        m.cpu_seconds += r.cpu_seconds
        for field in ("peak_rss_mib", "forward_mib"):
            values = [v for v in (getattr(m, field), getattr(r, field)) if v is not None]
            setattr(m, field, max(values) if values else None)
    return list(merged.values())


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
    """Best (minimum) wall time per image over all timed calls, its ratio to the row's floor, CPU time, memory."""
    best = {(r.row, r.batch, r.precision): min(r.seconds) / r.batch for r in results}
    best_cpu = {(r.row, r.batch, r.precision): min(r.cpu_seconds) / r.batch for r in results}
    by_key = {(r.row, r.batch, r.precision): r for r in results}
    print(
        "| model | batch | precision | timed calls | s/image best | s/image median | images/s | x floor "
        "| GFLOP/s | CPU-s/image | x floor, CPU | peak RSS MiB | forward MiB | materialized / this, forward MiB |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        key = (r.row, r.batch, r.precision)
        base = r.row.replace("-materialized", "").replace("-compiled", "")
        floor_key = (FLOOR_OF.get(base, ""), r.batch, r.precision)
        ratio = f"{best[key] / best[floor_key]:.3f}" if floor_key in best else ""
        cpu_ratio = f"{best_cpu[key] / best_cpu[floor_key]:.3f}" if floor_key in best else ""
        gflop = flops.get(variant_of(r.row), {}).get("floor" if "floor" in r.row else "model")
        rate = f"{gflop / best[key] / 1e9:.0f}" if gflop else ""
        materialized = by_key.get((f"{base}-materialized", r.batch, r.precision))
        memory = ""
        if materialized and materialized is not r and r.forward_mib and materialized.forward_mib:
            memory = f"{materialized.forward_mib / r.forward_mib:.1f}x"
        peak = f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib is not None else ""
        forward = f"{r.forward_mib:.0f}" if r.forward_mib is not None else ""
        print(
            f"| {ROW_LABELS[r.row]} | {r.batch} | {r.precision} | {len(r.seconds)} | {best[key]:.3f} "
            f"| {statistics.median(r.seconds) / r.batch:.3f} | {1 / best[key]:.3f} | {ratio} | {rate} "
            f"| {best_cpu[key]:.2f} | {cpu_ratio} | {peak} | {forward} | {memory} |"
        )


def print_flops(shape: str) -> dict[str, dict[str, float]]:
    size = SHAPES[shape]["image_size"]
    print(f"\nFLOPs per image at S = {size} (multiply-add = 2; GFLOP):")
    print("| variant | CLIP | DINOv2 | E-Attn extra | last layer, class token only | D-Attn | heads | analytic total "
          "| counted model | counted floor | analytic / floor | counted / floor |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    counted_all = {}
    for variant in ("crane", "crane+"):
        parts = analytic_flops(build_config(shape, variant), size)
        total = sum(parts.values())
        floor = parts["clip"] + parts["dino"]
        counted = counted_flops(shape, variant)
        counted_all[variant] = counted
        cells = [parts[key] for key in ("clip", "dino", "eattn", "last_layer", "dattn", "heads")] + [total]
        cells += [counted["model"], counted["floor"]]
        print(
            f"| {variant} | "
            + " | ".join(f"{value / 1e9:.1f}" for value in cells)
            + f" | {total / floor:.3f} | {counted['model'] / counted['floor']:.3f} |"
        )
    return counted_all


def print_smoothing(shape: str, batch: int, device: torch.device) -> None:
    """Gaussian smoothing of a batch of maps: batched on the model's device vs scipy one map at a time."""
    from scipy.ndimage import gaussian_filter

    size = SHAPES[shape]["image_size"]
    maps = torch.rand(batch, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    timings = {}
    for name, run in (
        ("torch, batched, on the maps' device", lambda: gaussian_smooth(maps, SMOOTHING_SIGMA)),
        ("scipy, one map at a time (published code)",
         lambda: [gaussian_filter(m, sigma=SMOOTHING_SIGMA) for m in maps.cpu().numpy()]),
    ):  # fmt: skip
        run()
        start = time.perf_counter()
        for _ in range(3):
            run()
        timings[name] = (time.perf_counter() - start) / 3
    difference = (gaussian_smooth(maps, SMOOTHING_SIGMA).cpu() - torch.from_numpy(
        gaussian_filter(maps.cpu().numpy(), sigma=(0, SMOOTHING_SIGMA, SMOOTHING_SIGMA)))).abs().max()  # fmt: skip
    print(f"\nGaussian smoothing (sigma {SMOOTHING_SIGMA}) of {batch} maps of {size} x {size}:")
    for name, seconds in timings.items():
        print(f"  {name}: {seconds * 1e3:.1f} ms")
    print(f"  largest difference torch vs scipy: {difference:.1e}")


def print_precision(shape: str, batch: int, device: torch.device, precisions: list[str]) -> None:
    """Scores and smoothed maps under autocast against float32, same weights and images."""
    size = SHAPES[shape]["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3)).to(device)
    print(f"\nPrecision against float32 ({batch} random images, random weights, smoothed maps):")
    print("| model | autocast | max abs score diff | max abs map diff | mean abs map diff | s/image |")
    print("|---|---|---:|---:|---:|---:|")
    for variant in ("crane", "crane+"):
        model = build_model(shape, variant, device)
        results = {}
        for precision in ["float32", *precisions]:
            with torch.inference_mode(), _autocast(device, precision):
                model(pixels[:1])
                start = time.perf_counter()
                output = model(pixels)
                results[precision] = (
                    output.anomaly_scores.float(),
                    gaussian_smooth(output.anomaly_maps, SMOOTHING_SIGMA).float(),
                    (time.perf_counter() - start) / batch,
                )
        scores, maps, _ = results["float32"]
        for precision, (other_scores, other_maps, seconds) in results.items():
            map_diff = (other_maps - maps).abs()
            print(
                f"| {variant} | {precision} | {(other_scores - scores).abs().max():.1e} | {map_diff.max():.1e} "
                f"| {map_diff.mean():.1e} | {seconds:.3f} |"
            )
        del model


def print_profile(row: str, shape: str, batch: int, device: torch.device, limit: int = 20) -> None:
    """torch.profiler: where the time of one call goes, operator by operator (self time)."""
    from torch.profiler import ProfilerActivity, profile

    call, context = workload(row, build_model(shape, variant_of(row), device))
    size = SHAPES[shape]["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), context():
        call(pixels[:1])
        with profile(activities=activities, record_shapes=True) as profiler:
            call(pixels)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nProfile of {ROW_LABELS[row]}, batch {batch}, {_load()}:")
    print(profiler.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=limit, max_name_column_width=48, max_shapes_column_width=60))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=1, help="timed calls of each configuration alone")
    parser.add_argument("--interleave", type=int, default=2, metavar="ROUNDS",
                        help="then time the floor and Crane rows of each variant alternately in one process, ROUNDS "
                        "times (materialized rows excluded; 0: skip)")  # fmt: skip
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS[:6]))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", choices=["float32", "bfloat16", "float16"], default=None,
                        help="autocast dtypes (default: float32 on CPU; all three on CUDA)")  # fmt: skip
    parser.add_argument("--precision-check", type=int, metavar="BATCH", default=0,
                        help="also compare scores and maps under autocast with float32 on BATCH images")  # fmt: skip
    parser.add_argument("--profile", choices=ROWS, nargs="*", metavar="ROW", help="profile these rows (batch: last)")
    parser.add_argument("--skip-table", action="store_true", help="only the FLOPs, smoothing, precision, profiles")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps([asdict(m) for m in run_worker(json.loads(args.worker))]))
        return
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precisions = args.precisions or (["float32", "bfloat16", "float16"] if cuda else ["float32"])
    print(machine_description())
    print(f"shape {args.shape}: S = {SHAPES[args.shape]['image_size']}; {_load()}")
    flops = print_flops(args.shape)
    print_smoothing(args.shape, max(args.batch_sizes), device)
    if args.precision_check:
        checked = [p for p in precisions if p != "float32"] or ["bfloat16"]
        print_precision(args.shape, args.precision_check, device, checked)
    for row in args.profile or []:
        print_profile(row, args.shape, max(args.batch_sizes), device)
    if args.skip_table:
        return
    print(f"\nTimed: each configuration alone in a fresh process ({args.repeats} call(s), peak memory), then "
          f"{args.interleave} interleaved round(s) of the rows of each variant in one process")  # fmt: skip
    results = []

    def run(spec: dict[str, Any]) -> None:
        for result in measure(spec, args.timeout):
            results.append(result)
            seconds = ", ".join(f"{s:.2f}" for s in result.seconds)
            print(f"  {result.row} batch {result.batch} {result.precision}: {seconds} s; {_load()}", flush=True)

    common = {"shape": args.shape, "device": args.device}
    for batch in args.batch_sizes:
        for precision in precisions:
            for row in args.rows:
                run({**common, "rows": [row], "batch": batch, "precision": precision, "repeats": args.repeats})
    interleaved = [row for row in args.rows if not row.endswith("materialized")]
    groups = [[row for row in interleaved if variant_of(row) == variant] for variant in ("crane", "crane+")]
    for batch in args.batch_sizes:
        for precision in precisions:
            for rows in groups:
                if args.interleave and len(rows) > 1:
                    run({**common, "rows": rows, "batch": batch, "precision": precision, "repeats": args.interleave})
    results = merge_rounds(results)
    print()
    print_table(results, flops)
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(r) for r in results], out, indent=1)


if __name__ == "__main__":
    main()
