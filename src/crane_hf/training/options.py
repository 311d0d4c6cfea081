"""The training options and their defaults, the paper's: shared by `crane-hf train`, `python -m crane_hf.train`
(also under `accelerate launch`) and the training loop (`train.py`). Imports nothing heavy, so that `--help` is fast.
"""

from __future__ import annotations

import argparse

from ..commands.cli_support import local_path
from ..computation_options import add_computation_arguments

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
DEFAULT_DINO = "facebook/dinov2-with-registers-base"
FEATURE_CACHE = "feature_cache"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training options (for `crane-hf train` and `python -m crane_hf.train`)."""
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="ROOT[:SPLIT[:CLASSES]]",
        help="one or more datasets (meta.json, MVTec-AD, VisA or generic layout), each with a split (default test, "
        "as the zero-shot protocol) and optionally comma-separated classes",
    )
    parser.add_argument("--clip", type=local_path, default=DEFAULT_CLIP, help="CLIP backbone: Hub id or local folder")
    parser.add_argument(
        "--dino", type=local_path, default=None, help=f"DINOv2 backbone for crane+ (default {DEFAULT_DINO})"
    )
    parser.add_argument("--variant", choices=("crane", "crane+"), default="crane", help="Crane or Crane+ (D-Attn)")
    parser.add_argument(
        "--output-dir", required=True, type=local_path, help="checkpoints and the final prompts go here"
    )
    parser.add_argument("--epochs", type=int, default=5, help="paper: 5")
    parser.add_argument("--batch-size", type=int, default=8, help="images per process and step; paper: 8")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate; paper: 1e-3")
    parser.add_argument("--adam-betas", type=float, nargs=2, default=(0.6, 0.999), help="paper: 0.6 0.999")
    parser.add_argument("--image-size", type=int, default=518, help="input side S; paper: 518")
    parser.add_argument("--seed", type=int, default=111, help="paper: 111")
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="autocast for the forward pass (default: accelerate's configuration, else no)",
    )
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="batches per optimizer step")
    parser.add_argument(
        "--cache-features", action="store_true", help="compute each image's backbone outputs once, on disk"
    )
    parser.add_argument(
        "--feature-cache-dir", type=local_path, help=f"where to cache them (default <output-dir>/{FEATURE_CACHE})"
    )
    parser.add_argument(
        "--keep-feature-cache", action="store_true", help="keep the default cache folder after a successful run"
    )
    parser.add_argument("--resume-from-checkpoint", metavar="PATH|latest", help="continue from a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run")
    parser.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is available")
    parser.add_argument(
        "--report-to", choices=("none", "tensorboard"), default="none", help="TensorBoard logs in <output-dir>/logs"
    )
    parser.add_argument(
        "--allow-no-anomalies",
        action="store_true",
        help="train even when the data has no anomalous image, or no anomalous pixel in any mask (the prompts "
        "would learn that everything is normal; refused without this flag)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="refuse the data if any file under a class folder is not used"
    )
    add_computation_arguments(parser, "computation the prompts are trained with (default: the published code's)")
    return parser
