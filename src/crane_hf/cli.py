"""The `crane-hf` command: predict, calibrate, convert, push, demo, train, evaluate, app.

Each command lives in its own module with `add_arguments(parser)` and `run(args) -> exit code`; this module only
dispatches. Exit codes: 0 success, 2 usage or input error, 3 finished but some inputs were skipped.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "predict": ("crane_hf.predict", "score images: CSV/JSON table and heatmap overlays"),
    "calibrate": ("crane_hf.calibrate", "set a model folder's thresholds from normal images"),
    "convert": ("crane_hf.convert_original", "convert an official Crane checkpoint (.pth)"),
    "push": ("crane_hf.hub_publishing", "publish a model folder to the Hub (or --dry-run to a folder)"),
    "train": ("crane_hf.train", "train the prompts on an annotated dataset (also under accelerate launch)"),
    "evaluate": ("crane_hf.evaluate", "per-class metrics in the paper's layout on a dataset"),
    "demo": ("crane_hf.demo", "the main job: score example images (offline: a small demo model)"),
    "app": ("crane_hf.reporting.app_command", "a Gradio app: try images, move thresholds live, save them"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crane-hf", description="Crane / Crane+ zero-shot anomaly detection: scores and heatmaps for images."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._module.run(args)


if __name__ == "__main__":
    sys.exit(main())
