"""`crane-hf calibrate`: decision thresholds from normal images, saved into the model folder.

The image threshold is the lowest image score of the normal images at which at most `--fpr` of them score at or
above it; the pixel threshold does the same over every pixel of the smoothed maps (at each image's original size)
with `--pixel-fpr`. Both are picked among the float32 values themselves and hold under the exact comparison the
pipeline and `crane-hf predict` make (`at_or_above` in `crane_hf/models/crane/thresholds.py`), so the rates reported
are the rates `predict` gives on the same images. Both go into the folder's config.json (`image_threshold`,
`pixel_threshold`), which the pipeline and `crane-hf predict` use by default; `calibration.json` records how they
were obtained, and the previous values and computation. Thresholds hold for one computation: options that change
it (`--soft-mean`, `--eattn-maps`, ...) are saved into config.json together with the thresholds and the record of
that computation (`threshold_computation`), and a change of the folder's computation is printed. A model loaded
later with another computation refuses to decide with these thresholds (`CraneConfig.check_thresholds`).

Images are read and scored a few at a time: memory does not grow with their number (the image scores are kept,
and for the pixels a fixed-size histogram, `ValueHistogram`). An image that cannot be read or whose
score or map is not finite is skipped and reported; no threshold is ever written from NaN.

Few-shot: with `--reference` (normal images of the class, or a saved reference memory), or for a folder that holds a
reference memory (`reference_memory.safetensors`), the thresholds are those of the fused scores and maps; the memory
given with `--reference` is saved into the folder with them, since they hold for it. Calibration images that are
reference images (the same file, or the same bytes under another name) are left out and named: a memory finds its own
images perfectly normal. When every calibration image is one, calibrate refuses and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..computation_options import add_computation_arguments, computation_overrides
from ..few_shot_options import (
    ReferenceSource,
    add_reference_arguments,
    check_reference,
    load_reference_memory,
    reference_files_among,
)
from ..io.atomic import atomic_write_many
from ..io.image_files import find_image_inputs
from ..io.output_safety import check_writable, clean_stale_temporaries, output_lock
from .cli_support import local_path, one_line, require_positive, require_range


def threshold_for_fpr(values: np.ndarray, fpr: float) -> tuple[float, float]:
    """Lowest threshold t among `values` with mean(values >= t) <= fpr (exact comparison); returns (t, rate).

    Thresholds live in [0, 1]: if even t = 1 flags more than `fpr` of the values, 1.0 is returned with its rate.
    See `models/crane/thresholds.py`: `lowest_threshold`.
    """
    from ..models.crane.thresholds import lowest_threshold

    return lowest_threshold(values, fpr)


def _all_reference_images(count: int) -> ValueError:
    """The error when every normal image given to calibrate is a reference image of the few-shot memory."""
    return ValueError(
        f"all {count} normal images given to calibrate are reference images of the few-shot memory (the same files, "
        "bytes or pixels) and were left out: a memory finds its own images perfectly normal. Calibrate on normal "
        "images of the class that are not its reference images."
    )


def calibrate_folder(
    model_dir: str,
    inputs: list[str],
    fpr: float = 0.01,
    pixel_fpr: float = 0.01,
    batch_size: int = 8,
    device: str | None = "auto",
    progress: bool = True,
    config_overrides: dict[str, Any] | None = None,
    reference: list[str] | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Compute and save thresholds for the model folder `model_dir` from the normal images in `inputs`.

    The rates, the device and the writability of the folder are checked before any image is read; the run holds
    the folder's lock (a concurrent calibration of it is refused). The model folder and crane-hf output folders
    among the inputs are left out (`io.image_files.find_image_inputs`).

    `config_overrides` (`CraneConfig` fields, e.g. ``{"soft_mean": True}``) change what the model computes; the
    thresholds only hold for that computation, so the overridden fields are saved into config.json with them.

    `reference` (files, folders, globs of normal images, or a saved memory file: `--reference`): few-shot; the
    thresholds are those of the fused outputs and the memory is saved into the folder (`reference_memory.py`).
    """
    from ..model_loading import check_device, check_json_sizes
    from ..models.crane.configuration_crane import CraneConfig

    config_overrides = dict(config_overrides or {})
    CraneConfig.check_field_names(config_overrides, "calibrate")

    threshold_for_fpr(np.zeros(1), fpr)  # refuse a bad --fpr / --pixel-fpr before any work
    threshold_for_fpr(np.zeros(1), pixel_fpr)
    require_positive("batch_size", batch_size)
    check_device(model_dir, device)
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{model_dir} is not a model folder (no config.json); calibrate writes into a model folder.")
    check_json_sizes(model_dir)
    source = check_reference(reference)
    with calibration_lock(model_dir):
        return _calibrate(
            model_dir, inputs, fpr, pixel_fpr, batch_size, device, progress, config_overrides, source, dtype
        )


@contextlib.contextmanager
def calibration_lock(model_dir: str) -> Iterator[None]:
    """Check that `model_dir` can be written, hold its lock, and remove temporary files a killed run left there.

    The lock is the folder's own (`output_lock(model_dir)`), the one `train` holds on its output folder: a
    calibration of a folder that a training run is writing, or the reverse, is refused."""
    config_path = os.path.join(model_dir, "config.json")
    check_writable(config_path)
    with output_lock(model_dir):
        for name in ("config.json", "calibration.json"):
            clean_stale_temporaries(os.path.join(model_dir, name))
        yield


def _calibrate(
    model_dir: str,
    inputs: list[str],
    fpr: float,
    pixel_fpr: float,
    batch_size: int,
    device: str | None,
    progress: bool,
    config_overrides: dict[str, Any],
    reference: ReferenceSource | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """`calibrate_folder` once its arguments are checked and the folder is locked: the images are scored a chunk
    at a time, keeping their scores and a fixed-size histogram of their pixel values."""
    from ..model_loading import load_model, make_pipeline
    from ..models.crane.configuration_crane import CraneConfig
    from ..models.crane.reference_memory import SAME_PIXELS_REASON
    from ..models.crane.thresholds import ValueHistogram
    from .predict import score_image_files

    found = find_image_inputs(inputs, exclude=[model_dir])
    paths = found.paths
    skipped = [f"{item.path}: {item.reason}" for item in found.skipped]
    previous = CraneConfig.from_pretrained(model_dir)  # what the folder computed, and its thresholds were for
    model, processor = load_model(model_dir, device=device, dtype=dtype, **config_overrides)
    if reference is not None:
        load_reference_memory(model, processor, reference)
    memory = getattr(model, "reference_memory", None)  # given with --reference, or the folder's own (exported: none)
    references_left_out = reference_files_among(paths, memory) if memory is not None else []
    excluded = set(references_left_out)
    paths = [path for path in paths if path not in excluded]
    if references_left_out and not paths:
        raise _all_reference_images(len(references_left_out))
    pipe = make_pipeline(model, processor)
    scores: list[float] = []
    pixels = ValueHistogram()
    chunk_size = max(1, batch_size)  # images (and maps) held at a time
    with tqdm(total=len(paths), desc="Calibrating", unit="image", disable=not progress) as bar:
        # No decision is made here: the folder's thresholds (perhaps for the computation being replaced) are unused.
        no_decisions = {"threshold": 1.0}
        known = memory.known_fingerprints if memory is not None else frozenset()
        for path, _, output, reason in score_image_files(pipe, paths, batch_size, no_decisions, chunk_size, known):
            bar.update(1)
            if reason == SAME_PIXELS_REASON:  # a reference image in other bytes, known once decoded
                references_left_out.append(path)
                continue
            if output is None:
                skipped.append(f"{path}: {reason}")
                continue
            scores.append(output["score"])
            pixels.update(output["anomaly_map"])
    if not scores and references_left_out and not skipped:
        raise _all_reference_images(len(references_left_out))
    if not scores:
        raise ValueError(
            "No readable normal images to calibrate on." + (f" Skipped: {'; '.join(skipped)}" if skipped else "")
        )
    image_threshold, image_rate = threshold_for_fpr(np.asarray(scores, dtype=np.float32), fpr)
    pixel_threshold, pixel_rate = pixels.threshold(pixel_fpr)
    return write_calibration(
        model_dir,
        model,
        previous,
        image={"target_fpr": fpr, "threshold": image_threshold, "fpr_on_calibration_set": image_rate},
        pixel={"target_fpr": pixel_fpr, "threshold": pixel_threshold, "fpr_on_calibration_set": pixel_rate},
        method=CALIBRATED_ON_NORMAL_IMAGES,
        normal_images=len(scores),
        skipped=skipped,
        left_out=found.left_out,
        config_overrides=config_overrides,
        memory=memory,
        save_memory=reference is not None,
        references_left_out=references_left_out,
    )


CALIBRATED_ON_NORMAL_IMAGES = "calibrated on normal images at target false-positive rates (crane-hf calibrate)"


def write_calibration(
    model_dir: str,
    model: Any,
    previous: Any,
    image: dict[str, Any],
    pixel: dict[str, Any],
    method: str,
    normal_images: int | None = None,
    skipped: list[str] | None = None,
    left_out: list[str] | None = None,
    config_overrides: dict[str, Any] | None = None,
    memory: Any = None,
    save_memory: bool = False,
    references_left_out: list[str] | None = None,
) -> dict[str, Any]:
    """Save thresholds into `model_dir`: its config.json (`image_threshold`, `pixel_threshold`, the overridden
    computation fields and `threshold_computation`, what the thresholds hold for) and calibration.json (the record of
    how they were obtained, returned), all or none (`atomic_write_many`). The one writer of `crane-hf calibrate` and
    of the app's "Save thresholds"; the caller holds `calibration_lock(model_dir)`.

    Args:
        model: the loaded model the thresholds were chosen with: its computation, dtype and reference memory are
            what they hold for (`CraneConfig.check_thresholds` refuses them under another one).
        previous: the folder's `CraneConfig` before this calibration (its thresholds and computation are recorded).
        image / pixel: {"target_fpr", "threshold", "fpr_on_calibration_set"} (target and rate None for thresholds
            set by hand); thresholds are floats in [0, 1].
        method: how the thresholds were obtained, in words.
        normal_images: normal images scored (None: none, thresholds set by hand).
        skipped, left_out, references_left_out: inputs skipped (with the reason), folders left out, reference images
            left out of the calibration images.
        config_overrides: `CraneConfig` fields the model was loaded with (saved into config.json with the thresholds).
        memory: the `ReferenceMemory` the scores were fused with (None: zero-shot); `save_memory`: also write it into
            the folder (`reference_memory.safetensors`), since the thresholds hold for it.
    """
    from ..model_loading import computation_changes, computation_summary
    from ..models.crane.configuration_crane import (
        FEW_SHOT_MEMORY,
        LEGACY_COMPUTATION_SWITCH,
        PROMPT_TEXT_FIELDS,
        PUBLISHED_COMPUTATION,
        THRESHOLD_DTYPE,
        dtype_name,
    )
    from ..models.crane.json_reading import load_json_without_duplicates  # not at import: --help stays light

    config_overrides = dict(config_overrides or {})
    config_path = os.path.join(model_dir, "config.json")
    config = load_json_without_duplicates(config_path)
    record = {
        "calibrated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "normal_images": normal_images,
        "skipped": list(skipped or []),
        "left_out": list(left_out or []),
        "image": dict(image),
        "pixel": dict(pixel),
        "previous": {
            "image_threshold": config.get("image_threshold"),
            "pixel_threshold": config.get("pixel_threshold"),
            "threshold_computation": previous.threshold_computation,  # None: default thresholds, for any computation
            "computation": computation_summary(previous),
        },
        "computation": computation_summary(model),
        "computation_changed": computation_changes(previous, model.config),
        "overrides": config_overrides,
        "reference_memory": memory.describe() if memory is not None else None,
        "reference_images_left_out": list(references_left_out or []),
    }
    saved = set(config_overrides)
    if saved & {*PUBLISHED_COMPUTATION, LEGACY_COMPUTATION_SWITCH}:
        # The old single switch cannot express a mixed choice: save the three fields it stood for instead.
        config.pop(LEGACY_COMPUTATION_SWITCH, None)
        saved = (saved - {LEGACY_COMPUTATION_SWITCH}) | set(PUBLISHED_COMPUTATION)
    if saved & {*PROMPT_TEXT_FIELDS, "clip_config"}:
        saved.add("prompt_token_ids")  # derived from the prompt texts
    for name in sorted(saved):
        value = getattr(model.config, name)
        config[name] = value.to_dict() if hasattr(value, "to_dict") else value
    config["image_threshold"] = image["threshold"]  # after the overrides: the calibrated values are what is saved
    config["pixel_threshold"] = pixel["threshold"]
    # What the thresholds hold for: this computation and the reference memory the scores were fused with (None:
    # zero-shot), so that predict refuses them for another memory or for zero-shot scores.
    config["threshold_computation"] = {
        **model.config.inference_computation,
        FEW_SHOT_MEMORY: memory.identity if memory is not None else None,
        THRESHOLD_DTYPE: dtype_name(getattr(model, "dtype", "float32")),  # the dtype the scores were computed in
    }
    files = {  # all or none: config.json's thresholds, the record of how they were obtained, the memory they hold for
        os.path.join(model_dir, "calibration.json"): (json.dumps(record, indent=2) + "\n").encode("utf-8"),
        config_path: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
    }
    if save_memory and memory is not None:  # the thresholds hold for this memory: it goes into the folder with them
        from ..models.crane.reference_memory import MEMORY_FILE_NAME

        files[os.path.join(model_dir, MEMORY_FILE_NAME)] = memory.to_bytes()
    atomic_write_many(files)
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir",
        type=local_path,
        help="model folder or exported folder (crane-hf export) to calibrate (its config.json is updated)",
    )
    parser.add_argument("inputs", nargs="+", help="normal (defect-free) images: files, folders or globs")
    parser.add_argument("--fpr", type=float, default=0.01, help="target image false-positive rate (default 0.01)")
    parser.add_argument("--pixel-fpr", type=float, default=0.01, help="target pixel false-positive rate")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="dtype to run the model in (default: as loaded); the thresholds hold for it",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_computation_arguments(parser)
    add_reference_arguments(parser, "; saved into the model folder with the thresholds")


def run(args: argparse.Namespace) -> int:
    try:
        require_range("--fpr", args.fpr, 0.0, 1.0, high_open=True)
        require_range("--pixel-fpr", args.pixel_fpr, 0.0, 1.0, high_open=True)
        require_positive("--batch-size", args.batch_size)
        record = calibrate_folder(
            args.model_dir,
            args.inputs,
            args.fpr,
            args.pixel_fpr,
            args.batch_size,
            args.device,
            not args.quiet,
            computation_overrides(args),
            args.reference,
            args.dtype,
        )
    except (OSError, ValueError) as error:  # refused; anything else is a bug: its traceback, exit 1
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    if record["computation_changed"]:
        changes = ", ".join(
            f"{name} {c['from']!r} -> {c['to']!r}" for name, c in record["computation_changed"].items()
        )
        print(
            f"note: {args.model_dir}'s computation changes with its new thresholds: {changes} (saved into "
            "config.json; what it computed before, and the thresholds for that, are in calibration.json)"
        )
    for kind in ("image", "pixel"):
        item = record[kind]
        print(
            f"{kind} threshold {item['threshold']!r} (target FPR {item['target_fpr']}, "
            f"{item['fpr_on_calibration_set']:.4f} on the {record['normal_images']} normal images)"
        )
        if item["fpr_on_calibration_set"] > item["target_fpr"]:
            print(
                f"warning: the {kind} target FPR {item['target_fpr']} cannot be met: "
                f"{item['fpr_on_calibration_set']:.4f} of the normal {kind} values score 1.0, the highest threshold",
                file=sys.stderr,
            )
    for folder in record["left_out"]:
        print(f"note: left out {folder} (a crane-hf output folder, never read as input)", file=sys.stderr)
    for path in record["reference_images_left_out"]:
        print(f"note: left out {path} (a reference image of the few-shot memory)", file=sys.stderr)
    for line in record["skipped"]:
        print(f"skipped {line}", file=sys.stderr)
    print(f"Saved into {args.model_dir}/config.json (details in calibration.json)")
    return 3 if record["skipped"] else 0
