"""Few-shot evaluation, the literature's protocol (WinCLIP+, APRIL-GAN, AnomalyCLIP's few-shot tables): for each of
N seeds, K normal images drawn from each class's train split ("good" images, label 0) make that class's reference
memory (`models/crane/reference_memory.py`); the class's test images are scored with it; the metrics of the fused
outputs (and of the few-shot branch alone) are averaged over the seeds and reported with their standard deviation.

Draws: seed s orders a class's normal train images by path and picks K of them with `numpy.random.default_rng(s)`
(without replacement), so a draw depends only on the seed, the class and its images. `crane-hf evaluate --shots K
--seeds N` runs seeds 0 .. N-1; a class with fewer than K normal train images is refused before any image is scored.
A test image that is one of its class's drawn reference images (the same file, the same bytes, or the same decoded
pixels in other bytes: a test split that shares images with the train split, perhaps re-encoded) is left out of that
seed's scored images, as calibrate leaves them out: compared with itself it would score perfectly normal and inflate
the metrics. Finding re-encoded copies decodes each test image once more (once for all the seeds).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

FEW_SHOT_KINDS = ("fused", "few_shot", "zero_shot")  # the outputs whose metrics are computed


def normal_train_rows(train: Any) -> dict[str, list[int]]:
    """Class name -> rows of the normal (label 0) images of a train split, ordered by image path."""
    rows: dict[str, list[tuple[str, int]]] = {}
    for row, (name, label, path) in enumerate(zip(train["class_name"], train["label"], train["image_path"])):
        if int(label) == 0:
            rows.setdefault(str(name), []).append((str(path), row))
    return {name: [row for _, row in sorted(items)] for name, items in rows.items()}


def check_shots(available: dict[str, list[int]], classes: Sequence[str], shots: int, where: str) -> None:
    """Refuse (`ValueError`, one line naming the classes and counts) when a class has fewer than `shots` images."""
    short = [
        f"{name!r} has {len(available.get(name, []))}" for name in classes if len(available.get(name, [])) < shots
    ]
    if short:
        raise ValueError(
            f"--shots {shots}: not enough normal train images in {where} ({'; '.join(short)}); lower --shots."
        )


def draw_references(available: dict[str, list[int]], classes: Sequence[str], shots: int, seed: int) -> dict:
    """Class -> `shots` rows drawn without replacement from its normal train rows with `default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    return {name: sorted(int(i) for i in rng.choice(available[name], size=shots, replace=False)) for name in classes}


def row_fingerprint(record: dict[str, Any]) -> str:
    """sha256 of an undecoded row's image bytes (or of its file)."""
    from ..models.crane.reference_memory import file_fingerprint

    image = record["image"] or {}
    if image.get("bytes") is not None:
        return f"sha256:{hashlib.sha256(image['bytes']).hexdigest()}"
    return file_fingerprint(image.get("path") or record["image_path"])


def row_pixels(record: dict[str, Any]) -> str:
    """ "sha256:<hex>" of an undecoded row's decoded RGB pixels (`pixel_fingerprint`); `ValueError` / `OSError` for
    an image that cannot be read."""
    from ..models.crane.image_reading import read_encoded_image
    from ..models.crane.pipeline_zero_shot_anomaly_detection import pixel_fingerprint

    return pixel_fingerprint(read_encoded_image(record["image"]))


def row_file(record: dict[str, Any]) -> str | None:
    """The file an undecoded row's image is read from; None when the row holds the image's bytes."""
    image = record["image"] or {}
    return None if image.get("bytes") is not None else image.get("path") or record["image_path"]


def reference_rows(
    dataset: Any,
    rows: Sequence[int],
    memories: dict[str, Any],
    fingerprints: dict[int, str],
    pixel_fingerprints: dict[int, str] | None = None,
) -> list:
    """The `rows` of `dataset` that are reference images of their class's memory (`memories`: class -> memory), by
    file, bytes or decoded pixels (`few_shot_options.reference_images_among`): scored, they would be compared with
    themselves. `fingerprints` and `pixel_fingerprints` cache each row's sha256 of bytes and of pixels across seeds."""
    from ..few_shot_options import reference_images_among

    pixel_cache = {} if pixel_fingerprints is None else pixel_fingerprints

    def fingerprint(row: int) -> str:
        if row not in fingerprints:
            fingerprints[row] = row_fingerprint(dataset[row])
        return fingerprints[row]

    def pixels(row: int) -> str:
        if row not in pixel_cache:
            pixel_cache[row] = row_pixels(dataset[row])
        return pixel_cache[row]

    class_names = dataset["class_name"]
    found: list[int] = []
    for name, memory in memories.items():
        class_rows = [row for row in rows if class_names[row] == name]
        found += reference_images_among(
            class_rows, memory, fingerprint, path=lambda row: row_file(dataset[row]), pixels=pixels
        )
    return sorted(found)


def build_class_memory(model: Any, images: Any, rows: list[int], class_name: str, batch_size: int) -> Any:
    """The reference memory of `rows` of `images` (`training.data_loading.ProcessedImages` of the train split); it
    knows the files it was built from (`ReferenceMemory.image_paths`).

    Raises:
        ValueError: a reference image that cannot be read (named).
    """

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(rows), batch_size):
            yield torch.stack([images[row]["pixel_values"] for row in rows[start : start + batch_size]])

    fingerprints = [row_fingerprint(images.dataset[row]) for row in rows]
    memory = model.build_reference_memory(batches(), fingerprints, class_name=class_name)
    memory.image_paths = [path for path in (row_file(images.dataset[row]) for row in rows) if path is not None]
    memory.pixel_fingerprints = [row_pixels(images.dataset[row]) for row in rows]
    return memory


def score_with_memories(
    model: Any,
    processor: Any,
    dataset: Any,
    rows: Sequence[int],
    memories: dict[str, Any],
    batch_size: int,
    sigma: float,
    progress: bool,
) -> tuple[dict[str, dict[str, Any]], list[tuple[int, str]]]:
    """Score `rows` of `dataset`, each class with its memory; returns kind -> class -> `AnomalyMetricAccumulator`
    for the fused, few-shot and zero-shot outputs, and the skipped (row, reason)."""
    from ..metrics import AnomalyMetricAccumulator
    from ..models.crane.gaussian_smoothing import gaussian_smooth
    from ..training.data_loading import ProcessedImages
    from .batches import EvaluationItems, collate_items

    images = ProcessedImages(dataset, processor)
    class_names = list(images.dataset["class_name"])
    by_class: dict[str, list[int]] = {}
    for row in rows:
        by_class.setdefault(class_names[row], []).append(row)
    accumulators: dict[str, dict[str, AnomalyMetricAccumulator]] = {kind: {} for kind in FEW_SHOT_KINDS}
    skipped: list[tuple[int, str]] = []
    bar = tqdm(total=len(rows), desc="Evaluating (few-shot)", unit="image", disable=not progress)
    with torch.inference_mode():
        for name, class_rows in by_class.items():
            loader = torch.utils.data.DataLoader(
                EvaluationItems(images, class_rows), batch_size=batch_size, collate_fn=collate_items
            )
            for batch in loader:
                skipped.extend(batch["errors"])
                bar.update(len(batch["errors"]) + (len(batch["index"]) if "index" in batch else 0))
                if "pixel_values" not in batch:
                    continue
                pixels = batch["pixel_values"].to(device=model.device, dtype=model.dtype)
                output = model(pixels, reference_memory=memories[name])
                kinds = {
                    "fused": (output.fused_scores, output.fused_maps),
                    "few_shot": (output.few_shot_scores, output.few_shot_maps),
                    "zero_shot": (output.anomaly_scores, output.anomaly_maps),
                }
                results = {
                    kind: (scores.float().cpu().numpy(), gaussian_smooth(maps.float(), sigma).cpu().numpy())
                    for kind, (scores, maps) in kinds.items()
                }
                finite = np.ones(len(pixels), dtype=bool)
                for scores, maps in results.values():
                    finite &= np.isfinite(scores) & np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
                skipped.extend(
                    (row, "the model gave a non-finite score or map (no decision made)")
                    for row, ok in zip(batch["index"].tolist(), finite)
                    if not ok
                )
                if not finite.any():
                    continue
                masks = batch["masks"].numpy().astype(bool)[finite]
                labels = batch["labels"].numpy()[finite]
                for kind, (scores, maps) in results.items():
                    accumulators[kind].setdefault(name, AnomalyMetricAccumulator()).update(
                        labels, scores[finite], masks=masks, maps=maps[finite]
                    )
    bar.close()
    return accumulators, skipped


def mean_and_spread(tables: list[dict[str, dict[str, float | None]]]) -> tuple[dict, dict]:
    """Per row and metric, the mean and the population standard deviation over the seeds' tables (a metric that is
    undefined in some seed is averaged over the seeds that define it; None where none does)."""
    mean: dict[str, dict[str, float | None]] = {}
    spread: dict[str, dict[str, float | None]] = {}
    for row in tables[0]:
        keys = sorted({key for table in tables for key in table.get(row, {})})
        mean[row], spread[row] = {}, {}
        for key in keys:
            values = [table[row][key] for table in tables if table.get(row, {}).get(key) is not None]
            mean[row][key] = float(np.mean(values)) if values else None
            spread[row][key] = float(np.std(values)) if values else None
    return mean, spread


def markdown_with_spread(mean: dict, spread: dict, columns: Sequence[tuple[str, str]], title: str) -> str:
    """The paper's table layout, each cell "mean ± std" in percent."""
    header = "| class | " + " | ".join(label for _, label in columns) + " |"
    lines = [f"# {title}", "", header, "|---" * (len(columns) + 1) + "|"]
    for name, row in mean.items():
        cells = [
            "-" if row.get(key) is None else f"{100 * row[key]:.1f} ± {100 * (spread[name].get(key) or 0.0):.1f}"
            for key, _ in columns
        ]
        lines.append(f"| {'**mean**' if name == 'mean' else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def train_split_of(spec: str) -> str:
    """The train-split spec of a `--data` spec (same root and classes)."""
    from ..data import DataSource

    source = DataSource.parse(spec)
    return str(DataSource(source.root, "train", source.classes))


def reference_paths(images: Any, rows: list[int]) -> list[str]:
    from ..training.data_loading import image_file

    return [os.fspath(image_file(images.dataset[row])) for row in rows]


__all__ = [
    "FEW_SHOT_KINDS",
    "build_class_memory",
    "check_shots",
    "draw_references",
    "markdown_with_spread",
    "mean_and_spread",
    "normal_train_rows",
    "reference_rows",
    "row_file",
    "row_pixels",
    "score_with_memories",
    "train_split_of",
]
