"""`crane-hf evaluate`: the paper's metrics per class and their mean, on any dataset, on one process or many.

    crane-hf evaluate --model crane+/visa --data /data/mvtec --output eval-mvtec
    crane-hf evaluate --protocol paper --data /data/visa --output eval-visa
    crane-hf evaluate --model DIR --data ROOT --output OUT --num-processes 2
    accelerate launch --multi_gpu --num_processes 2 -m crane_hf.evaluate --model DIR --data ROOT --output OUT

For each class: image AUROC, AP and F1-max, and on the smoothed S x S maps (sigma 4, as the paper) pixel
AUROC, AUPRO and F1-max (pixel AP too, in the CSV and JSON), then the mean over classes, written as
`metrics.md` (the paper's layout, in percent), `metrics.csv` and `metrics.json`; with `--report` also
`report.html` (the images sorted by score with their decision figures, the metric table, and each class's ROC and
precision-recall curves with the F1-max point), to open from disk in a browser. Both AUPRO definitions are
computed: "official" (MVTec-AD's, exact) and "legacy" (the official Crane code's 200 thresholds, which the paper's
numbers use); the table shows `--aupro` (legacy under `--protocol paper`). What was computed (variant, E-Attn map
source, D-Attn input, deep-prompt rounding, soft_mean, input size, smoothing, AUPRO variant and where the prompts
come from) heads `metrics.md` and is stored under "computation" in `metrics.json`.

Under `accelerate launch` the images are split into contiguous shards without padding, each process scores its
shard, and the per-class metric states are gathered and merged on the main process, so the results equal a
single-process run. Unreadable images (missing, truncated, corrupt, multi-frame, over the decompression-bomb
limit), masks of the wrong size, anomalous images missing the mask their class's other anomalous images (or their
ground-truth folder) have, images whose score or map is not finite, and every file under a class folder that no
entry uses (with the reason: a subfolder too deep, a mask matching no image, ...) are reported in `skipped.txt` and
`metrics.json` (file and reason) and left out; the rest is evaluated (exit code 3). `--strict` refuses such a
dataset instead (exit 2). Masks in a lossy format (JPEG) are binarised at mid-range and listed (`lossy_masks`).

Few-shot (`--shots K --seeds N`): for each seed 0 .. N-1, K normal images drawn from each class's train split make
that class's reference memory; the tables of the fused outputs, of the few-shot branch alone and of the zero-shot
model are reported as mean ± standard deviation over the seeds (metrics.md; per seed and the reference images of
each draw in metrics.json under "few_shot").

    crane-hf evaluate --model crane+/visa --data /data/mvtec --shots 4 --seeds 5 --output eval-mvtec-4shot

Anomalous images whose mask marks no pixel, or none at S x S, and masks that mark every pixel stay in the metrics
(as in the published evaluation) and are named, one line per kind, and listed under "warnings" in `metrics.json`
(`data/mask_checks.py`).

`--num-processes N` starts the N processes itself (`commands/process_launch.py`) and exits with the code a single
process gives; directly under `accelerate launch`, the launcher turns any non-zero code (3 included) into exit 1
with a torch traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..computation_options import add_computation_arguments
from ..io.output_safety import check_output_dir
from .cli_support import HelpFormatter, local_path, one_line, require_positive, require_range, run_command
from .process_launch import launched_processes, run_as_worker, run_in_processes, worker_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=local_path, default=None, help="preset name, model folder, Hub id or exported folder"
    )
    parser.add_argument(
        "--data", nargs="+", required=True, help="dataset ROOT[:SPLIT[:CLASS,...]] (split defaults to test)"
    )
    parser.add_argument(
        "--output", default="crane-hf-evaluation", type=local_path, help="folder to write (default: %(default)s)"
    )
    parser.add_argument("--protocol", choices=["paper"], default=None, help="the published setting for the dataset")
    parser.add_argument("--dataset", default=None, help="dataset name for --protocol paper (default: the folder name)")
    parser.add_argument("--variant", choices=["crane", "crane+"], default="crane+", help="model for --protocol paper")
    parser.add_argument("--aupro", choices=["official", "legacy"], default="official", help="AUPRO shown in the table")
    parser.add_argument("--sigma", type=float, default=4.0, help="Gaussian smoothing of the maps (paper: 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass and process")
    parser.add_argument("--device", default="auto", help="auto (the process's accelerate device), cpu, cuda, ...")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights' dtype (default: as loaded)"
    )
    parser.add_argument("--clip", type=local_path, default=None, help="local CLIP folder for a preset")
    parser.add_argument("--dino", type=local_path, default=None, help="local DINOv2 folder for a preset")
    parser.add_argument(
        "--allow-backbone-mismatch", action="store_true", help="accept a --clip unlike the preset's fingerprint"
    )
    parser.add_argument(
        "--save-overlays",
        action="store_true",
        help="also write a decision figure per image (image | heatmap | decision)",
    )
    parser.add_argument(
        "--report", action="store_true", help="also write report.html (figures, metric table, ROC and PR curves)"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse the dataset (exit 2) if any file under a class is unused or any entry is invalid, instead of "
        "reporting and leaving them out",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--shots",
        type=int,
        default=None,
        metavar="K",
        help="few-shot: K normal images of each class's train split as its reference memory",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="with --shots: draws of the K images, seeds 0..N-1 (default 3)",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="score on N processes (accelerate launch, one per GPU, gloo on CPUs), with crane-hf's exit codes",
    )
    add_computation_arguments(parser)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse out-of-range arguments, an unusable device and an output that cannot be written, before any work."""
    from ..data import parse_sources
    from ..evaluation.evaluate import evaluated_model, evaluation_protections
    from ..model_loading import check_device, check_model_loadable
    from ..models.crane.gaussian_smoothing import MAX_SMOOTHING_SIGMA

    parse_sources(args.data)  # a class or a dataset named twice would be counted twice
    require_range("--sigma", args.sigma, 0.0, MAX_SMOOTHING_SIGMA)
    require_positive("--batch-size", args.batch_size)
    shots, seeds = getattr(args, "shots", None), getattr(args, "seeds", None)
    if seeds is not None and shots is None:
        raise ValueError(f"--seeds {seeds}: only with --shots (few-shot evaluation).")
    if shots is not None:
        require_positive("--shots", shots)
        require_positive("--seeds", seeds)
        args.seeds = 3 if seeds is None else seeds
        for option, given in (("--save-overlays", args.save_overlays), ("--report", args.report)):
            if given:
                raise ValueError(f"{option}: not available with --shots (the maps differ from seed to seed).")
    require_positive("--num-processes", args.num_processes)
    if args.num_processes > 1 and launched_processes() > 1:
        raise ValueError(
            "--num-processes starts its own processes; under accelerate launch, the launcher's --num_processes "
            "decides how many there are."
        )
    if args.num_processes > 1:
        import torch

        # accelerate gives process k the accelerator k: more processes than accelerators cannot start
        if torch.accelerator.is_available() and args.num_processes > torch.accelerator.device_count():
            raise ValueError(
                f"--num-processes {args.num_processes}: this machine has {torch.accelerator.device_count()} "
                f"{torch.accelerator.current_accelerator().type} device(s), one per process; on the CPU only, any "
                "number of processes runs."
            )
    model = evaluated_model(args)
    if model is not None:  # before processes start: a typo or a missing backbone fails once, at once
        check_model_loadable(model, clip=args.clip, dino=args.dino)
    if args.device != "auto":
        check_device(args.model, args.device)
    check_output_dir(args.output, args.overwrite, evaluation_protections(args, args.model))


def run(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import _computation_lines, _markdown, evaluate_model

    try:
        check_arguments(args)
        if args.num_processes > 1:
            return run_in_processes("crane_hf.commands.evaluate", args, args.num_processes)
        report = evaluate_model(args)
    except (OSError, ValueError) as error:  # refused; anything else is a bug: its traceback, exit 1
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    if not report:
        return 0
    if "markdown" in report:  # few-shot: mean ± std over the seeds
        print(report["markdown"])
        left_out = report["info"]["few_shot"]["reference_images_left_out"]
        counts = ", ".join(f"{len(paths)} in seed {seed}" for seed, paths in left_out.items())
        print(
            "note: left out the test images that are reference images of their class's memory (compared with "
            f"themselves otherwise): {counts}; the metrics are on the other test images",
            file=sys.stderr,
        )
    else:
        title = f"{report['info']['model']} (AUPRO: {report['info']['aupro']})"
        print(_markdown(report["table"], title, report["info"]["mean_classes"]))
        print("\n".join(_computation_lines(report["info"]["computation"])))
    print(f"Wrote metrics.md, metrics.csv and metrics.json to {args.output}")
    if args.report:
        print(f"Report: {os.path.join(os.path.abspath(args.output), 'report.html')}")
    for warning in report["info"].get("warnings", []):
        print(f"warning: {warning['message']}", file=sys.stderr)
    for item in report["info"]["skipped"]:
        print(f"skipped {item['image_path']}: {item['reason']}", file=sys.stderr)
    if not report["info"]["skipped"]:
        return 0
    if launched_processes() > 1 and worker_arguments() is None:
        print(
            "note: exit code 3 (some files skipped; the report is complete); accelerate launch reports any non-zero "
            "exit as a failure (exit 1, with a traceback): crane-hf evaluate --num-processes N keeps crane-hf's "
            "exit codes",
            file=sys.stderr,
        )
    return 3


def main(argv: Sequence[str] | None = None) -> int:
    worker = worker_arguments()  # a process started by --num-processes: the parent's parsed arguments
    if worker is not None:
        return run_as_worker(run, worker)
    parser = argparse.ArgumentParser(
        prog="python -m crane_hf.evaluate", description=__doc__, formatter_class=HelpFormatter
    )
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
