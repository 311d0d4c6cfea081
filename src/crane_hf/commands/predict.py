"""`crane-hf predict`: score images and write a predictions table (CSV, JSON, JSON Lines, Parquet), decision
figures and (`--report`) report.html; on one process or many, resumable.

    crane-hf predict /data/line3 --model crane+/mvtec --output results
    crane-hf predict --paths-from todays-images.txt --model DIR --output results --resume
    crane-hf predict --dataset '/data/archive/*.parquet' --model DIR --output out --num-processes 4 --tables parquet
    accelerate launch --multi_gpu --num_processes 4 -m crane_hf.predict /data/archive --model DIR --output results

Inputs: image files, folders (searched recursively), glob patterns, a text file of paths (--paths-from), or the
image column of a `datasets` dataset (--dataset: Parquet files, a folder saved with save_to_disk, or a Hub id).
Images are read and preprocessed in DataLoader workers (--workers) while the model runs; results are appended to
per-process shards as they are produced, flushed per batch, and merged into the tables when every image is done,
so memory does not grow with the number of images. --num-processes (or `accelerate launch`) splits the images over
processes and devices without padding or duplicates; the tables equal a one-process run's, row for row.

Each scored image gets a decision figure (image | anomaly map with colour bar | pixels at or above the pixel
threshold, with the file name, verdict, score and thresholds written on it: `reporting/decision_figure.py`), written
by the process that scored it; with `--report`, the main process builds `report.html` from the merged rows once every
image is done (on --resume, the rows of the interrupted run too): the run sorted by score, filterable by verdict and
class, with the score histogram and the threshold (`reporting/run_report.py`); it opens from disk, offline.

Until it completes, a run works in `.OUTPUT.crane-hf-partial` beside the output; an interrupted or killed run
keeps it, and the same command with --resume scores only the images not done yet (recognised by path and SHA-256 of
their bytes; a run without --resume starts over). The output appears only when complete, is never read as input
and may not be or contain an input, the model folder, the working, home or root folder (`io/output_safety.py`);
an existing output is only replaced with --overwrite, and only if crane-hf wrote it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from ..computation_options import add_computation_arguments, computation_overrides
from ..few_shot_options import add_reference_arguments, check_reference, load_reference_memory
from ..io.output_safety import check_output_dir, protected_paths
from ..prediction.sharded_prediction import (
    CSV_COLUMNS,
    PredictionReport,
    predict_images,
    prediction_protections,
)
from ..process_lifetime import end_with_parent
from .cli_support import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_SKIPPED,
    local_path,
    one_line,
    require_positive,
    require_range,
    run_command,
)
from .process_launch import (
    launched_processes,
    run_as_worker,
    run_in_processes,
    worker_arguments,
)


def _score_chunk(pipe, images, batch_size, params):
    """Pipeline outputs for a chunk; on failure, image by image so one bad input cannot sink its batch."""
    try:
        return [(output, None) for output in pipe(images, batch_size=batch_size, **params)]
    except Exception:  # isolate the offending image below and report it
        results = []
        for image in images:
            try:
                results.append((pipe(image, **params), None))
            except Exception as error:  # reported as a skipped file
                results.append((None, error))
        return results


def score_image_files(
    pipe: Any,
    paths: list[str],
    batch_size: int,
    params: dict[str, Any],
    chunk_size: int,
    reference_pixels: frozenset[str] = frozenset(),
) -> Iterator[tuple[str, Any, dict[str, Any] | None, str | None]]:
    """Read and score `chunk_size` image files at a time in this process (memory does not grow with their number;
    `crane-hf calibrate` keeps every map's histogram); yields, for each path, (path, decoded image, pipeline output,
    None) or (path, None, None, the reason it was skipped). An image whose decoded pixels have one of
    `reference_pixels` (a few-shot memory's `known_fingerprints`) is a reference image: not scored, its reason
    `SAME_PIXELS_REASON`."""
    from ..models.crane.image_reading import read_image
    from ..models.crane.pipeline_zero_shot_anomaly_detection import pixel_fingerprint
    from ..models.crane.reference_memory import SAME_PIXELS_REASON

    for start in range(0, len(paths), chunk_size):
        loaded = []
        for path in paths[start : start + chunk_size]:
            try:
                image = read_image(path)
            except ValueError as error:
                yield path, None, None, str(error).removeprefix(f"{path}: ")
                continue
            if reference_pixels and pixel_fingerprint(image) in reference_pixels:
                yield path, None, None, SAME_PIXELS_REASON
                continue
            loaded.append((path, image))
        results = _score_chunk(pipe, [image for _, image in loaded], batch_size, params) if loaded else []
        for (path, image), (output, error) in zip(loaded, results):
            if output is not None:
                yield path, image, output, None
            else:
                yield path, None, None, f"could not be scored ({error})"
        loaded.clear()  # the decoded images of this chunk are not kept


def default_workers() -> int:
    """DataLoader workers by default: half the CPU cores, 1 to 4."""
    return min(4, max(1, (os.cpu_count() or 2) // 2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument(
        "--paths-from",
        default=None,
        help="a text file of image paths, files, folders or glob patterns, one per line, taken as they are (blank "
        "lines ignored; relative paths are relative to the working folder, not to the file; no comments)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="score the image column of a datasets dataset: Parquet files (a file, folder or glob), a folder saved "
        "with save_to_disk, or a Hub dataset id",
    )
    parser.add_argument(
        "--split",
        default="train",
        help="split of --dataset (default: %(default)s); Parquet files make one split, train, unless a folder holds "
        "them by split (data/SPLIT-*.parquet, the Hub's layout)",
    )
    parser.add_argument("--image-column", default="image", help="image column of --dataset (default: %(default)s)")
    parser.add_argument(
        "--model", type=local_path, default="crane+/mvtec", help="preset name, model folder, Hub id or exported folder"
    )
    parser.add_argument(
        "--clip", type=local_path, default=None, help="local CLIP folder for a preset (instead of the Hub)"
    )
    parser.add_argument(
        "--dino", type=local_path, default=None, help="local DINOv2 folder for a preset (instead of the Hub)"
    )
    parser.add_argument(
        "--allow-backbone-mismatch", action="store_true", help="accept a --clip unlike the preset's fingerprint"
    )
    parser.add_argument(
        "--output", default="crane-hf-predictions", type=local_path, help="folder to write (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (and process)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"DataLoader processes reading and preprocessing images (0: none; default: {default_workers()} here, "
        "half the CPU cores, 1 to 4)",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="processes to split the images over (launched with accelerate; one per GPU where there are GPUs)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="finish the interrupted run on --output: score only the images not done"
    )
    parser.add_argument(
        "--tables", default="csv,json", help="tables to write, among csv, json, jsonl, parquet (default: %(default)s)"
    )
    parser.add_argument("--device", default="auto", help="auto (the process's accelerate device), cpu, cuda, cuda:1")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights' dtype (default: as loaded)"
    )
    parser.add_argument("--threshold", type=float, default=None, help="image-score threshold (default: the model's)")
    parser.add_argument("--pixel-threshold", type=float, default=None, help="contour threshold (default: the model's)")
    parser.add_argument("--no-overlays", action="store_true", help="do not write heatmap overlays")
    parser.add_argument("--save-maps", action="store_true", help="also write each smoothed map as .npy")
    parser.add_argument(
        "--color-scale",
        choices=["absolute", "image"],
        default="absolute",
        help="heatmap colours: absolute 0-1 scores (comparable across images; default) or stretched to each image",
    )
    parser.add_argument("--report", action="store_true", help="also write report.html to review the run in a browser")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_computation_arguments(parser)
    add_reference_arguments(parser, " (default: the model folder's reference_memory.safetensors, if any)")


def _tables(args: argparse.Namespace) -> tuple[str, ...]:
    from ..prediction.result_shards import TABLE_FORMATS

    names = tuple(dict.fromkeys(name.strip() for name in args.tables.split(",") if name.strip()))
    unknown = [name for name in names if name not in TABLE_FORMATS]
    if unknown or not names:
        raise ValueError(f"--tables {args.tables}: choose among {', '.join(TABLE_FORMATS)} (comma-separated)")
    return names


def _inputs(args: argparse.Namespace) -> list[str]:
    """The positional inputs and the paths listed in --paths-from (one per line; blank lines ignored)."""
    inputs = list(args.inputs)
    if args.paths_from is not None:
        try:
            with open(args.paths_from, encoding="utf-8") as stream:
                inputs += [line.rstrip("\r\n") for line in stream if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--paths-from {args.paths_from}: cannot be read ({one_line(error)})") from error
    if args.dataset is not None and inputs:
        raise ValueError("--dataset: give either a dataset or image files/folders/--paths-from, not both")
    if args.dataset is None and not inputs:
        raise ValueError("inputs: name image files, folders or glob patterns, --paths-from FILE or --dataset")
    return inputs


def check_arguments(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Every check that needs no model: arguments, the device, inputs and the output. Returns the protected
    (what, path) folders of the output."""
    from ..model_loading import check_device, check_model_loadable

    require_positive("--batch-size", args.batch_size)
    require_positive("--num-processes", args.num_processes)
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers}: must be at least 0")
    require_range("--threshold", args.threshold, 0.0, 1.0)
    require_range("--pixel-threshold", args.pixel_threshold, 0.0, 1.0)
    _tables(args)
    check_model_loadable(args.model, clip=args.clip, dino=args.dino)  # before processes start: a typo fails once
    check_device(args.model, args.device)
    inputs = _inputs(args)
    if args.dataset is not None:
        from ..prediction.dataset_inputs import parquet_files

        parquet_files(args.dataset, args.split)
    protected = [
        *prediction_protections(inputs, args.model),
        *protected_paths("a backbone", [args.clip, args.dino]),
        *protected_paths("the dataset", [args.dataset]),
        *protected_paths("a reference", args.reference or []),
    ]
    check_output_dir(args.output, args.overwrite, protected)
    check_reference(args.reference, exclude=[args.output])
    return protected


def run(args: argparse.Namespace) -> int:
    try:  # every argument, the device and the output are checked before the model is loaded
        protected = check_arguments(args)
        world = launched_processes()
        if world > 1:  # a process of a launcher: ends with it, even when it is killed with SIGKILL
            end_with_parent(os.getppid())
        if args.num_processes > 1 and world == 1:
            return run_in_processes("crane_hf.commands.predict", args, args.num_processes)
        if world > 1 and args.num_processes not in (1, world):
            raise ValueError(f"--num-processes {args.num_processes}: launched as {world} processes")
        report = _predict(args, protected)
    except (OSError, ValueError) as error:  # refused; anything else is a bug: its traceback, exit 1
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    if not report.main_process:
        return EXIT_OK
    print(f"Scored {report.scored} images ({report.anomalous} anomalous); results in {report.output_dir}")
    if report.resumed:
        print(f"({report.resumed} of them scored by the interrupted run that --resume finished)")
    if args.report:
        print(f"Report: {os.path.join(os.path.abspath(report.output_dir), 'report.html')}")
    for folder in report.left_out:
        print(f"note: left out {folder} (a crane-hf output folder, never read as input)", file=sys.stderr)
    for item in report.skipped:
        print(f"skipped {item.path}: {item.reason}", file=sys.stderr)
    if report.skipped and world > 1 and worker_arguments() is None:  # under accelerate launch directly: a launcher
        # reports a non-zero exit of a process as its failure (--num-processes records the code for the parent)
        print(f"note: {len(report.skipped)} inputs skipped, listed in skipped.txt (exit code 0 under a launcher)")
        return EXIT_OK
    return EXIT_SKIPPED if report.skipped else EXIT_OK


def _predict(args: argparse.Namespace, protected: list[tuple[str, str]]) -> PredictionReport:
    from accelerate import PartialState

    from ..model_loading import load_model, model_kind

    device = args.device
    if device == "auto" and model_kind(args.model) != "exported":  # an exported folder runs on the CPU
        import torch

        device = str(PartialState(cpu=not torch.accelerator.is_available()).device)
    model, processor = load_model(
        args.model,
        clip=args.clip,
        dino=args.dino,
        allow_backbone_mismatch=args.allow_backbone_mismatch,
        device=device,
        dtype=args.dtype,
        **computation_overrides(args),
    )
    reference = check_reference(args.reference, exclude=[args.output])
    if reference is not None:  # before any image is scored: a memory of another model is refused here
        load_reference_memory(model, processor, reference)
    common: dict[str, Any] = {
        "batch_size": args.batch_size,
        "threshold": args.threshold,
        "pixel_threshold": args.pixel_threshold,
        "write_overlays": not args.no_overlays,
        "save_maps": args.save_maps,
        "overwrite": args.overwrite,
        "progress": not args.quiet,
        "protected": protected,
        "resume": args.resume,
        "workers": default_workers() if args.workers is None else args.workers,
        "formats": _tables(args),
        "report_html": args.report,
        "color_scale": args.color_scale,
    }
    if args.dataset is not None:
        from ..prediction.dataset_inputs import predict_dataset

        return predict_dataset(model, processor, args.dataset, args.split, args.image_column, args.output, **common)
    return predict_images(model, processor, _inputs(args), args.output, **common)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m crane_hf.predict` / `accelerate launch -m crane_hf.predict`: the predict command."""
    from .cli_support import EXIT_CODES_HELP, HelpFormatter, OneLineArgumentParser

    worker = worker_arguments()  # a process started by --num-processes: the parent's parsed arguments
    if worker is not None:
        return run_as_worker(run, worker)
    parser = OneLineArgumentParser(
        prog="python -m crane_hf.predict", description=__doc__, epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter
    )
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "CSV_COLUMNS",
    "PredictionReport",
    "add_arguments",
    "main",
    "predict_images",
    "prediction_protections",
    "run",
    "score_image_files",
]
