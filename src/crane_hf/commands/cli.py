"""The `crane-hf` command: predict, calibrate, convert, push, demo, train, evaluate, export, app.

Each command lives in its own module of this folder with `add_arguments(parser)` and `run(args) -> exit code`; this
module only dispatches. The command modules import nothing heavy at module level (torch, transformers, datasets and
accelerate are imported by `run`), so `crane-hf --help` and `crane-hf COMMAND --help` answer at once.
Commands run through `cli_support.run_command` (one-line errors, SIGINT/SIGTERM). Exit codes: 0 success, 2 an
argument, input, model or output refused, 3 finished but some inputs were skipped, 130/143 interrupted, 1 a bug
(`cli_support.py`, `crane-hf --help`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .cli_support import EXIT_CODES_HELP, HelpFormatter, OneLineArgumentParser, run_command

COMMANDS = {
    "predict": ("crane_hf.commands.predict", "score images: CSV/JSON table and heatmap overlays"),
    "calibrate": ("crane_hf.commands.calibrate", "set a model folder's thresholds from normal images"),
    "convert": ("crane_hf.commands.convert", "convert an official Crane checkpoint (.pth)"),
    "push": ("crane_hf.commands.push", "publish a model folder to the Hub (or --dry-run to a folder)"),
    "train": ("crane_hf.commands.train", "train the prompts on an annotated dataset (also under accelerate launch)"),
    "evaluate": ("crane_hf.commands.evaluate", "per-class metrics in the paper's layout on a dataset"),
    "demo": ("crane_hf.commands.demo", "the main job: score example images (offline: a small demo model)"),
    "export": ("crane_hf.commands.export", "export a model to ONNX or OpenVINO, verified against the model"),
    "app": ("crane_hf.commands.app", "a Gradio app: try images, move thresholds live, save them"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="crane-hf",
        description="Crane / Crane+ zero-shot anomaly detection: scores and heatmaps for images.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            epilog=EXIT_CODES_HELP,
            formatter_class=HelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_command(args._module.run, args)


if __name__ == "__main__":
    sys.exit(main())
