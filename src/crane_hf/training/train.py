"""The training loop of Crane's prompts, on one process or many (accelerate); the command line that runs it is
`crane-hf train` / `python -m crane_hf.train` (`crane_hf/commands/train.py`, options in `options.py`).

Only the prompts are trained; the CLIP (and DINOv2) backbones stay frozen. The model computes what the published
code computes (the computation the official prompts were trained with) unless the computation options
(`crane_hf/computation_options.py`: `--eattn-maps per_layer --dattn-input layer_input --deep-prompt-rounding none`
trains the per-layer variant) say otherwise.

- Order: the images are shuffled by (seed, epoch) alone, and all randomness is reseeded from (seed, epoch, process)
  at the start of each epoch, so a run resumed at an epoch boundary ends exactly as an uninterrupted run.
- Checkpoints: every epoch, `<output-dir>/checkpoint-epoch-N/` (`checkpoints.py`), written by the main
  process only, atomically; the last one is copied to `<output-dir>/`, loadable with
  `CraneForAnomalyDetection.from_pretrained(<output-dir>)`. `--resume-from-checkpoint PATH|latest` continues.
- `--cache-features`: each image's backbone outputs are computed once and stored on disk (`feature_cache.py`);
  the epochs then run only the prompt side. Same prompts as without the cache, up to float rounding.
- Logs: a progress bar, `training_log.jsonl` (loss and its focal, dice and image CE components per optimizer
  step) and, with `--report-to tensorboard`, TensorBoard under `<output-dir>/logs`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, set_seed
from tqdm.auto import tqdm

from ..computation_options import computation_overrides
from ..data import DataSource, load_data_source, parse_sources
from ..hub_availability import (
    BackboneUnavailableError,
    backbone_unavailable_message,
    is_valid_hub_id,
    local_dir_name,
    unavailable_reason,
)
from ..io.atomic import OutputExistsError, naming_write_errors
from ..io.output_safety import (
    MARKER_NAME,
    UnsafeOutputError,
    check_not_protected,
    check_output_dir,
    check_replaceable,
    check_writable,
    claim_changed,
    claim_entries,
    clean_stale_temporaries,
    clean_stale_temporaries_in,
    file_signatures,
    manifest_records,
    matches_record,
    on_main_process,
    output_lock,
    protected_paths,
    read_marker,
    unowned_entries,
)
from ..models.crane.configuration_crane import PER_LAYER_COMPUTATION, PUBLISHED_COMPUTATION
from ..models.crane.image_processing_crane import CraneImageProcessor
from ..models.crane.modeling_crane import CraneAnomalyDetectionOutput, CraneForAnomalyDetection
from .checkpoints import (
    CHECKPOINT_PREFIX,
    checkpoint_path,
    list_checkpoints,
    load_training_state,
    publish_model,
    read_trainer_state,
    register_prompt_state_hooks,
    resolve_checkpoint,
    save_checkpoint,
)
from .data_loading import EpochShuffleSampler, ProcessedImages, RowCheck, check_rows
from .feature_cache import (
    CachedFeatures,
    FeatureCache,
    cache_fingerprint,
    feature_grid,
    fill_feature_cache,
)
from .fingerprints import combine_digests, module_fingerprint
from .options import DEFAULT_DINO, FEATURE_CACHE

LOSS_NAMES = ("loss", "focal_loss", "dice_loss", "image_loss")
TRAINING_LOG = "training_log.jsonl"
# Settings a resumed run must share with the run it continues (epochs may grow; the cache does not matter). The data
# and the backbones are recognised by the fingerprints of their content (CONTENT_SETTINGS), not by their paths.
RESUME_SETTINGS = (
    "variant",
    "image_size",
    "seed",
    "batch_size",
    "gradient_accumulation_steps",
    "lr",
    "adam_betas",
    "num_processes",
    "mixed_precision",
    "eattn_map_source",
    "dattn_input",
    "deep_prompt_rounding_dtype",
)
CONTENT_SETTINGS = ("data_sha256", "backbones_sha256")
# What checkpoints written before the computation settings were recorded ran with: the per-layer computation of
# that time.
UNRECORDED_SETTINGS = PER_LAYER_COMPUTATION


class NonFiniteTrainingError(RuntimeError):
    """The loss or the prompts became NaN or infinite: training stops and nothing more is saved or published."""


def _check_arguments(args: argparse.Namespace) -> None:
    positive = ("epochs", "batch_size", "image_size", "gradient_accumulation_steps")
    problems = [f"--{name.replace('_', '-')} must be positive" for name in positive if getattr(args, name) < 1]
    if not args.lr > 0:
        problems.append("--lr must be positive")
    if not all(0 <= beta < 1 for beta in args.adam_betas):
        problems.append("--adam-betas must be in [0, 1)")
    if args.num_workers < 0:
        problems.append("--num-workers must be >= 0")
    if args.variant == "crane" and args.dino:
        problems.append("--dino is used by --variant crane+ only")
    if args.report_to == "tensorboard" and not is_tensorboard_available():
        problems.append("--report-to tensorboard needs TensorBoard, which is not installed (pip install tensorboard)")
    if problems:
        raise ValueError("; ".join(problems) + ".")


def check_backbones_available(args: argparse.Namespace) -> None:
    """Fail before any work where a backbone given as a Hub id is neither in the Hugging Face cache nor downloadable
    here (one connection attempt, no retries), with the commands that get it.

    Raises:
        ValueError: a `--clip` / `--dino` that is neither a folder nor a valid Hub id.
        BackboneUnavailableError: the message names the backbone, how to download it into a folder, the `--clip` /
            `--dino` options that point at the folders, and the small random backbones to try training offline.
    """
    sources = {"--clip": args.clip, "--dino": _dino_source(args)}
    hub_ids = {option: source for option, source in sources.items() if source and not os.path.isdir(source)}
    for option, source in hub_ids.items():
        if not is_valid_hub_id(source):
            raise ValueError(f"{option} {source}: no such folder, and not a valid Hub id.")
    for source in hub_ids.values():
        reason = unavailable_reason(source)
        if reason:
            folders = " ".join(f"{option} {local_dir_name(hub_id)}" for option, hub_id in hub_ids.items())
            small = "--clip small-backbones/clip"
            if args.variant == "crane+":
                small += " --dino small-backbones/dinov2"
            usage = f"  accelerate launch -m crane_hf.train {folders} ..."
            trial = (
                "To try training offline: small backbones with RANDOM weights (everything runs, the prompts are "
                f"meaningless): python -m crane_hf.small_backbones --output small-backbones, then {small}"
            )
            raise BackboneUnavailableError(
                backbone_unavailable_message("Training", source, reason, list(hub_ids.values()), usage, trial)
            )


def _settings(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, Any]:
    return {
        "data": [str(DataSource.parse(spec)) for spec in args.data],
        "clip": args.clip,
        "dino": _dino_source(args),
        "variant": args.variant,
        "image_size": args.image_size,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "lr": args.lr,
        "adam_betas": list(args.adam_betas),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "epochs": args.epochs,
        "cache_features": args.cache_features,
        **_computation(args),
    }


def _computation(args: argparse.Namespace) -> dict[str, Any]:
    """The three computation fields the prompts are trained with: the published code's unless the options say
    otherwise (`CraneConfig` defaults)."""
    return {**PUBLISHED_COMPUTATION, **computation_overrides(args)}


def _dino_source(args: argparse.Namespace) -> str | None:
    return (args.dino or DEFAULT_DINO) if args.variant == "crane+" else None


def epoch_seed(seed: int, epoch: int, process_index: int) -> int:
    """The seed of every random generator in one process during one epoch."""
    return int(np.random.SeedSequence([seed, epoch, process_index]).generate_state(1)[0])


class CraneTrainingStep(torch.nn.Module):
    """The module accelerate prepares (DDP on many processes): the model's forward with the loss, on images or on
    cached backbone outputs."""

    def __init__(self, model: CraneForAnomalyDetection):
        super().__init__()
        self.model = model
        self.grid = feature_grid(model.config)
        self.image_size = (model.config.image_size, model.config.image_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> CraneAnomalyDetectionOutput:
        if "pixel_values" in batch:
            return self.model(batch["pixel_values"], labels=batch["labels"], masks=batch["masks"])
        return self.model.forward_from_features(
            batch["image_embeds"],
            batch["patch_features"].transpose(0, 1),  # [B, M, N, D] -> [M, B, N, D]
            self.grid,
            self.image_size,
            labels=batch["labels"],
            masks=batch["masks"],
        )


def training_protections(args: argparse.Namespace) -> list[tuple[str, str]]:
    """What `--output-dir` may not be or contain: the dataset roots and local backbone folders."""
    roots = []
    for spec in args.data:
        with contextlib.suppress(OSError, ValueError):
            roots.append(DataSource.parse(spec).root)
    return [*protected_paths("the dataset root", roots), *protected_paths("a backbone", [args.clip, args.dino])]


# What a training run writes in its output folder besides the published model files (`publish_model` lists those):
# the files it writes there are listed in the folder's manifest one by one (`claim_changed`).
RUN_FILE_PREFIXES = (TRAINING_LOG, "logs/", f"{FEATURE_CACHE}/", CHECKPOINT_PREFIX)


def _prepare_output_dir(
    args: argparse.Namespace, resume: str | None, accelerator: Accelerator, claim: contextlib.ExitStack
) -> tuple[bool, dict[str, Any]]:
    """Claim `--output-dir` for this run (main process: its lock, held until `claim` closes; what killed runs left
    there removed) and refuse to write over an earlier run's outputs unless `--overwrite`, which needs a folder
    holding only files crane-hf wrote. Resuming in place needs a folder `train` wrote (its marker), whose files
    this run replaces listed in its manifest. Returns whether this run created the folder, and the signatures of
    the files in it before the run (`output_safety.file_signatures`). Every process raises the main process's
    refusal."""
    return on_main_process(accelerator, lambda: _claim_output_dir(args, resume, claim))


def _check_resume_in_place(output_dir: str, resume: str) -> None:
    """Refuse to resume in `output_dir` unless `train` wrote it (its marker) and lists, with their current content,
    the existing files that resuming replaces there (the published model files). The training log is appended
    after every step and listed again only after each checkpoint, so a run killed between them leaves it longer
    than its record: it needs to be listed, by name."""
    marker = read_marker(output_dir)
    if marker is None or marker.get("command") != "train":
        raise UnsafeOutputError(
            f"refusing to resume in {output_dir}: it was not written by crane-hf train (no {MARKER_NAME} of train); "
            "resuming replaces its config.json and model files. Resume into a new --output-dir instead."
        )
    records = manifest_records(marker)
    if records is None:
        raise UnsafeOutputError(
            f"refusing to resume in {output_dir}: its {MARKER_NAME} lists file names without their content (an "
            "older crane-hf, or edited), so crane-hf cannot tell its files from yours. Resume into a new "
            "--output-dir instead."
        )
    replaced = [name for name in os.listdir(resume) if os.path.isfile(os.path.join(resume, name))]
    # A run killed while publishing a checkpoint's model files (`publish_model`: files copied, then listed) leaves
    # them unlisted: each is still known by its content, listed in the manifest of a checkpoint of this run.
    published_from = [manifest_records(read_marker(path) or {}) or {} for _, path in list_checkpoints(output_dir)]

    def ours(name: str) -> bool:
        path = os.path.join(output_dir, name)
        if not os.path.lexists(path):
            return True
        if name == TRAINING_LOG:
            return name in records
        return any(matches_record(path, listed.get(name)) for listed in (records, *published_from))

    foreign = [
        os.path.join(output_dir, name) for name in sorted({*replaced, TRAINING_LOG} - {MARKER_NAME}) if not ours(name)
    ]
    if foreign:
        raise UnsafeOutputError(
            f"refusing to resume in {output_dir}: resuming would replace files crane-hf did not write, or changed "
            f"since it wrote them ({', '.join(foreign)}). Move them away or resume into a new --output-dir."
        )


def _claim_output_dir(
    args: argparse.Namespace, resume: str | None, claim: contextlib.ExitStack
) -> tuple[bool, dict[str, Any]]:
    output_dir = os.path.abspath(args.output_dir)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    claim.enter_context(output_lock(output_dir))
    clean_stale_temporaries(output_dir)
    clean_stale_temporaries_in(output_dir)
    resuming_in_place = resume is not None and os.path.dirname(os.path.abspath(resume)) == output_dir
    if resuming_in_place:
        _check_resume_in_place(output_dir, resume)
    else:
        if not args.overwrite:
            check_output_dir(output_dir, overwrite=False, protected=training_protections(args))
        else:
            check_replaceable(output_dir)
    first_epoch = read_trainer_state(resume)["epoch"] + 1 if resume else 1
    later = [checkpoint_path(output_dir, e) for e in range(first_epoch, args.epochs + 1)]
    existing = [path for path in later if os.path.exists(path)]
    if existing and not args.overwrite:
        raise OutputExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace them.")
    created = not os.path.exists(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if args.overwrite and resume is None:  # an earlier run's checkpoints must not pass for this run's
        for name in os.listdir(output_dir):
            if name.startswith(CHECKPOINT_PREFIX) or name in ("logs", TRAINING_LOG):
                path = os.path.join(output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    claim_entries(output_dir, [], "train")
    return created, file_signatures(output_dir)


def _claim_run_files(output_dir: str, before: dict[str, Any]) -> None:
    """List in the manifest of `output_dir` the files this run wrote there (new or changed since `before`, where
    training writes: `RUN_FILE_PREFIXES`)."""
    claim_changed(output_dir, before, RUN_FILE_PREFIXES, "train")


def _remove_unfinished_output(output_dir: str, before: dict[str, Any]) -> None:
    """After a failed run that created `output_dir` and finished no checkpoint: remove it, if it holds only files
    this run wrote, so that no half-made output folder is left."""
    if not os.path.isdir(output_dir):
        return
    _claim_run_files(output_dir, before)
    if list_checkpoints(output_dir) or unowned_entries(output_dir):
        return
    shutil.rmtree(output_dir, ignore_errors=True)


def _check_resume_settings(
    saved: dict[str, Any], current: dict[str, Any], checkpoint: str, names: Sequence[str] = RESUME_SETTINGS
) -> None:
    recorded = {**UNRECORDED_SETTINGS, **saved}
    different = [
        f"{name}: checkpoint {recorded.get(name)!r}, now {current[name]!r}"
        for name in names
        if recorded.get(name) != current[name]
    ]
    if different:
        what = {"data_sha256": "the data's content", "backbones_sha256": "the backbones' weights"}
        changed = [what[name] for name in names if name in what and recorded.get(name) != current[name]]
        raise ValueError(
            f"Cannot resume from {checkpoint}: these settings differ from the run that wrote it: "
            + "; ".join(different)
            + (f" ({' and '.join(changed)} changed, whatever the paths)" if changed else "")
            + "."
        )


def load_training_data(args: argparse.Namespace) -> datasets.Dataset:
    """The `--data` datasets, concatenated; anomalous images must have masks (the pixel losses need them)."""
    strict = getattr(args, "strict", False)
    parts = [load_data_source(spec, require_masks=True, strict=strict) for spec in args.data]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def check_training_data(images: ProcessedImages, args: argparse.Namespace, accelerator: Accelerator) -> str:
    """Prepare every row once before the first step (each process its share); returns the data's content
    fingerprint (`data_loading.dataset_fingerprint`).

    Raises:
        ValueError: rows that cannot be read (all of them named); data with no anomalous image, or no anomalous
            pixel in any mask, unless `--allow-no-anomalies`. Anomalous images whose mask is empty at the input size
            are warned about by name.
    """
    from accelerate.utils import gather_object

    rows = range(accelerator.process_index, len(images), accelerator.num_processes)
    found = check_rows(images, rows, args.num_workers, args.batch_size)
    merged = RowCheck()
    for part in gather_object([found]) if accelerator.num_processes > 1 else [found]:
        merged.merge(part)
    if merged.unreadable:
        lines = [f"{path} (row {row}): {reason}" for row, path, reason in sorted(merged.unreadable)]
        raise ValueError(
            f"{len(lines)} training image(s) cannot be prepared, found before the first step:\n  "
            + "\n  ".join(lines[:50])
            + (f"\n  ... and {len(lines) - 50} more" if len(lines) > 50 else "")
        )
    with_pixels = len(merged.anomalous) - len(merged.empty_masks)
    if not args.allow_no_anomalies and (not merged.anomalous or with_pixels == 0):
        problem = (
            f"has no anomalous image ({len(images)} normal images)"
            if not merged.anomalous
            else f"has no anomalous pixel in any mask ({len(merged.anomalous)} anomalous images, every mask empty "
            f"at {args.image_size} x {args.image_size})"
        )
        raise ValueError(
            f"The training data {' '.join(args.data)} {problem}: the prompts would learn that everything is normal. "
            "Train on annotated defects (the zero-shot protocol trains on a dataset's test split), or pass "
            "--allow-no-anomalies to train anyway."
        )
    if merged.empty_masks and accelerator.is_main_process:
        names = ", ".join(sorted(merged.empty_masks)[:20]) + (" ..." if len(merged.empty_masks) > 20 else "")
        print(
            f"warning: {len(merged.empty_masks)} anomalous image(s) have no anomalous pixel in their mask at "
            f"{args.image_size} x {args.image_size}; the pixel losses treat them as normal: {names}",
            file=sys.stderr,
        )
    return combine_digests([merged.digests[row] for row in range(len(images))])


def build_model(args: argparse.Namespace) -> CraneForAnomalyDetection:
    """Crane or Crane+ around the `--clip` (and `--dino`) backbones with fresh prompts, at `--image-size`, computing
    what the published code computes unless the computation options (`--eattn-maps per_layer`, ...) say otherwise."""
    return CraneForAnomalyDetection.from_backbones(
        args.clip, _dino_source(args), image_size=args.image_size, **computation_overrides(args)
    )


def _loss_values(output: CraneAnomalyDetectionOutput) -> torch.Tensor:
    return torch.stack([getattr(output, name).detach().float() for name in LOSS_NAMES])


def _has_accelerator_device() -> bool:
    """A GPU (or other accelerator) torch can use; `torch.accelerator` exists from torch 2.6."""
    device_api = getattr(torch, "accelerator", None)
    return device_api.is_available() if device_api is not None else torch.cuda.is_available()


def _make_accelerator(args: argparse.Namespace, output_dir: str) -> Accelerator:
    accelerator = Accelerator(
        cpu=args.cpu or not _has_accelerator_device(),  # no GPU: gloo processes on the CPU
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="tensorboard" if args.report_to == "tensorboard" else None,
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, "logs")),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ValueError(
            f"Launched as {launched} processes but accelerate set up {accelerator.num_processes}; each would train "
            "alone and write the same outputs. Check the accelerate configuration."
        )
    return accelerator


def _training_items(
    args: argparse.Namespace,
    model: CraneForAnomalyDetection,
    images: ProcessedImages,
    accelerator: Accelerator,
    cache_dir: str,
    data_sha256: str | None = None,
) -> tuple[torch.utils.data.Dataset, float]:
    """The images themselves, or with `--cache-features` their cached backbone outputs (filled first; the
    seconds that took are returned). The cache is keyed by the data's content fingerprint when given."""
    if not args.cache_features:
        return images, 0.0
    start = time.perf_counter()
    fingerprint = cache_fingerprint(model.config, images.dataset, accelerator.mixed_precision, data_sha256)
    cache = FeatureCache(cache_dir, fingerprint)
    fill_feature_cache(cache, model, images, accelerator, args.batch_size, args.num_workers)
    return CachedFeatures(cache, images.dataset["label"]), time.perf_counter() - start


def train(args: argparse.Namespace) -> str:
    """Train (or resume) as `args` say; returns the output folder, which holds the final prompts."""
    _check_arguments(args)
    parse_sources(args.data)  # fail on a wrong path or data named twice before loading backbones
    output_dir = os.path.abspath(args.output_dir)
    check_not_protected(output_dir, training_protections(args))
    check_writable(os.path.join(output_dir, TRAINING_LOG))  # before anything is loaded or created
    if args.resume_from_checkpoint is None:  # _claim_output_dir's checks without the lock: local refusals first
        check_output_dir(output_dir, overwrite=args.overwrite, protected=training_protections(args))
    check_backbones_available(args)  # one connection attempt at most; before any output is created
    accelerator = _make_accelerator(args, output_dir)
    resume = resolve_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    settings = _settings(args, accelerator)
    if resume:
        _check_resume_settings(read_trainer_state(resume)["settings"], settings, resume)
    with contextlib.ExitStack() as claim:
        created, before = _prepare_output_dir(args, resume, accelerator, claim)
        try:
            return _train(args, accelerator, resume, settings, output_dir, before)
        except BaseException:
            if accelerator.is_main_process:
                if created:
                    _remove_unfinished_output(output_dir, before)
                elif os.path.isdir(output_dir):
                    _claim_run_files(output_dir, before)
            raise


def _train(
    args: argparse.Namespace,
    accelerator: Accelerator,
    resume: str | None,
    settings: dict[str, Any],
    output_dir: str,
    before: dict[str, Any],
) -> str:
    """The training run itself, once the output folder is claimed (`before`: its files' signatures then)."""
    set_seed(args.seed)
    model = build_model(args)
    settings["backbones_sha256"] = module_fingerprint([model.clip, model.dino])
    model = model.to(accelerator.device)
    processor = CraneImageProcessor.from_crane_config(model.config)
    images = ProcessedImages(load_training_data(args), processor)
    settings["data_sha256"] = check_training_data(images, args, accelerator)  # before the first step
    if resume:
        _check_resume_settings(read_trainer_state(resume)["settings"], settings, resume, CONTENT_SETTINGS)
    cache_dir = args.feature_cache_dir or os.path.join(output_dir, FEATURE_CACHE)
    items, cache_seconds = _training_items(args, model, images, accelerator, cache_dir, settings["data_sha256"])

    sampler = EpochShuffleSampler(len(items), args.seed)
    loader = torch.utils.data.DataLoader(
        items, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers
    )
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=args.lr, betas=tuple(args.adam_betas))
    step_module, optimizer, loader = accelerator.prepare(CraneTrainingStep(model), optimizer, loader)
    register_prompt_state_hooks(accelerator, model)

    state: dict[str, Any] = {"epoch": 0, "global_step": 0, "settings": settings, "history": []}
    if resume:
        load_training_state(accelerator, resume)
        state = read_trainer_state(resume)
        state["settings"] = settings
    state["cache_fill_seconds"] = cache_seconds
    if args.report_to == "tensorboard":
        accelerator.init_trackers("crane", config={k: str(v) for k, v in settings.items()})

    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        summary = _train_epoch(accelerator, step_module, optimizer, loader, epoch, args, state, output_dir)
        state["epoch"] = epoch
        state["history"].append(summary)
        save_checkpoint(accelerator, model, processor, checkpoint_path(output_dir, epoch), state, args.overwrite)
        if accelerator.is_main_process:
            _claim_run_files(output_dir, before)
    if accelerator.is_main_process:
        publish_model(checkpoint_path(output_dir, state["epoch"]), output_dir)
        if args.cache_features and not args.feature_cache_dir and not args.keep_feature_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        _claim_run_files(output_dir, before)  # and the logs, complete now
    return output_dir


def _train_epoch(
    accelerator: Accelerator,
    step_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    epoch: int,
    args: argparse.Namespace,
    state: dict[str, Any],
    output_dir: str,
) -> dict[str, Any]:
    """One epoch; logs each optimizer step and returns the epoch's summary (mean losses, steps, seconds)."""
    set_seed(epoch_seed(args.seed, epoch, accelerator.process_index))
    loader.set_epoch(epoch)
    step_module.train()
    steps = micro_batches = 0
    step_sum = torch.zeros(len(LOSS_NAMES))
    epoch_sum = torch.zeros(len(LOSS_NAMES))
    progress = tqdm(
        total=len(loader) // args.gradient_accumulation_steps or 1,
        desc=f"epoch {epoch}/{args.epochs}",
        disable=not accelerator.is_local_main_process,
    )
    log_path = os.path.join(output_dir, TRAINING_LOG)
    start = time.perf_counter()
    try:
        for batch in loader:
            with accelerator.accumulate(step_module):
                output = step_module(batch)
                values = accelerator.reduce(_loss_values(output), reduction="mean").cpu()  # every process's
                if not torch.isfinite(values).all():
                    raise NonFiniteTrainingError(
                        f"Training stopped at epoch {epoch}, step {state['global_step'] + 1}: the loss is not finite "
                        f"({', '.join(f'{n} {float(v)}' for n, v in zip(LOSS_NAMES, values))}; rows "
                        f"{batch['index'].tolist()} on this process). Nothing of this epoch is saved or published. "
                        f"Lower --lr (now {args.lr}) or check the data."
                    )
                accelerator.backward(output.loss)
                optimizer.step()
                optimizer.zero_grad()
                if accelerator.sync_gradients:
                    _check_finite_prompts(step_module, epoch, state["global_step"] + 1, args.lr)
            step_sum += values
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue
            losses = step_sum / micro_batches
            epoch_sum += losses
            steps += 1
            state["global_step"] += 1
            record = {name: round(float(v), 6) for name, v in zip(LOSS_NAMES, losses)}
            accelerator.log(record, step=state["global_step"])
            if accelerator.is_main_process:
                with naming_write_errors(log_path), open(log_path, "a", encoding="utf-8") as log:
                    log.write(json.dumps({"epoch": epoch, "step": state["global_step"], **record}) + "\n")
            progress.set_postfix({k.replace("_loss", ""): f"{v:.4f}" for k, v in record.items()})
            progress.update(1)
            step_sum.zero_()
            micro_batches = 0
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    means = {f"mean_{name}": round(float(v), 6) for name, v in zip(LOSS_NAMES, epoch_sum / max(steps, 1))}
    return {"epoch": epoch, "steps": steps, "seconds": round(seconds, 3), "steps_per_second": steps / seconds, **means}


def _check_finite_prompts(step_module: torch.nn.Module, epoch: int, step: int, lr: float) -> None:
    """Raise `NonFiniteTrainingError` if an optimizer step made a prompt tensor NaN or infinite."""
    bad = [
        name
        for name, parameter in step_module.named_parameters()
        if parameter.requires_grad and not bool(torch.isfinite(parameter).all())
    ]
    if bad:
        raise NonFiniteTrainingError(
            f"Training stopped at epoch {epoch}, step {step}: the optimizer step made {', '.join(bad)} NaN or "
            f"infinite. Nothing of this epoch is saved or published. Lower --lr (now {lr})."
        )


__all__ = [
    "CraneTrainingStep",
    "NonFiniteTrainingError",
    "build_model",
    "check_backbones_available",
    "check_training_data",
    "epoch_seed",
    "load_training_data",
    "train",
]
