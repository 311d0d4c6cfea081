"""D-Attn's hard mask in an exported graph: how many mask decisions differ from eager PyTorch, and why.

    python benchmarks/dattn_mask_flips.py --shape paper --images 2     # DINOv2-B/14-reg at S = 518
    python benchmarks/dattn_mask_flips.py --shape tiny --images 8

D-Attn masks the logits A_ij = gamma (sim_ij - beta m) below 0 (published D-Attn). An exported graph computes A from
its own DINOv2 forward, so a logit within rounding of 0 can fall on the other side. This script exports a probe of
the model's D-Attn inputs (`_dino_patch_tokens`, then A computed with the model's operations in float32, and A
computed in float64 from the same float32 DINOv2 tokens), runs it in ONNX Runtime and OpenVINO (float32 inference
precision) and counts, over the off-diagonal entries of every image, the decisions (A_ij < 0) that differ from the
eager model's float32 ones:

- "float32 graph": the similarity and the decision in float32 inside the graph (the export before D-Attn's float64);
- "float64 in graph": the similarity and the mask decision in float64 inside the graph (what the export computes,
  `dino_similarity_attention_float64`);
- "eager tokens, float64": A in float64 from eager's own DINOv2 tokens (eager float32 against exact arithmetic);
- "runtime tokens, torch float32": A computed by PyTorch in float32 from the runtime's tokens (the decisions the
  runtime's DINOv2 alone moves, with eager's own similarity kernels);
- "float64 in graph vs eager float64": the graph's float64 decisions against float64 from eager's tokens (what the
  export's verification compares, `verify_export`);
- "runtime tokens, float64 outside vs eager float64": A in float64 computed by PyTorch from the runtime's float32
  tokens, against float64 from eager's tokens (a graph that stops at the DINOv2 tokens and leaves the mask to the
  caller in float64: what OpenVINO, which has no float64, can do).

Random weights (seeded) as in `benchmarks/inference.py`; random probe images (seeded normal pixel values, as the
export's verification uses).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from inference import _load, build_model, machine_description  # noqa: E402

from crane_hf.models.crane.d_attention import dino_similarity_attention  # noqa: E402


def dattn_logits(tokens: torch.Tensor, beta: float, gamma: float, dtype: torch.dtype) -> torch.Tensor:
    """A = gamma (sim - beta m) [B, M, M] with the operations of `dino_similarity_attention`, in `dtype`."""
    features = F.normalize(tokens.to(dtype), dim=-1)
    similarity = features @ features.transpose(1, 2)
    mean = similarity.mean(dim=(1, 2), keepdim=True)
    return (similarity - mean * beta) * gamma


class DattnProbe(nn.Module):
    """pixel values -> DINOv2 patch tokens, A in float32, A in float64 (from the float32 tokens)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        config = self.model.config
        tokens, _ = self.model._dino_patch_tokens(pixel_values)
        beta, gamma = config.dattn_beta, config.dattn_gamma
        logits32 = dattn_logits(tokens, beta, gamma, torch.float32)
        return tokens, logits32, dattn_logits(tokens, beta, gamma, torch.float64)


def tiny_model() -> nn.Module:
    sys.path.insert(0, os.path.dirname(HERE))
    from tests.tiny_models import tiny_model as build

    return build("crane+")


def off_diagonal_flips(a: np.ndarray, b: np.ndarray) -> int:
    """How many off-diagonal entries of [B, M, M] have (a < 0) != (b < 0)."""
    differ = (a < 0) != (b < 0)
    eye = np.eye(a.shape[-1], dtype=bool)
    return int(differ[:, ~eye].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "small", "paper"], default="tiny")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_description())
    model = tiny_model() if args.shape == "tiny" else build_model(args.shape, "crane+")
    size = model.config.image_size
    config = model.config
    probe = DattnProbe(model).eval()
    pixels = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))
    eager = []
    start = time.perf_counter()
    with torch.inference_mode():
        for image in pixels:
            tokens, a32, a64 = probe(image[None])
            weights = dino_similarity_attention(tokens, config.dattn_beta, config.dattn_gamma)
            eye = torch.eye(weights.shape[-1], dtype=torch.bool)
            # the probe's float32 decisions are the model's own (masked <=> weight exactly 0, off the diagonal)
            assert torch.equal((weights == 0) & ~eye, (a32 < 0) & ~eye)
            eager.append((tokens.numpy(), a32.numpy(), a64.numpy()))
    print(f"shape {args.shape}: S = {size}, M = {eager[0][1].shape[-1]}, {args.images} images; eager "
          f"{time.perf_counter() - start:.1f} s; {_load()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "probe.onnx")
        start = time.perf_counter()
        with torch.no_grad():
            program = torch.onnx.export(
                probe,
                (pixels[:1],),
                dynamo=True,
                opset_version=23,
                input_names=["pixel_values"],
                output_names=["tokens", "logits32", "logits64"],
                optimize=True,
                verbose=False,
            )
        program.save(path, external_data=True)
        print(f"exported in {time.perf_counter() - start:.1f} s; {_load()}")
        import onnxruntime
        import openvino

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        compiled = openvino.Core().compile_model(
            path, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": args.threads}
        )
        engines = {
            "ONNX Runtime": lambda x: session.run(None, {"pixel_values": x}),
            "OpenVINO": lambda x: [np.array(v) for v in compiled({"pixel_values": x}).values()],
        }
        print("\n| engine | tokens max abs diff | tokens max rel diff | A max abs diff (float32) | |A| < 1e-6 "
              "| float32 graph | float64 in graph | eager tokens, float64 "
              "| runtime tokens, torch float32 | float64 in graph vs eager float64 "
              "| runtime tokens, float64 outside vs eager float64 |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        off = None
        for name, run in engines.items():
            counts = np.zeros(6, dtype=np.int64)
            deviations = np.zeros(6)  # largest |A - A_eager| of each way
            token_abs = token_rel = logit_abs = 0.0
            near = 0
            for (tokens, a32, a64), image in zip(eager, pixels):
                r_tokens, r32, r64 = run(image[None].numpy())
                scale = np.abs(tokens).max()
                token_abs = max(token_abs, float(np.abs(r_tokens - tokens).max()))
                token_rel = max(token_rel, float(np.abs(r_tokens - tokens).max() / scale))
                logit_abs = max(logit_abs, float(np.abs(r32 - a32).max()))
                off = ~np.eye(a32.shape[-1], dtype=bool)
                near += int((np.abs(a64[:, off]) < 1e-6).sum())
                torch_from_runtime = dattn_logits(
                    torch.from_numpy(r_tokens), config.dattn_beta, config.dattn_gamma, torch.float32
                ).numpy()
                outside64 = dattn_logits(
                    torch.from_numpy(r_tokens), config.dattn_beta, config.dattn_gamma, torch.float64
                ).numpy()
                ways = (r32, r64, a64, torch_from_runtime)
                against64 = (r64, outside64)
                counts += [off_diagonal_flips(w, a32) for w in ways] + [off_diagonal_flips(w, a64) for w in against64]
                deviations = np.maximum(
                    deviations, [np.abs(way - a32).max() for way in ways] + [np.abs(w - a64).max() for w in against64]
                )
            entries = args.images * int(off.sum())
            cells = " | ".join(f"{c} ({c / entries:.1e}; {d:.1e})" for c, d in zip(counts, deviations))
            print(f"| {name} | {token_abs:.1e} | {token_rel:.1e} | {logit_abs:.1e} | {near} | {cells} |")
        print(f"\n{args.images} images x {int(off.sum())} off-diagonal entries = {entries}; counts of decisions "
              "(A_ij < 0) that differ from eager float32, last two columns from eager float64 (fraction of entries; "
              "largest |A - A_eager|); "
              f"{_load()}")  # fmt: skip


if __name__ == "__main__":
    main()
