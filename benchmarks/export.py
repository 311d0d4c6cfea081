"""Exported Crane / Crane+ against eager PyTorch on the CPU: export cost, time per image, memory, parity.

    python benchmarks/export.py --shape paper                      # Crane+ at S = 518, batches 1 and 8
    python benchmarks/export.py --shape paper --variants crane crane+ --engines eager onnxruntime openvino
    python benchmarks/export.py                                    # small shape, quick

Models have random weights (seeded, built as in `benchmarks/inference.py`: CLIP ViT-L/14@336 + DINOv2-B/14-reg at
the paper shape). Every step runs alone in a fresh process, so its peak resident memory (VmHWM) is its own:

- export: `crane_hf.export.export_model` to ONNX (torch.onnx, dynamo, opset 23) and to OpenVINO (the same ONNX
  graph converted by openvino.convert_model), without the built-in verification (parity is measured below);
  "above model" is the peak above the resident memory once the model is built;
- inference: eager `CraneForAnomalyDetection.forward` under `torch.inference_mode`, or the exported folder through
  `ExportedCraneModel.run` (ONNX Runtime or OpenVINO, float32), on the same seeded batch: one warm-up call at
  batch 1, then `--repeats` timed calls at the batch size; "forward MiB" is the peak above the resident memory
  just before the timed calls (the weights excluded). All engines get the same thread count (`--threads`).
- parity: largest absolute difference of the image scores and of the unsmoothed maps against the eager run, and
  of the maps against the eager model with its D-Attn weights in float64 (`float64_dattn`: what the graph computes
  and the export's verification compares with; the same as eager for Crane), with the number of map pixels beyond
  1e-4 from it; "eager mask flips": the D-Attn mask decisions of the eager float32 run that differ from float64's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from inference import SHAPES, _load, _reset_peak_rss, _rss_kib, build_model, machine_description  # noqa: E402

ENGINES = ("eager", "onnxruntime", "openvino", "openvino-f16")
EXPORT_OF = {"onnxruntime": "onnx", "openvino": "openvino", "openvino-f16": "openvino-f16"}
ENGINE_LABELS = {
    "eager": "eager PyTorch",
    "onnxruntime": "ONNX Runtime",
    "openvino": "OpenVINO",
    "openvino-f16": "OpenVINO, float16 weights",
}


def _mib(kib: int) -> float:
    return kib / 1024


def export_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from crane_hf.export import export_model

    torch.set_num_threads(spec["threads"])
    model = build_model(spec["shape"], spec["variant"])
    before = _rss_kib("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    fmt = "openvino" if spec["export"].startswith("openvino") else "onnx"
    export_model(model, spec["folder"], format=fmt, float16_weights=spec["export"] == "openvino-f16", verify=False)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    size = sum(os.path.getsize(os.path.join(spec["folder"], name)) for name in os.listdir(spec["folder"]))
    return {
        "seconds": seconds,
        "peak_rss_mib": _mib(peak),
        "above_model_mib": _mib(peak - before),
        "folder_mib": size / 2**20,
    }


def inference_worker(spec: dict[str, Any]) -> dict[str, Any]:
    threads = spec["threads"]
    torch.set_num_threads(threads)
    size = SHAPES[spec["shape"]]["image_size"]
    pixels = torch.randn(spec["batch"], 3, size, size, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    if spec["engine"] == "eager":
        model = build_model(spec["shape"], spec["variant"])

        def call(x: torch.Tensor) -> dict[str, np.ndarray]:
            with torch.inference_mode():
                output = model(x)
            return {"anomaly_scores": output.anomaly_scores.numpy(), "anomaly_maps": output.anomaly_maps.numpy()}

    else:
        from crane_hf.export import ExportedCraneModel

        backend = "onnxruntime" if spec["engine"] == "onnxruntime" else "openvino"
        runner = ExportedCraneModel(spec["folder"], backend=backend, num_threads=threads)

        def call(x: torch.Tensor) -> dict[str, np.ndarray]:
            return runner.run(x.numpy())

    load_seconds = time.perf_counter() - start
    call(pixels[:1])
    before = _rss_kib("VmRSS")
    _reset_peak_rss()
    seconds, cpu_seconds = [], []
    for _ in range(spec["repeats"]):
        start, start_cpu = time.perf_counter(), time.process_time()
        outputs = call(pixels)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - start_cpu)
    peak = _rss_kib("VmHWM")
    flips = None
    if spec["engine"] == "eager" and model.config.use_dattn:  # the graph's reference: D-Attn in float64
        from crane_hf.models.crane.d_attention import float32_mask_flips, float64_dattn

        with torch.inference_mode(), float64_dattn():
            reference = model(pixels)
            tokens, _ = model._dino_patch_tokens(pixels)
            flips = int(float32_mask_flips(tokens, model.config.dattn_beta, model.config.dattn_gamma).sum())
        outputs["reference_anomaly_scores"] = reference.anomaly_scores.numpy()
        outputs["reference_anomaly_maps"] = reference.anomaly_maps.numpy()
    np.savez(spec["outputs"], **outputs)
    return {
        "eager_float32_mask_flips": flips,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "load_seconds": load_seconds,
        "peak_rss_mib": _mib(peak),
        "forward_mib": _mib(peak - before),
    }


def measure(kind: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one worker in a fresh subprocess and return its JSON result."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} worker {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--variants", nargs="+", choices=["crane", "crane+"], default=["crane+"])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES[:3]))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per configuration")
    parser.add_argument("--threads", type=int, default=2, help="threads of every engine")
    parser.add_argument("--workdir", default=None, help="where the exported folders go (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, spec = args.worker
        spec = json.loads(spec)
        result = (export_worker if kind == "export" else inference_worker)(spec)
        if kind == "inference":  # kept beside the outputs too, so an interrupted run keeps its finished steps
            with open(spec["outputs"].removesuffix(".npz") + ".json", "w", encoding="utf-8") as stream:
                json.dump({**spec, **result}, stream)
        print(json.dumps(result))
        return
    print(machine_description())
    print(f"shape {args.shape}: S = {SHAPES[args.shape]['image_size']}; {args.threads} threads per engine; {_load()}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="crane-export-bench-")
    exports, runs = [], []
    try:
        for variant in args.variants:
            common = {"shape": args.shape, "variant": variant, "threads": args.threads}
            folders = {}
            for engine in args.engines:
                if engine == "eager" or EXPORT_OF[engine] in folders:
                    continue
                name = EXPORT_OF[engine]
                folders[name] = os.path.join(workdir, f"{variant}-{name}")
                shutil.rmtree(folders[name], ignore_errors=True)
                result = measure("export", {**common, "export": name, "folder": folders[name]}, args.timeout)
                exports.append({"variant": variant, "format": name, **result})
                print(f"  export {variant} {name}: {result['seconds']:.1f} s, peak {result['peak_rss_mib']:.0f} MiB; "
                      f"{_load()}", flush=True)  # fmt: skip
            for batch in args.batch_sizes:
                outputs = {}
                for engine in args.engines:
                    outputs[engine] = os.path.join(workdir, f"{variant}-{engine}-{batch}.npz")
                    spec = {**common, "engine": engine, "batch": batch, "repeats": args.repeats,
                            "folder": folders.get(EXPORT_OF.get(engine, "")), "outputs": outputs[engine]}  # fmt: skip
                    result = measure("inference", spec, args.timeout)
                    runs.append({"variant": variant, "engine": engine, "batch": batch, **result})
                    times = ", ".join(f"{s:.2f}" for s in result["seconds"])
                    print(f"  {variant} {engine} batch {batch}: {times} s; {_load()}", flush=True)
                if "eager" in outputs:
                    eager = np.load(outputs["eager"])
                    for run in runs:
                        if run["variant"] == variant and run["batch"] == batch:
                            other = np.load(outputs[run["engine"]])
                            for key in ("anomaly_scores", "anomaly_maps"):
                                run[f"max_abs_diff_{key}"] = float(np.abs(other[key] - eager[key]).max())
                            reference = eager.get("reference_anomaly_maps", eager["anomaly_maps"])
                            difference = np.abs(other["anomaly_maps"] - reference)
                            run["max_abs_diff_maps_float64_dattn"] = float(difference.max())
                            run["map_pixels_beyond_1e-4_float64_dattn"] = int((difference > 1e-4).sum())
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nExport ({_load()} at the end):")
    print("| model | format | export s | peak RSS MiB | above the built model MiB | folder MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for e in exports:
        print(f"| {e['variant']} | {e['format']} | {e['seconds']:.1f} | {e['peak_rss_mib']:.0f} "
              f"| {e['above_model_mib']:.0f} | {e['folder_mib']:.0f} |")  # fmt: skip
    print("\nInference (s/image: best timed call / batch; x eager: this over eager's at the same batch):")
    print("| model | engine | batch | s/image best | x eager | CPU-s/image | load s | peak RSS MiB | forward MiB "
          "| max abs diff scores | max abs diff maps | maps vs float64 D-Attn | pixels > 1e-4 | eager mask flips "
          "|")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    best = {(r["variant"], r["engine"], r["batch"]): min(r["seconds"]) / r["batch"] for r in runs}
    for r in runs:
        per_image = best[(r["variant"], r["engine"], r["batch"])]
        eager = best.get((r["variant"], "eager", r["batch"]))
        ratio = f"{per_image / eager:.2f}" if eager else ""
        keys = ("max_abs_diff_anomaly_scores", "max_abs_diff_anomaly_maps", "max_abs_diff_maps_float64_dattn")
        diffs = [r.get(key) for key in keys]
        cells = ["" if d is None or r["engine"] == "eager" else f"{d:.1e}" for d in diffs]
        cells.append("" if r["engine"] == "eager" else str(r.get("map_pixels_beyond_1e-4_float64_dattn", "")))
        flips = r.get("eager_float32_mask_flips")
        cells.append("" if flips is None else str(flips))
        print(f"| {r['variant']} | {ENGINE_LABELS[r['engine']]} | {r['batch']} | {per_image:.3f} | {ratio} "
              f"| {min(r['cpu_seconds']) / r['batch']:.2f} | {r['load_seconds']:.1f} | {r['peak_rss_mib']:.0f} "
              f"| {r['forward_mib']:.0f} | {' | '.join(cells)} |")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump({"exports": exports, "runs": runs, "machine": machine_description()}, stream, indent=2)


if __name__ == "__main__":
    main()
