"""Evaluating a model on annotated datasets, on one process or many: the per-class metrics of the paper and their
mean, the paper's protocol per dataset, and the report files. The command line is `crane-hf evaluate` /
`python -m crane_hf.evaluate` (`crane_hf/commands/evaluate.py`). What was computed (variant, E-Attn map source,
D-Attn input, deep-prompt rounding, soft_mean, input size, smoothing, AUPRO variant and where the prompts come from:
`computation_record`) heads `metrics.md` and is stored under "computation" in `metrics.json`.

Under `accelerate launch` the images are split into contiguous shards without padding, each process scores its
shard, and the per-class metric states are gathered and merged on the main process, so the results equal a
single-process run. Unreadable images (missing, truncated, corrupt, multi-frame, over the decompression-bomb
limit), masks of the wrong size, anomalous images missing the mask their class's other anomalous images (or their
ground-truth folder) have, images whose score or map is not finite, and every file under a class folder that no
entry uses (with the reason: a subfolder too deep, a mask matching no image, ...) are reported in `skipped.txt` and
`metrics.json` (file and reason) and left out; `--strict` refuses such a dataset instead. Masks in a lossy format
(JPEG) are binarised at mid-range and listed (`lossy_masks`).
Anomalous images whose mask marks no pixel, or none at S x S, and masks that mark every pixel stay in the metrics
(as in the published evaluation) and are named, one line per kind, and listed under "warnings" in `metrics.json`
(`data/mask_checks.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io.atomic import atomic_output_dir
from ..io.output_safety import on_main_process, protected_paths

TABLE_COLUMNS = (
    ("image_auroc", "Image AUROC"),
    ("image_ap", "Image AP"),
    ("image_f1_max", "Image F1-max"),
    ("pixel_auroc", "Pixel AUROC"),
    ("pixel_aupro", "Pixel AUPRO"),
    ("pixel_f1_max", "Pixel F1-max"),
)
MEDICAL_DATASETS = ("headct", "brainmri", "br35h", "isic", "clinicdb", "colondb", "tn3k")
INDUSTRIAL_DATASETS = ("mvtec", "visa", "mpdd", "btad", "ksdd", "dtd", "dagm")


def paper_protocol(dataset: str, variant: str = "crane+") -> dict[str, Any]:
    """The published setting for `dataset` (spec section 8): which preset, soft_mean and AUPRO variant.

    Prompts trained on VisA serve MVTec-AD, prompts trained on MVTec-AD serve every other dataset; Crane+ uses
    the epoch-1 prompts and the soft mean on medical datasets, and the soft mean on DAGM.
    """
    name = dataset.lower().replace("-", "").replace("_", "")
    known = next((d for d in (*INDUSTRIAL_DATASETS, *MEDICAL_DATASETS) if name.startswith(d)), None)
    if known is None:
        raise ValueError(
            f"--protocol paper does not know the dataset {dataset!r}; name it with --dataset "
            f"({', '.join(INDUSTRIAL_DATASETS + MEDICAL_DATASETS)})."
        )
    source = "visa" if known == "mvtec" else "mvtec"
    medical = known in MEDICAL_DATASETS
    if variant == "crane+":
        preset = "crane+/mvtec-epoch1" if medical else f"crane+/{source}"
        soft_mean = medical or known == "dagm"
    else:
        preset, soft_mean = f"crane/{source}", True
    return {"dataset": known, "preset": preset, "soft_mean": soft_mean, "aupro": "legacy"}


class _EvaluationItems(torch.utils.data.Dataset):
    """`ProcessedImages` of some rows; a row that cannot be read or processed comes back as its error message, so
    that one bad file never stops the evaluation. An anomalous row whose mask is empty, vanishes at S x S or marks
    every pixel carries the kind (`data.mask_checks.mask_problem`) as "mask_problem"."""

    def __init__(self, images: Any, rows: Sequence[int]):
        self.images = images
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        from ..data.mask_checks import mask_problem
        from ..training.data_loading import UnreadableRowError

        row = self.rows[position]
        try:
            item = self.images[row]
        except UnreadableRowError as error:
            return {"index": torch.tensor(row), "error": error.reason}
        if int(item["labels"]) == 1:
            try:
                item["mask_problem"] = mask_problem(self.images.dataset[row]["mask"], item["masks"])
            except (ValueError, OSError) as error:  # the file changed since it was read a moment ago
                return {"index": torch.tensor(row), "error": f"mask could not be read again: {error}"}
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [item for item in items if "error" not in item]
    batch: dict[str, Any] = {"errors": [(int(item["index"]), item["error"]) for item in items if "error" in item]}
    batch["mask_problems"] = [(int(item["index"]), item["mask_problem"]) for item in good if item.get("mask_problem")]
    if good:
        for key in ("pixel_values", "masks", "labels", "index"):
            batch[key] = torch.stack([item[key] for item in good])
    return batch


def score_dataset(
    model: Any,
    processor: Any,
    dataset: Any,
    rows: Sequence[int],
    batch_size: int = 8,
    sigma: float = 4.0,
    overlay_dir: str | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[tuple[int, str]], list[tuple[int, str]]]:
    """Score `rows` of `dataset`; returns per-class `AnomalyMetricAccumulator`s, the skipped (row, reason) and the
    (row, kind) of the evaluated anomalous rows whose mask is suspicious (`data.mask_checks.MASK_PROBLEMS`: kept in
    the metrics, as the published evaluation keeps them).

    Rows whose image or mask cannot be decoded (truncated, corrupt, too many pixels) or processed are skipped."""
    from ..metrics import AnomalyMetricAccumulator
    from ..models.crane.gaussian_smoothing import gaussian_smooth
    from ..training.data_loading import ProcessedImages

    images = ProcessedImages(dataset, processor)
    dataset = images.dataset  # undecoded: reading a row decodes nothing
    loader = torch.utils.data.DataLoader(_EvaluationItems(images, rows), batch_size=batch_size, collate_fn=_collate)
    class_names = list(dataset["class_name"])
    accumulators: dict[str, AnomalyMetricAccumulator] = {}
    skipped: list[tuple[int, str]] = []
    mask_problems: list[tuple[int, str]] = []
    device = model.device
    # The overlays' contour is the model's pixel threshold, where it holds for this computation (and sigma); a
    # threshold calibrated under another one draws no contour rather than a wrong one (CraneConfig.check_thresholds).
    stale = model.config.stale_threshold_fields(image=False, pixel=True, smoothing_sigma=sigma)
    contour = None if stale else model.config.pixel_threshold
    with torch.inference_mode():
        for batch in tqdm(loader, desc="Evaluating", unit="batch", disable=not progress):
            skipped.extend(batch["errors"])
            if "pixel_values" not in batch:
                continue
            output = model(batch["pixel_values"].to(device=device, dtype=model.dtype))
            maps = gaussian_smooth(output.anomaly_maps.float(), sigma).cpu().numpy()
            scores = output.anomaly_scores.float().cpu().numpy()
            indices = batch["index"].tolist()
            finite = np.isfinite(scores) & np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
            skipped.extend(
                (row, "the model gave a non-finite score or map (no decision made)")
                for row, ok in zip(indices, finite)
                if not ok
            )
            names = np.array([class_names[row] for row in indices])
            masks = batch["masks"].numpy().astype(bool)
            labels = batch["labels"].numpy()
            for name in dict.fromkeys(names[finite]):
                selected = (names == name) & finite
                accumulators.setdefault(name, AnomalyMetricAccumulator()).update(
                    labels[selected], scores[selected], masks=masks[selected], maps=maps[selected]
                )
            indices, maps = [row for row, ok in zip(indices, finite) if ok], maps[finite]
            mask_problems.extend((row, kind) for row, kind in batch["mask_problems"] if row in indices)
            if overlay_dir is not None:
                _save_overlays(dataset, indices, maps, contour, overlay_dir)
    return accumulators, skipped, mask_problems


def _save_overlays(dataset: Any, rows: list[int], maps: np.ndarray, threshold: float | None, folder: str) -> None:
    """One overlay per row at `folder`/<class>/<image path with "/" as "__">.png, with the contour of `threshold`
    unless it is None, both names made safe from the data (`io/output_names.py`: no separator or "..", extension
    kept, shortened) and checked to stay inside `folder`."""
    from PIL import Image

    from ..io.output_names import path_inside, safe_file_name, source_file_name
    from ..models.crane.image_reading import read_encoded_image
    from ..models.crane.visualization import render_overlay

    for row, anomaly_map in zip(rows, maps):
        record = dataset[row]  # an undecoded row
        image = read_encoded_image(record["image"]).convert("RGB")
        resized = np.asarray(
            Image.fromarray(anomaly_map, mode="F").resize(image.size, Image.Resampling.BILINEAR), dtype=np.float32
        )
        class_folder = safe_file_name(str(record["class_name"]))
        path = path_inside(folder, f"{class_folder}/{source_file_name(str(record['image_path']), '.png')}")
        if os.path.exists(path):  # two rows with one safe name (a repeated entry, or "a/b" and "a__b"): keep both
            path = path_inside(folder, f"{class_folder}/{source_file_name(str(record['image_path']), f'~{row}.png')}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        render_overlay(image, resized, threshold=threshold).save(path)


def metrics_table(results: dict[str, dict[str, float | None]], aupro: str) -> dict[str, dict[str, float | None]]:
    """Per-class rows (in dataset order) and their "mean" row, with `pixel_aupro` of the chosen definition."""
    table: dict[str, dict[str, float | None]] = {}
    for name, both in results.items():
        row = dict(both["official"])
        row["pixel_aupro"] = both[aupro].get("pixel_aupro")
        row["pixel_aupro_official"] = both["official"].get("pixel_aupro")
        row["pixel_aupro_legacy"] = both["legacy"].get("pixel_aupro")
        table[name] = row
    keys = {key for row in table.values() for key in row}
    mean = {}
    for key in sorted(keys):
        values = [row[key] for row in table.values() if row.get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
    table["mean"] = mean
    return table


def mean_row_classes(table: dict[str, dict[str, float | None]]) -> dict[str, list[str]]:
    """Metric -> the classes its "mean" row value averages: those where it is defined (a class with only normal or
    only anomalous images has no image AUROC, one without masks no pixel metrics)."""
    classes = [name for name in table if name != "mean"]
    keys = sorted({key for name in classes for key in table[name]})
    return {key: [name for name in classes if table[name].get(key) is not None] for key in keys}


def _markdown(
    table: dict[str, dict[str, float | None]], title: str, mean_classes: dict[str, list[str]] | None = None
) -> str:
    header = "| class | " + " | ".join(label for _, label in TABLE_COLUMNS) + " |"
    lines = [f"# {title}", "", header, "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name, row in table.items():
        values = ["-" if row.get(key) is None else f"{100 * row[key]:.1f}" for key, _ in TABLE_COLUMNS]
        label = f"**{name}**" if name == "mean" else name
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    total = len([name for name in table if name != "mean"])
    partial = [
        f"{label} over {len(mean_classes.get(key, []))} of {total} ({', '.join(mean_classes.get(key, [])) or 'none'})"
        for key, label in TABLE_COLUMNS
        if mean_classes is not None and len(mean_classes.get(key, [])) != total
    ]
    if partial:
        lines += ["", "The mean row averages the classes where a metric is defined: " + "; ".join(partial) + "."]
    return "\n".join(lines) + "\n"


def computation_record(model: Any, spec: str, aupro: str, sigma: float) -> dict[str, Any]:
    """What an evaluation computed, so that a table can be traced to its settings: the variant, the three
    computation fields (and whether they are the published code's), soft_mean, the feature layers, the input size,
    the smoothing, the AUPRO variant and where the prompts come from (`model_loading.prompts_origin`)."""
    from ..model_loading import computation_summary, prompts_origin

    config = model.config
    return {
        **computation_summary(model),
        "feature_layers": list(config.feature_layers),
        "image_size": config.image_size,
        "smoothing_sigma": sigma,
        "aupro": aupro,
        "prompts": prompts_origin(spec, model),
    }


def _computation_lines(record: dict[str, Any]) -> list[str]:
    """The head of metrics.md: `computation_record` in words, one line per item."""
    prompts = record["prompts"]
    origin = {
        "preset": f"preset {prompts.get('preset')}",
        "folder": f"folder {prompts.get('path')}",
        "hub": f"Hub repository {prompts.get('repo_id')}",
    }[prompts["kind"]]
    if prompts["kind"] != "preset" and prompts.get("preset"):
        origin += f" (saved from preset {prompts['preset']})"
    if prompts.get("converted_from"):
        source = prompts["converted_from"]
        origin += f" (converted from {source.get('checkpoint')}, sha256 {source.get('sha256')})"
    published = "the published code's" if record["published_computation"] else "differs from the published code's"
    shown = {
        "eattn_map_source": record["eattn_map_source"],
        "dattn_input": record["dattn_input"],
        "deep_prompt_rounding_dtype": record["deep_prompt_rounding_dtype"] or "not rounded",
    }
    for name in record.get("not_applicable", []):
        shown[name] = f"not applicable to this {record['variant']}"
    return [
        f"- model: {record['variant']}, feature layers {record['feature_layers']}, prompts from {origin}",
        f"- computation ({published}): E-Attn maps {shown['eattn_map_source']}, D-Attn input "
        f"{shown['dattn_input']}, deep prompts {shown['deep_prompt_rounding_dtype']}",
        f"- soft_mean {record['soft_mean']}, image size {record['image_size']}, smoothing sigma "
        f"{record['smoothing_sigma']}, AUPRO {record['aupro']}",
    ]


def write_report(folder: str, table: dict[str, dict[str, float | None]], info: dict[str, Any]) -> None:
    """metrics.md (headed by the computation that ran), metrics.csv and metrics.json in `folder` (which the
    caller writes atomically)."""
    title = f"{info['model']} on {', '.join(info['data'])} (AUPRO: {info['aupro']})"
    markdown = _markdown(table, title, info.get("mean_classes"))
    if info.get("computation"):
        head, _, rest = markdown.partition("\n\n")
        markdown = head + "\n\n" + "\n".join(_computation_lines(info["computation"])) + "\n\n" + rest
    with open(os.path.join(folder, "metrics.md"), "w", encoding="utf-8") as stream:
        stream.write(markdown)
    columns = sorted({key for row in table.values() for key in row})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["class", *columns])
    for name, row in table.items():
        writer.writerow([name, *("" if row.get(key) is None else f"{row[key]:.6f}" for key in columns)])
    with open(os.path.join(folder, "metrics.csv"), "w", encoding="utf-8", newline="") as stream:
        stream.write(buffer.getvalue())
    with open(os.path.join(folder, "metrics.json"), "w", encoding="utf-8") as stream:
        json.dump({**info, "metrics": table}, stream, indent=2)
    if info["skipped"]:
        with open(os.path.join(folder, "skipped.txt"), "w", encoding="utf-8") as stream:
            stream.writelines(f"{item['image_path']}\t{item['reason']}\n" for item in info["skipped"])


def evaluate_model(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by the command-line arguments; returns the report written to disk."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from ..computation_options import computation_overrides
    from ..data import DataSource, InvalidRecordWarning, LossyMaskWarning, UnusedFileWarning, load_data_source
    from ..model_loading import load_model
    from ..training.data_loading import undecoded

    state = PartialState(cpu=not torch.accelerator.is_available())  # no GPU: gloo processes on the CPU
    overrides: dict[str, Any] = {}
    model_spec, aupro = args.model, args.aupro
    if args.protocol == "paper":
        dataset_name = args.dataset or os.path.basename(os.path.normpath(DataSource.parse(args.data[0]).root))
        protocol = paper_protocol(dataset_name, args.variant)
        model_spec = model_spec or protocol["preset"]
        overrides["soft_mean"] = protocol["soft_mean"]
        aupro = protocol["aupro"]
    if model_spec is None:
        raise ValueError(
            "Name the model with --model (a preset, a model folder or a Hub id), or use --protocol paper."
        )
    overrides.update(computation_overrides(args))
    device = str(state.device) if args.device == "auto" else args.device
    model, processor = load_model(
        model_spec,
        clip=args.clip,
        dino=args.dino,
        allow_backbone_mismatch=args.allow_backbone_mismatch,
        device=device,
        dtype=args.dtype,
        **overrides,
    )
    with warnings.catch_warnings(record=True) as caught:
        for category in (InvalidRecordWarning, UnusedFileWarning, LossyMaskWarning):
            warnings.simplefilter("always", category)
        # require_masks=None: an anomalous image without a mask, in a class whose other anomalous images have masks,
        # is reported and left out instead of counting as all normal pixels. --strict refuses instead.
        datasets_ = [
            load_data_source(spec, require_masks=None, skip_invalid=not args.strict, strict=args.strict)
            for spec in args.data
        ]
    invalid = [w.message for w in caught if isinstance(w.message, InvalidRecordWarning)]
    unused = [w.message for w in caught if isinstance(w.message, UnusedFileWarning)]
    left_out = [{"image_path": problem.image_path, "reason": problem.reason} for problem in invalid]
    left_out += [{"image_path": item.path, "reason": f"not used: {item.reason}"} for item in unused]
    lossy = [path for w in caught if isinstance(w.message, LossyMaskWarning) for path in w.message.files]
    for message in (w.message for w in caught if isinstance(w.message, LossyMaskWarning)):
        print(f"warning: {message}", file=sys.stderr)
    import datasets as hf_datasets

    dataset = undecoded(hf_datasets.concatenate_datasets(datasets_) if len(datasets_) > 1 else datasets_[0])
    with contextlib.ExitStack() as claim:
        # The main process claims the output (lock, checks, marked temporary folder) before any image is scored;
        # the others write their overlays into the same temporary folder.
        staging = _claim_output(claim, state, args, evaluation_protections(args, model_spec))
        stale = model.config.stale_threshold_fields(image=False, pixel=True, smoothing_sigma=args.sigma)
        if args.save_overlays and stale and state.is_main_process:
            changes = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in stale.items())
            print(
                f"note: the overlays have no threshold contour: the model's pixel_threshold was calibrated for "
                f"another computation ({changes})",
                file=sys.stderr,
            )
        with state.split_between_processes(list(range(len(dataset)))) as shard:
            accumulators, skipped, mask_problems = score_dataset(
                model,
                processor,
                dataset,
                shard,
                args.batch_size,
                args.sigma,
                os.path.join(staging, "overlays") if args.save_overlays else None,
                state.is_main_process and not args.quiet,
            )
        states = {name: acc.state_dict() for name, acc in accumulators.items()}
        gathered = gather_object([(states, skipped, mask_problems)])
        if not state.is_main_process:
            return {}
        return _report(staging, gathered, dataset, args, model, model_spec, aupro, state, left_out, lossy)


def _claim_output(claim: contextlib.ExitStack, state: Any, args: argparse.Namespace, protected: list) -> str:
    """The temporary output folder, opened by the main process and shared with the others (or its error)."""
    output = atomic_output_dir(args.output, overwrite=args.overwrite, protected=protected, command="evaluate")
    return on_main_process(state, lambda: claim.enter_context(output))


def evaluation_protections(args: argparse.Namespace, model_spec: str | None) -> list[tuple[str, str]]:
    """What the output of `evaluate` may not be or contain: the dataset roots, the model and backbone folders."""
    from ..data import DataSource

    roots = []
    for spec in args.data:
        try:
            roots.append(DataSource.parse(spec).root)
        except (OSError, ValueError):
            continue
    return [
        *protected_paths("the dataset root", roots),
        *protected_paths("the model folder", [model_spec]),
        *protected_paths("a backbone", [args.clip, args.dino]),
    ]


def _report(
    staging: str,
    gathered: list,
    dataset: Any,
    args: argparse.Namespace,
    model: Any,
    model_spec: str,
    aupro: str,
    state: Any,
    left_out: list[dict[str, str]],
    lossy: list[str],
) -> dict[str, Any]:
    """Merge the processes' metric states and write the report into `staging` (main process); `left_out`: the
    dataset's invalid entries and unused files (file and reason), `lossy`: masks binarised at mid-range."""
    from ..data.mask_checks import mask_problem_warnings
    from ..metrics import AnomalyMetricAccumulator
    from ..training.data_loading import image_file

    merged: dict[str, AnomalyMetricAccumulator] = {}
    all_skipped: list[tuple[int, str]] = []
    suspicious: dict[str, list[str]] = {}  # kind -> mask files, in dataset order
    for states, shard_skipped, shard_mask_problems in gathered:
        all_skipped.extend(shard_skipped)
        for row, kind in shard_mask_problems:
            record = dataset[row]
            suspicious.setdefault(kind, []).append(record["mask"]["path"] or f"the mask of {image_file(record)}")
        for name, part in states.items():
            merged.setdefault(name, AnomalyMetricAccumulator()).merge(part)
    order = list(dict.fromkeys(dataset["class_name"]))
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined metrics are reported as None in the tables
        for name in (n for n in order if n in merged):
            results[name] = {
                variant: merged[name].compute(aupro_variant=variant, max_fpr=0.3) for variant in ("official", "legacy")
            }
    table = metrics_table(results, aupro)
    info = {
        "model": getattr(model.config, "preset", None) or model_spec,
        "data": list(args.data),
        "aupro": aupro,
        "smoothing_sigma": args.sigma,
        "image_size": model.config.image_size,
        "soft_mean": model.config.soft_mean,
        "computation": computation_record(model, model_spec, aupro, args.sigma),
        "processes": state.num_processes,
        "images": sum(m.num_images for m in merged.values()),
        "skipped": [{"image_path": image_file(dataset[row]), "reason": reason} for row, reason in all_skipped]
        + left_out,
        "lossy_masks": lossy,
        # masks kept in the metrics but almost always data errors: one entry per kind (data/mask_checks.py)
        "warnings": [
            {"kind": w.kind, "count": len(w.files), "files": w.files, "message": str(w)}
            for w in mask_problem_warnings(suspicious, "evaluate", model.config.image_size)
        ],
        "mean_classes": mean_row_classes(table),  # metric -> the classes the mean row averages
    }
    write_report(staging, table, info)
    return {"table": table, "info": info}
