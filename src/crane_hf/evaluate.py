"""`crane-hf evaluate`: the paper's metrics per class and their mean, on any dataset, on one process or many.

    crane-hf evaluate --model crane+/visa --data /data/mvtec --output eval-mvtec
    crane-hf evaluate --protocol paper --data /data/visa --output eval-visa
    accelerate launch --multi_gpu --num_processes 2 -m crane_hf.evaluate --model DIR --data ROOT --output OUT

For each class: image AUROC, AP and F1-max, and on the smoothed S x S maps (sigma 4, spec section 7) pixel
AUROC, AUPRO and F1-max (pixel AP too, in the CSV and JSON), then the mean over classes, written as
`metrics.md` (the paper's layout, in percent), `metrics.csv` and `metrics.json`. Both AUPRO definitions are
computed: "official" (MVTec-AD's, exact) and "legacy" (the official Crane code's 200 thresholds, which the paper's
numbers use); the table shows `--aupro` (legacy under `--protocol paper`).

Under `accelerate launch` the images are split into contiguous shards without padding, each process scores its
shard, and the per-class metric states are gathered and merged on the main process, so the results equal a
single-process run. Unreadable images (missing, truncated, corrupt, over the decompression-bomb limit), masks of the
wrong size and anomalous images missing the mask their class's other anomalous images have are reported in
`skipped.txt` and `metrics.json` (file and reason) and left out; the rest is evaluated (exit code 3).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic_io import atomic_output_dir, check_can_write

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
    that one bad file never stops the evaluation."""

    def __init__(self, images: Any, rows: Sequence[int]):
        self.images = images
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        from .training_data import UnreadableRowError

        row = self.rows[position]
        try:
            return self.images[row]
        except UnreadableRowError as error:
            return {"index": torch.tensor(row), "error": error.reason}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [item for item in items if "error" not in item]
    batch: dict[str, Any] = {"errors": [(int(item["index"]), item["error"]) for item in items if "error" in item]}
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
    image_scores: list[tuple[int, float]] | None = None,
) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """Score `rows` of `dataset`; returns per-class `AnomalyMetricAccumulator`s and the skipped (row, reason).

    Rows whose image or mask cannot be decoded (truncated, corrupt, too many pixels) or processed are skipped.
    `overlay_dir`: write each image's decision figure there (`<class>/<image path>.png`); `image_scores`: a list
    that receives (row, image score) of every scored image."""
    from .gaussian_smoothing import gaussian_smooth
    from .metrics import AnomalyMetricAccumulator
    from .training_data import ProcessedImages

    images = ProcessedImages(dataset, processor)
    dataset = images.dataset  # undecoded: reading a row decodes nothing
    loader = torch.utils.data.DataLoader(_EvaluationItems(images, rows), batch_size=batch_size, collate_fn=_collate)
    class_names = list(dataset["class_name"])
    accumulators: dict[str, AnomalyMetricAccumulator] = {}
    skipped: list[tuple[int, str]] = []
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
            names = np.array([class_names[row] for row in indices])
            masks = batch["masks"].numpy().astype(bool)
            for name in dict.fromkeys(names):
                selected = names == name
                accumulators.setdefault(name, AnomalyMetricAccumulator()).update(
                    batch["labels"].numpy()[selected], scores[selected], masks=masks[selected], maps=maps[selected]
                )
            if image_scores is not None:
                image_scores.extend(zip(indices, scores.tolist()))
            if overlay_dir is not None:
                _save_overlays(dataset, indices, maps, scores, model.config, overlay_dir)
    return accumulators, skipped


def overlay_path(record: dict[str, Any]) -> str:
    """Where the decision figure of a dataset row goes, relative to the overlays folder: `<class>/<figure name>`."""
    from .reporting.output_names import figure_file_name

    return os.path.join(record["class_name"], figure_file_name(record["image_path"]))


def _save_overlays(
    dataset: Any, rows: list[int], maps: np.ndarray, scores: np.ndarray, config: Any, folder: str
) -> None:
    """Decision figures (image | map at the image's size | pixels over the pixel threshold) of `rows`."""
    from PIL import Image

    from .image_files import read_encoded_image
    from .reporting.decision_figure import save_decision_figure

    for row, anomaly_map, score in zip(rows, maps, scores):
        record = dataset[row]  # an undecoded row
        image = read_encoded_image(record["image"]).convert("RGB")
        resized = np.asarray(
            Image.fromarray(anomaly_map, mode="F").resize(image.size, Image.Resampling.BILINEAR), dtype=np.float32
        )
        path = os.path.join(folder, overlay_path(record))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_decision_figure(
            path,
            image,
            np.clip(resized, 0.0, 1.0),  # bilinear resizing stays in range up to rounding
            score=float(score),
            image_threshold=config.image_threshold,
            pixel_threshold=config.pixel_threshold,
            name=record["image_path"],
        )


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


def _markdown(table: dict[str, dict[str, float | None]], title: str) -> str:
    header = "| class | " + " | ".join(label for _, label in TABLE_COLUMNS) + " |"
    lines = [f"# {title}", "", header, "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name, row in table.items():
        values = ["-" if row.get(key) is None else f"{100 * row[key]:.1f}" for key, _ in TABLE_COLUMNS]
        label = f"**{name}**" if name == "mean" else name
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def write_report(folder: str, table: dict[str, dict[str, float | None]], info: dict[str, Any]) -> None:
    """metrics.md, metrics.csv and metrics.json in `folder` (which the caller writes atomically)."""
    title = f"{info['model']} on {', '.join(info['data'])} (AUPRO: {info['aupro']})"
    with open(os.path.join(folder, "metrics.md"), "w", encoding="utf-8") as stream:
        stream.write(_markdown(table, title))
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

    from .data import DataSource, InvalidRecordWarning, load_data_source
    from .metrics import AnomalyMetricAccumulator
    from .model_loading import load_model
    from .training_data import image_file, undecoded

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
    if args.soft_mean is not None:
        overrides["soft_mean"] = args.soft_mean == "true"
    device = str(state.device) if args.device == "auto" else args.device
    model, processor = load_model(
        model_spec, clip=args.clip, dino=args.dino, device=device, dtype=args.dtype, **overrides
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InvalidRecordWarning)
        # require_masks=None: an anomalous image without a mask, in a class whose other anomalous images have masks,
        # is reported and left out instead of counting as all normal pixels.
        datasets_ = [load_data_source(spec, require_masks=None, skip_invalid=True) for spec in args.data]
    invalid = [w.message for w in caught if isinstance(w.message, InvalidRecordWarning)]
    import datasets as hf_datasets

    dataset = undecoded(hf_datasets.concatenate_datasets(datasets_) if len(datasets_) > 1 else datasets_[0])
    output = os.path.abspath(args.output)
    overlay_dir = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.overlays-tmp")
    save_overlays = args.save_overlays or args.report
    if save_overlays and state.is_main_process:
        shutil.rmtree(overlay_dir, ignore_errors=True)
    state.wait_for_everyone()
    image_scores: list[tuple[int, float]] = []
    with state.split_between_processes(list(range(len(dataset)))) as shard:
        accumulators, skipped = score_dataset(
            model,
            processor,
            dataset,
            shard,
            args.batch_size,
            args.sigma,
            overlay_dir if save_overlays else None,
            state.is_main_process and not args.quiet,
            image_scores,
        )
    gathered = gather_object([({name: acc.state_dict() for name, acc in accumulators.items()}, skipped, image_scores)])
    if not state.is_main_process:
        return {}
    merged: dict[str, AnomalyMetricAccumulator] = {}
    all_skipped: list[tuple[int, str]] = []
    all_scores: list[tuple[int, float]] = []
    for states, shard_skipped, shard_scores in gathered:
        all_skipped.extend(shard_skipped)
        all_scores.extend(shard_scores)
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
        "processes": state.num_processes,
        "images": sum(m.num_images for m in merged.values()),
        "skipped": [{"image_path": image_file(dataset[row]), "reason": reason} for row, reason in all_skipped]
        + [{"image_path": problem.image_path, "reason": problem.reason} for problem in invalid],
    }
    with atomic_output_dir(output, overwrite=args.overwrite) as staging:
        write_report(staging, table, info)
        if save_overlays and os.path.isdir(overlay_dir):
            os.rename(overlay_dir, os.path.join(staging, "overlays"))
        if args.report:
            _write_html_report(staging, dataset, sorted(all_scores), table, info, model.config, not args.quiet)
    return {"table": table, "info": info}


def _write_html_report(
    folder: str,
    dataset: Any,
    scores: list[tuple[int, float]],
    table: dict[str, Any],
    info: dict[str, Any],
    config: Any,
    progress: bool,
) -> None:
    """report.html: the scored images with their decision figures, the metric table and the curves per class."""
    from .reporting.run_report import write_run_report
    from .training_data import image_file

    rows = []
    for row, score in scores:
        record = dataset[row]
        rows.append(
            {
                "path": image_file(record),
                "name": record["image_path"],
                "class_name": record["class_name"],
                "label": int(record["label"]),
                "score": min(max(score, 0.0), 1.0),
                "is_anomalous": score >= config.image_threshold,
                "overlay": os.path.join("overlays", overlay_path(record)),
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="preset name, model folder or Hub id")
    parser.add_argument(
        "--data", nargs="+", required=True, help="dataset ROOT[:SPLIT[:CLASS,...]] (split defaults to test)"
    )
    parser.add_argument("--output", default="crane-hf-evaluation", help="folder to write (default: %(default)s)")
    parser.add_argument("--protocol", choices=["paper"], default=None, help="the published setting for the dataset")
    parser.add_argument("--dataset", default=None, help="dataset name for --protocol paper (default: the folder name)")
    parser.add_argument("--variant", choices=["crane", "crane+"], default="crane+", help="model for --protocol paper")
    parser.add_argument("--aupro", choices=["official", "legacy"], default="official", help="AUPRO shown in the table")
    parser.add_argument("--soft-mean", choices=["true", "false"], default=None, help="override the model's soft_mean")
    parser.add_argument("--sigma", type=float, default=4.0, help="Gaussian smoothing of the maps (spec: 4)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--clip", default=None, help="local CLIP folder for a preset")
    parser.add_argument("--dino", default=None, help="local DINOv2 folder for a preset")
    parser.add_argument("--save-overlays", action="store_true", help="also write a decision figure per image")
    parser.add_argument(
        "--report", action="store_true", help="also write report.html (figures, metric table, ROC and PR curves)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        check_can_write(args.output, args.overwrite)
        report = evaluate_model(args)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not report:
        return 0
    print(_markdown(report["table"], f"{report['info']['model']} (AUPRO: {report['info']['aupro']})"))
    print(f"Wrote metrics.md, metrics.csv and metrics.json to {args.output}")
    if args.report:
        print(f"Report: {os.path.join(os.path.abspath(args.output), 'report.html')}")
    for item in report["info"]["skipped"]:
        print(f"skipped {item['image_path']}: {item['reason']}", file=sys.stderr)
    return 3 if report["info"]["skipped"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crane_hf.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
