"""`crane-hf train`: train Crane's prompts on annotated anomaly datasets, on one process or many (accelerate).

    accelerate launch -m crane_hf.train --data /data/mvtec:test --output-dir runs/mvtec
    python -m crane_hf.train --data /data/visa:test --variant crane+ --output-dir runs/visa --cache-features

Defaults are the paper's: Adam, lr 1e-3, betas (0.6, 0.999), batch 8, 5 epochs, S = 518, seed 111, trained on the
*test* split (the zero-shot protocol trains on one dataset's test split and evaluates on the others). Only the
prompts are trained; the CLIP (and DINOv2) backbones stay frozen. The model computes what the published code
computes (the computation the official prompts were trained with); `--eattn-maps per_layer --dattn-input layer_input
--deep-prompt-rounding none` trains the per-layer variant instead. Every epoch writes a prompts-only checkpoint,
`<output-dir>/checkpoint-epoch-N/`; the last one is copied to `<output-dir>/`. A run resumed at an epoch boundary
(`--resume-from-checkpoint latest`) ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..training.options import add_arguments
from .cli_support import HelpFormatter, one_line, run_command


def run(args: argparse.Namespace) -> int:
    """`train`, with errors reported on stderr; the exit code of `crane-hf train` (0 success, 2 error)."""
    from accelerate import PartialState

    from ..data import DatasetLayoutError
    from ..hub_availability import BackboneUnavailableError
    from ..training.checkpoints import CHECKPOINT_PREFIX
    from ..training.feature_cache import FeatureCacheMismatchError
    from ..training.train import TRAINING_LOG, NonFiniteTrainingError, train

    try:
        output_dir = train(args)
    except (
        BackboneUnavailableError,
        DatasetLayoutError,
        FeatureCacheMismatchError,
        NonFiniteTrainingError,
        OSError,  # OutputExistsError, an unwritable output, a full disk, a missing file
        ValueError,
    ) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    if PartialState().is_main_process:
        print(f"Prompts saved in {output_dir} (checkpoints: {CHECKPOINT_PREFIX}N/, log: {TRAINING_LOG}).")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter))
    return run_command(run, parser.parse_args(argv))


__all__ = ["add_arguments", "main", "run"]

if __name__ == "__main__":
    raise SystemExit(main())
