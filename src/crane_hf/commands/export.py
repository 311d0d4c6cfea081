"""`crane-hf export`: write a Crane / Crane+ model as an ONNX or OpenVINO folder that runs without PyTorch models.

    crane-hf export crane+/mvtec --format onnx --output crane-plus-onnx/
    crane-hf export my-model/ --format onnx --output my-model-onnx/ --image-size 336 --smoothed-maps

The folder holds the graph (pixel values [batch, 3, S, S] -> anomaly_scores [batch], anomaly_maps [batch, S, S]
and, with --smoothed-maps, smoothed_anomaly_maps), config.json with the thresholds, preprocessor_config.json and
crane_export.json. Before it is written, the exported graph is compared with the model on two probe images: the
scores and every map pixel within --tolerance (default 1e-4; Crane+'s reference decides D-Attn's mask in float64,
as the graph does, see docs/export.md). A larger deviation is an error (exit code 1) and nothing is written.
Needs the optional packages: pip install 'crane-hf[export]'.
"""

from __future__ import annotations

import argparse
import sys

from .cli_support import local_path

# Literal here (equal to exporting.FORMATS and DEFAULT_TOLERANCE, checked by the tests) so that --help loads no torch.
FORMAT_CHOICES = ("onnx", "openvino")
DEFAULT_TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=local_path, help="preset name, model folder or Hub id")
    parser.add_argument("--format", required=True, choices=FORMAT_CHOICES, help="onnx or openvino")
    parser.add_argument("--output", required=True, type=local_path, help="folder to write")
    parser.add_argument("--image-size", type=int, default=None, help="input side S (default: the model's)")
    parser.add_argument(
        "--smoothed-maps", action="store_true", help="also output the maps smoothed with the model's sigma"
    )
    parser.add_argument(
        "--float16-weights", action="store_true", help="openvino: store weights in float16 (verify with --tolerance)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest score and map pixel deviation accepted"
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the comparison with the model")
    parser.add_argument(
        "--clip", type=local_path, default=None, help="local CLIP folder for a preset (instead of the Hub)"
    )
    parser.add_argument(
        "--dino", type=local_path, default=None, help="local DINOv2 folder for a preset (instead of the Hub)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    from ..export.exporting import ExportParityError, export_model
    from ..io.atomic import check_can_write
    from ..io.output_safety import check_not_protected, protected_paths
    from ..model_loading import load_model

    if not args.tolerance >= 0:
        print(f"error: --tolerance must be >= 0, got {args.tolerance}", file=sys.stderr)
        return 2
    # The model folder and the backbones are read, never replaced (refused before anything is loaded).
    protected = [
        *protected_paths("the model folder", [args.model]),
        *protected_paths("a backbone", [args.clip, args.dino]),
    ]
    try:
        check_not_protected(args.output, protected)
        check_can_write(args.output, args.overwrite)
        model, processor = load_model(
            args.model, clip=args.clip, dino=args.dino, device="cpu", dtype="float32", allow_exported=False
        )
        metadata = export_model(
            model,
            args.output,
            format=args.format,
            image_size=args.image_size,
            smoothed_maps=args.smoothed_maps,
            image_processor=processor,
            float16_weights=args.float16_weights,
            verify=not args.no_verify,
            tolerance=args.tolerance,
            overwrite=args.overwrite,
            protected=protected,
        )
    except ExportParityError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    check = metadata.get("verification")
    verified = "; not verified"
    if check:
        verified = (
            f"; deviation from the model: scores {check['max_abs_diff_scores']:.2g}, "
            f"maps {check['max_abs_diff_maps']:.2g} ({check['backend']}, {check['batch']} images)"
        )
    print(f"Exported {metadata['variant']} to {args.output} ({args.format}, {metadata['image_size']} px){verified}")
    return 0
