"""`crane-hf convert`: an official Crane prompt checkpoint (.pth) into a crane_hf model folder.

    crane-hf convert --clip openai/clip-vit-large-patch14-336 --dino facebook/dinov2-with-registers-base \
        --variant crane+ --checkpoint trained_on_mvtec_cranep_epoch_5.pth --output crane-plus-mvtec

(also `python -m crane_hf.convert_original ...`). The CLIP fingerprint stored in the checkpoint is checked against
the given CLIP before anything is written; the folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..computation_options import add_computation_arguments, computation_overrides
from ..io.atomic import atomic_output_dir
from ..io.output_safety import check_output_dir, protected_paths
from .cli_support import HelpFormatter, local_path, one_line, run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crane_hf.convert_original", description=__doc__, formatter_class=HelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(run, args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip", type=local_path, required=True, help="CLIP backbone: Hub id or local folder")
    parser.add_argument(
        "--dino", type=local_path, default=None, help="DINOv2 backbone for Crane+: Hub id or local folder"
    )
    parser.add_argument("--checkpoint", required=True, help="official prompt checkpoint, e.g. epoch_5.pth")
    parser.add_argument("--variant", required=True, choices=["crane", "crane+"])
    parser.add_argument("--output", required=True, type=local_path, help="folder to write (save_pretrained layout)")
    parser.add_argument("--image-size", type=int, default=None, help="input side S (default: 518)")
    parser.add_argument("--allow-backbone-mismatch", action="store_true", help="convert despite a CLIP mismatch")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_computation_arguments(parser, "computation saved into the folder (default: the published code's)")


def run(args: argparse.Namespace) -> int:
    from ..models.crane.convert_original import convert_original_checkpoint
    from ..models.crane.image_processing_crane import CraneImageProcessor

    overrides: dict[str, Any] = {}
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    overrides.update(computation_overrides(args))
    try:
        protected = [
            *protected_paths("the checkpoint", [args.checkpoint]),
            *protected_paths("a backbone", [args.clip, args.dino]),
        ]
        check_output_dir(args.output, args.overwrite, protected)
        model = convert_original_checkpoint(
            args.checkpoint,
            args.clip,
            args.dino,
            variant=args.variant,
            allow_backbone_mismatch=args.allow_backbone_mismatch,
            **overrides,
        )
        with atomic_output_dir(args.output, args.overwrite, protected, command="convert") as staging:
            model.save_pretrained(staging)
            CraneImageProcessor.from_crane_config(model.config).save_pretrained(staging)
    except (OSError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"Wrote {args.variant} with the prompts of {args.checkpoint} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
