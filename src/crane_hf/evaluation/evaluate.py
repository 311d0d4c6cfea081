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

from ..io.atomic import atomic_output_dir, naming_write_errors, write_text_file
from ..io.output_safety import on_main_process, protected_paths
from .batches import EvaluationItems as _EvaluationItems
from .batches import collate_items as _collate

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


def score_dataset(
    model: Any,
    processor: Any,
    dataset: Any,
    rows: Sequence[int],
    batch_size: int = 8,
    sigma: float = 4.0,
    overlay_dir: str | None = None,
    progress: bool = True,
    image_results: list[tuple[int, float, str]] | None = None,
) -> tuple[dict[str, Any], list[tuple[int, str]], list[tuple[int, str]]]:
    """Score `rows` of `dataset`; returns per-class `AnomalyMetricAccumulator`s, the skipped (row, reason) and the
    (row, kind) of the evaluated anomalous rows whose mask is suspicious (`data.mask_checks.MASK_PROBLEMS`: kept in
    the metrics, as the published evaluation keeps them).

    Rows whose image or mask cannot be decoded (truncated, corrupt, too many pixels) or processed are skipped.
    `overlay_dir`: write each image's decision figure there (`_save_overlays`); `image_results`: a list that
    receives (row, image score, figure path relative to `overlay_dir` or "") of every image scored with a finite
    score and map."""
    from ..metrics import AnomalyMetricAccumulator
    from ..models.crane.gaussian_smoothing import gaussian_smooth
    from ..training.data_loading import ProcessedImages

    images = ProcessedImages(dataset, processor)
    dataset = images.dataset  # undecoded: reading a row decodes nothing
    loader = torch.utils.data.DataLoader(_EvaluationItems(images, rows), batch_size=batch_size, collate_fn=_collate)
    class_names = list(dataset["class_name"])
    if overlay_dir is not None:
        _check_overlay_folders(overlay_dir, class_names)  # before the first image is scored
    accumulators: dict[str, AnomalyMetricAccumulator] = {}
    skipped: list[tuple[int, str]] = []
    mask_problems: list[tuple[int, str]] = []
    device = model.device
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
            indices, maps, scores = [row for row, ok in zip(indices, finite) if ok], maps[finite], scores[finite]
            mask_problems.extend((row, kind) for row, kind in batch["mask_problems"] if row in indices)
            figures = [""] * len(indices)
            if overlay_dir is not None:
                figures = _save_overlays(dataset, indices, maps, scores, model.config, overlay_dir)
            if image_results is not None:
                image_results.extend(zip(indices, scores.tolist(), figures))
    return accumulators, skipped, mask_problems


def _check_overlay_folders(folder: str, class_names: Sequence[Any]) -> None:
    """Refuse, naming it, a class whose overlay folder (`safe_file_name` of its name) would not stay inside
    `folder` (`UnsafeOutputPathError`), before any image is scored."""
    from ..io.output_names import path_inside, safe_file_name

    for name in dict.fromkeys(str(name) for name in class_names):
        path_inside(folder, safe_file_name(name))


def _save_overlays(
    dataset: Any, rows: list[int], maps: np.ndarray, scores: np.ndarray, config: Any, folder: str
) -> list[str]:
    """One decision figure per row (image | map at the image's size with colour bar | pixels at or above the pixel
    threshold, with name, verdict, score and thresholds: `reporting/decision_figure.py`) at
    `folder`/<class>/<image path with "/" as "__">.png, both names made safe from the data (`io/output_names.py`: no
    separator or "..", extension kept, shortened) and checked to stay inside `folder`; returns the figures' paths
    relative to `folder`."""
    from PIL import Image

    from ..io.output_names import path_inside, safe_file_name, source_file_name
    from ..models.crane.image_reading import read_encoded_image
    from ..reporting.decision_figure import save_decision_figure

    written = []
    for row, anomaly_map, score in zip(rows, maps, scores):
        record = dataset[row]  # an undecoded row
        image = read_encoded_image(record["image"]).convert("RGB")
        resized = np.asarray(
            Image.fromarray(anomaly_map, mode="F").resize(image.size, Image.Resampling.BILINEAR), dtype=np.float32
        )
        class_folder = safe_file_name(str(record["class_name"]))
        relative = f"{class_folder}/{source_file_name(str(record['image_path']), '.png')}"
        if os.path.exists(path_inside(folder, relative)):  # two rows with one safe name ("a/b" and "a__b"): keep both
            relative = f"{class_folder}/{source_file_name(str(record['image_path']), f'~{row}.png')}"
        path = path_inside(folder, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with naming_write_errors(path):
            save_decision_figure(
                path,
                image,
                np.clip(resized, 0.0, 1.0),  # bilinear resizing stays in range up to rounding
                score=float(score),
                image_threshold=config.image_threshold,
                pixel_threshold=config.pixel_threshold,
                name=str(record["image_path"]),
            )
        written.append(relative)
    return written


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
        "exported": f"exported folder {prompts.get('path')} (ONNX Runtime / OpenVINO; computation fixed at export)",
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
    write_text_file(os.path.join(folder, "metrics.md"), markdown)
    columns = sorted({key for row in table.values() for key in row})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["class", *columns])
    for name, row in table.items():
        writer.writerow([name, *("" if row.get(key) is None else f"{row[key]:.6f}" for key in columns)])
    write_text_file(os.path.join(folder, "metrics.csv"), buffer.getvalue())
    write_text_file(os.path.join(folder, "metrics.json"), json.dumps({**info, "metrics": table}, indent=2))
    if info["skipped"]:
        lines = "".join(f"{item['image_path']}\t{item['reason']}\n" for item in info["skipped"])
        write_text_file(os.path.join(folder, "skipped.txt"), lines)


def evaluate_model(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by the command-line arguments; returns the report written to disk."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from ..computation_options import computation_overrides
    from ..data import InvalidRecordWarning, LossyMaskWarning, UnusedFileWarning, load_data_source
    from ..model_loading import load_model, model_kind
    from ..training.data_loading import undecoded

    state = PartialState(cpu=not torch.accelerator.is_available())  # no GPU: gloo processes on the CPU
    overrides: dict[str, Any] = {}
    model_spec, aupro = args.model, args.aupro
    if args.protocol == "paper":
        protocol = paper_protocol(paper_dataset_name(args), args.variant)
        model_spec = model_spec or protocol["preset"]
        overrides["soft_mean"] = protocol["soft_mean"]
        aupro = protocol["aupro"]
    if model_spec is None:
        raise ValueError(
            "Name the model with --model (a preset, a model folder or a Hub id), or use --protocol paper."
        )
    overrides.update(computation_overrides(args))
    # "auto": the process's accelerate device; an exported folder runs on the CPU, which "auto" then means.
    device = str(state.device) if args.device == "auto" and model_kind(model_spec) != "exported" else args.device
    model, processor = load_model(
        model_spec,
        clip=args.clip,
        dino=args.dino,
        allow_backbone_mismatch=args.allow_backbone_mismatch,
        device=device,
        dtype=args.dtype,
        **overrides,
    )
    if args.save_overlays or args.report:
        # The decision figures and the report state verdicts: thresholds calibrated under another computation (or
        # sigma) do not hold for this one, so they are refused before any work, as predict refuses them.
        from ..models.crane.configuration_crane import threshold_context

        # a folder's own memory fuses the scores; the dtype the model runs in
        model.config.check_thresholds(image=True, pixel=True, smoothing_sigma=args.sigma, **threshold_context(model))
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
    if getattr(args, "shots", None):
        return _evaluate_few_shot(args, state, model, processor, dataset, model_spec, aupro, left_out, lossy)
    with contextlib.ExitStack() as claim:
        # The main process claims the output (lock, checks, marked temporary folder) before any image is scored;
        # the others write their overlays into the same temporary folder.
        staging = _claim_output(claim, state, args, evaluation_protections(args, model_spec))
        image_results: list[tuple[int, float, str]] = []
        with state.split_between_processes(list(range(len(dataset)))) as shard:
            accumulators, skipped, mask_problems = score_dataset(
                model,
                processor,
                dataset,
                shard,
                args.batch_size,
                args.sigma,
                os.path.join(staging, "overlays") if args.save_overlays or args.report else None,
                state.is_main_process and not args.quiet,
                image_results,
            )
        states = {name: acc.state_dict() for name, acc in accumulators.items()}
        gathered = gather_object([(states, skipped, image_results, mask_problems)])
        if not state.is_main_process:
            return {}
        return _report(staging, gathered, dataset, args, model, model_spec, aupro, state, left_out, lossy)


def _claim_output(claim: contextlib.ExitStack, state: Any, args: argparse.Namespace, protected: list) -> str:
    """The temporary output folder, opened by the main process and shared with the others (or its error)."""
    output = atomic_output_dir(args.output, overwrite=args.overwrite, protected=protected, command="evaluate")
    return on_main_process(state, lambda: claim.enter_context(output))


def paper_dataset_name(args: argparse.Namespace) -> str:
    """The dataset name `--protocol paper` goes by: `--dataset`, else the folder name of the first `--data`."""
    from ..data import DataSource

    return args.dataset or os.path.basename(os.path.normpath(DataSource.parse(args.data[0]).root))


def evaluated_model(args: argparse.Namespace) -> str | None:
    """The model `evaluate` runs: `--model`, else under `--protocol paper` the protocol's preset; None for neither."""
    if args.model is not None or args.protocol != "paper":
        return args.model
    return paper_protocol(paper_dataset_name(args), args.variant)["preset"]


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
    from ..training.data_loading import image_file

    all_skipped = [item for _, shard_skipped, _, _ in gathered for item in shard_skipped]
    all_results = [item for _, _, shard_results, _ in gathered for item in shard_results]
    suspicious: dict[str, list[str]] = {}  # kind -> mask files, in dataset order
    for _, _, _, shard_mask_problems in gathered:
        for row, kind in shard_mask_problems:
            record = dataset[row]
            suspicious.setdefault(kind, []).append(record["mask"]["path"] or f"the mask of {image_file(record)}")
    merged = _merge_states([states for states, _, _, _ in gathered])
    table = _class_table(merged, list(dict.fromkeys(dataset["class_name"])), aupro)
    info = _report_info(dataset, args, model, model_spec, aupro, state, left_out, lossy, merged, all_skipped)
    # masks kept in the metrics but almost always data errors: one entry per kind (data/mask_checks.py)
    info["warnings"] = [
        {"kind": w.kind, "count": len(w.files), "files": w.files, "message": str(w)}
        for w in mask_problem_warnings(suspicious, "evaluate", model.config.image_size)
    ]
    info["mean_classes"] = mean_row_classes(table)  # metric -> the classes the mean row averages
    write_report(staging, table, info)
    if args.report:
        _write_html_report(staging, dataset, sorted(all_results), table, info, model.config, not args.quiet)
    return {"table": table, "info": info}


def _merge_states(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per class, the processes' metric states merged into one `AnomalyMetricAccumulator`."""
    from ..metrics import AnomalyMetricAccumulator

    merged: dict[str, AnomalyMetricAccumulator] = {}
    for states in parts:
        for name, part in states.items():
            merged.setdefault(name, AnomalyMetricAccumulator()).merge(part)
    return merged


def _class_table(merged: dict[str, Any], order: list[str], aupro: str) -> dict[str, dict[str, float | None]]:
    """The metrics table (`metrics_table`) of merged accumulators, classes in dataset order."""
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined metrics are reported as None in the tables
        for name in (n for n in order if n in merged):
            results[name] = {
                variant: merged[name].compute(aupro_variant=variant, max_fpr=0.3) for variant in ("official", "legacy")
            }
    return metrics_table(results, aupro)


def _report_info(
    dataset: Any,
    args: argparse.Namespace,
    model: Any,
    model_spec: str,
    aupro: str,
    state: Any,
    left_out: list[dict[str, str]],
    lossy: list[str],
    merged: dict[str, Any],
    all_skipped: list[tuple[int, str]],
) -> dict[str, Any]:
    """What `metrics.json` records besides the metrics: model, data, computation, images, skipped files."""
    from ..training.data_loading import image_file

    return {
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
    }


def _write_html_report(
    folder: str,
    dataset: Any,
    results: list[tuple[int, float, str]],
    table: dict[str, Any],
    info: dict[str, Any],
    config: Any,
    progress: bool,
) -> None:
    """report.html: the scored images (`results`: row, score, decision figure below `overlays/`), the metric
    table and each class's ROC and precision-recall curves (`reporting/run_report.py`)."""
    from ..models.crane.thresholds import at_or_above
    from ..reporting.run_report import write_run_report
    from ..training.data_loading import image_file

    rows = []
    for row, score, figure in results:
        record = dataset[row]
        rows.append(
            {
                "path": image_file(record),
                "name": str(record["image_path"]),
                "class_name": str(record["class_name"]),
                "label": int(record["label"]),
                "score": score,
                "is_anomalous": at_or_above(score, config.image_threshold),
                "overlay": f"overlays/{figure}" if figure else "",
            }
        )
    write_run_report(
        folder,
        rows,
        image_threshold=config.image_threshold,
        pixel_threshold=config.pixel_threshold,
        title=f"crane-hf evaluate: {info['model']} on {', '.join(info['data'])}",
        kind="evaluate",
        model=str(info["model"]),
        metrics=table,
        metric_columns=TABLE_COLUMNS,
        skipped=[{"path": item["image_path"], "reason": item["reason"]} for item in info["skipped"]],
        progress=progress,
    )


def _evaluate_few_shot(
    args: argparse.Namespace,
    state: Any,
    model: Any,
    processor: Any,
    dataset: Any,
    model_spec: str,
    aupro: str,
    left_out: list[dict[str, str]],
    lossy: list[str],
) -> dict[str, Any]:
    """`--shots K --seeds N`: per seed, each class's memory of K normal train images, the test images scored with it;
    the tables of the fused, few-shot and zero-shot outputs averaged over the seeds with their spread
    (`evaluation/few_shot.py`). `metrics` in metrics.json is the fused mean."""
    import datasets as hf_datasets
    from accelerate.utils import gather_object

    from ..data import load_data_source
    from ..training.data_loading import ProcessedImages, image_file, undecoded
    from .few_shot import (
        FEW_SHOT_KINDS,
        build_class_memory,
        check_shots,
        draw_references,
        markdown_with_spread,
        mean_and_spread,
        normal_train_rows,
        reference_paths,
        reference_rows,
        score_with_memories,
        train_split_of,
    )

    train_specs = [train_split_of(spec) for spec in args.data]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the train split's own unused files are not this evaluation's
        try:
            parts = [load_data_source(spec, skip_invalid=True) for spec in train_specs]
        except (OSError, ValueError) as error:
            raise ValueError(f"--shots needs each dataset's train split: {error}") from error
    train = undecoded(hf_datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0])
    available = normal_train_rows(train)
    class_names = list(dataset["class_name"])
    order = list(dict.fromkeys(class_names))
    check_shots(available, order, args.shots, ", ".join(train_specs))  # before any image is scored
    train_images = ProcessedImages(train, processor)
    per_seed: dict[int, dict[str, Any]] = {}
    references: dict[int, dict[str, list[str]]] = {}
    skipped: list[tuple[int, str]] = []
    test_fingerprints: dict[int, str] = {}  # each test row hashed once, whatever the number of seeds
    test_pixels: dict[int, str] = {}  # and decoded once more at most, to find re-encoded reference images
    with contextlib.ExitStack() as claim:
        staging = _claim_output(claim, state, args, evaluation_protections(args, model_spec))
        with state.split_between_processes(list(range(len(dataset)))) as shard:
            shard_classes = list(dict.fromkeys(class_names[row] for row in shard))
            for seed in range(args.seeds):
                draws = draw_references(available, order, args.shots, seed)
                references[seed] = {name: reference_paths(train_images, draws[name]) for name in order}
                memories = {
                    name: build_class_memory(model, train_images, draws[name], name, args.batch_size)
                    for name in shard_classes
                }
                # a test image that is one of its class's reference images would be compared with itself
                left_out_rows = set(reference_rows(dataset, shard, memories, test_fingerprints, test_pixels))
                accumulators, shard_skipped = score_with_memories(
                    model,
                    processor,
                    dataset,
                    [row for row in shard if row not in left_out_rows],
                    memories,
                    args.batch_size,
                    args.sigma,
                    state.is_main_process and not args.quiet,
                )
                states = {
                    kind: {n: acc.state_dict() for n, acc in accumulators[kind].items()} for kind in accumulators
                }
                left_out_paths = [image_file(dataset[row]) for row in sorted(left_out_rows)]
                per_seed[seed] = {
                    "states": gather_object([states]),
                    "skipped": gather_object([shard_skipped]),
                    "left_out": gather_object([left_out_paths]),
                }
        if not state.is_main_process:
            return {}
        tables: dict[str, list[dict[str, Any]]] = {kind: [] for kind in FEW_SHOT_KINDS}
        for seed in range(args.seeds):
            gathered = per_seed[seed]["states"]
            for kind in FEW_SHOT_KINDS:
                tables[kind].append(_class_table(_merge_states([part[kind] for part in gathered]), order, aupro))
        skipped = [item for part in per_seed[0]["skipped"] for item in part]  # the same test images every seed
        merged = _merge_states([part["zero_shot"] for part in per_seed[0]["states"]])
        info = _report_info(dataset, args, model, model_spec, aupro, state, left_out, lossy, merged, skipped)
        summary = {kind: dict(zip(("mean", "std"), mean_and_spread(tables[kind]))) for kind in FEW_SHOT_KINDS}
        info["few_shot"] = {
            "shots": args.shots,
            "seeds": list(range(args.seeds)),
            "fusion_weight": model.config.few_shot_fusion_weight,
            "features": model.config.few_shot_features,
            "draw": "numpy.random.default_rng(seed).choice of each class's normal train images ordered by path",
            "train_splits": train_specs,
            "reference_images": {str(seed): paths for seed, paths in references.items()},
            "reference_images_left_out": {
                str(seed): [path for part in per_seed[seed]["left_out"] for path in part] for seed in range(args.seeds)
            },
            "metrics": summary,
            "per_seed": {
                str(seed): {kind: tables[kind][i] for kind in FEW_SHOT_KINDS}
                for i, seed in enumerate(range(args.seeds))
            },
        }
        table = summary["fused"]["mean"]
        write_report(staging, table, info)
        title = f"{info['model']} on {', '.join(info['data'])}, {args.shots}-shot, {args.seeds} seeds (AUPRO: {aupro})"
        lines = [markdown_with_spread(summary["fused"]["mean"], summary["fused"]["std"], TABLE_COLUMNS, title)]
        lines.insert(1, "\n".join(_computation_lines(info["computation"])) + "\n")
        for kind, label in (("few_shot", "few-shot branch alone"), ("zero_shot", "zero-shot (no memory)")):
            lines.append(markdown_with_spread(summary[kind]["mean"], summary[kind]["std"], TABLE_COLUMNS, label))
        with open(os.path.join(staging, "metrics.md"), "w", encoding="utf-8") as stream:
            stream.write("\n".join(lines))
    return {"table": table, "info": info, "markdown": "\n".join(lines)}
