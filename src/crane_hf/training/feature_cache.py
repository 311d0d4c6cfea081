"""Backbone outputs of each training image, computed once and stored on disk (training with `--cache-features`).

The backbones are frozen, so `encode_image` gives the same result in every epoch; only the prompts change. The
cache holds, per image, one safetensors file with `image_embeds` [D], `patch_features` [M', N, D] (the distinct
maps, `CraneConfig.map_slots`) and the prepared mask [S, S] (uint8), and `cache_info.json` with a fingerprint of
everything the features depend on (backbones, E-Attn / D-Attn settings including the computation fields
`eattn_map_source` and `dattn_input`, input size, mixed precision, and the images: training passes the content
fingerprint of its data, `data_loading.dataset_fingerprint`; otherwise their paths, file sizes and times). A cache
made for something else is refused rather than silently reused. Memory stays bounded: items are read from disk one
at a time by the data loader.

Size per image: M' * N * D * 4 bytes, e.g. 4.2 MB for Crane at S = 518 (its four maps are one computed map of
37 x 37 patches, D = 768; 16.8 MB with `eattn_map_source="per_layer"`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import datasets
import torch
from safetensors.torch import load_file, save

from ..io.atomic import atomic_write_bytes, atomic_write_text

CACHE_INFO = "cache_info.json"
# CraneConfig fields that change what `encode_image` computes.
VISION_FIELDS = (
    "clip_backbone",
    "dino_backbone",
    "image_size",
    "eattn_layers",
    "eattn_type",
    "feature_layers",
    "dattn_beta",
    "dattn_gamma",
    "both_eattn_dattn",
    "eattn_map_source",
    "dattn_input",
    "clip_image_mean",
    "clip_image_std",
    "dino_image_mean",
    "dino_image_std",
)


class FeatureCacheMismatchError(ValueError):
    """The cache folder holds features computed for another model, input size or dataset."""


def _file_signature(path: str | None) -> list:
    if not path:
        return []
    stat = os.stat(path)
    return [path, stat.st_size, stat.st_mtime_ns]


def dataset_signature(dataset: datasets.Dataset) -> str:
    """SHA-256 over the image and mask files of `dataset` (path, size, modification time) and the labels."""
    raw = dataset.cast_column("image", datasets.Image(decode=False)).cast_column("mask", datasets.Image(decode=False))
    digest = hashlib.sha256()
    for image, mask, label in zip(raw["image"], raw["mask"], raw["label"]):
        entry = [_file_signature(image["path"]), _file_signature(mask["path"] if mask else None), label]
        digest.update(json.dumps(entry).encode())
    return digest.hexdigest()


def cache_fingerprint(
    config: Any, dataset: datasets.Dataset, mixed_precision: str, content_sha256: str | None = None
) -> dict[str, Any]:
    """What the cached features depend on (see the module docstring). `content_sha256`: the data's content
    fingerprint (`data_loading.dataset_fingerprint`, as training computes it); without it, the files' paths, sizes
    and modification times stand for their content."""
    vision = {name: getattr(config, name) for name in VISION_FIELDS}
    vision["clip_vision_config"] = config.clip_config.vision_config.to_dict()
    vision["dino_config"] = config.dino_config.to_dict() if config.dino_config is not None else None
    return {
        "format": 1,
        "model": vision,
        "mixed_precision": mixed_precision,
        "num_images": len(dataset),
        "images_sha256": content_sha256 or dataset_signature(dataset),
    }


class FeatureCache:
    """A folder of per-image backbone outputs, keyed by dataset row."""

    def __init__(self, folder: str, fingerprint: dict[str, Any]):
        self.folder = folder
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON

    def check(self) -> bool:
        """True if the folder holds a cache with this fingerprint, False if it holds none; raises on a mismatch."""
        info_path = os.path.join(self.folder, CACHE_INFO)
        if not os.path.isfile(info_path):
            return False
        with open(info_path, encoding="utf-8") as stream:
            stored = json.load(stream)
        if stored != self.fingerprint:
            different = sorted(
                key for key in set(stored) | set(self.fingerprint) if stored.get(key) != self.fingerprint.get(key)
            )
            raise FeatureCacheMismatchError(
                f"The feature cache {self.folder} was made for another setting (differs in: {', '.join(different)}). "
                "Remove it or choose another --feature-cache-dir."
            )
        return True

    def create(self) -> None:
        """Create the folder and its `cache_info.json` (call on one process)."""
        if not self.check():
            os.makedirs(self.folder, exist_ok=True)
            atomic_write_text(os.path.join(self.folder, CACHE_INFO), json.dumps(self.fingerprint, indent=2) + "\n")

    def path(self, index: int) -> str:
        return os.path.join(self.folder, f"{int(index):08d}.safetensors")

    def has(self, index: int) -> bool:
        return os.path.isfile(self.path(index))

    def store(self, index: int, image_embeds: torch.Tensor, patch_features: torch.Tensor, mask: torch.Tensor) -> None:
        """Write one image's outputs: image_embeds [D], patch_features [M, N, D], mask [S, S] (atomically)."""
        tensors = {
            "image_embeds": image_embeds.detach().cpu().contiguous(),
            "patch_features": patch_features.detach().cpu().contiguous(),
            "mask": (mask > 0.5).to(torch.uint8).cpu().contiguous(),
        }
        atomic_write_bytes(self.path(index), save(tensors))

    def load(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(self.path(index))


class CachedFeatures(torch.utils.data.Dataset):
    """Training items from a `FeatureCache`: `image_embeds` [D], `patch_features` [M, N, D], `masks` [S, S] (float
    {0, 1}), `labels`, `index`."""

    def __init__(self, cache: FeatureCache, labels: list[int]):
        self.cache = cache
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        stored = self.cache.load(index)
        return {
            "image_embeds": stored["image_embeds"],
            "patch_features": stored["patch_features"],
            "masks": stored["mask"].float(),
            "labels": torch.tensor(int(self.labels[index])),
            "index": torch.tensor(int(index)),
        }


def feature_grid(config: Any) -> tuple[int, int]:
    """The patch grid of the maps `encode_image` returns: S / 14 for both backbones (the DINOv2 grid for Crane+)."""
    from ..models.crane.configuration_crane import _as_int

    patch_config = config.dino_config if config.use_dattn else config.clip_config.vision_config
    side = config.image_size // _as_int(patch_config.patch_size)
    return (side, side)


def fill_feature_cache(
    cache: FeatureCache,
    model: Any,
    images: torch.utils.data.Dataset,
    accelerator: Any,
    batch_size: int,
    num_workers: int = 0,
) -> int:
    """Compute and store the backbone outputs of every image of `images` (`ProcessedImages`) not yet cached.

    Each process encodes its share of the missing images; after a barrier, a process that still misses entries (a
    cache folder not shared between machines) computes them itself. Returns how many images this process encoded.
    """
    from tqdm.auto import tqdm

    if accelerator.is_main_process:
        cache.create()
    accelerator.wait_for_everyone()
    cache.create()  # no-op where the main process's folder is visible; raises on a mismatch
    encoded = 0
    for share in (accelerator.process_index, None):
        missing = [index for index in range(len(images)) if not cache.has(index)]
        if share is not None:
            missing = missing[share :: accelerator.num_processes]
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(images, missing), batch_size=batch_size, num_workers=num_workers
        )
        progress = tqdm(
            loader, desc="caching backbone outputs", disable=not accelerator.is_local_main_process or not missing
        )
        for batch in progress:
            with torch.no_grad(), accelerator.autocast():
                image_embeds, patch_features, _ = model.encode_image(batch["pixel_values"].to(accelerator.device))
            for row, index in enumerate(batch["index"].tolist()):
                cache.store(index, image_embeds[row], patch_features[:, row], batch["masks"][row])
            encoded += len(batch["index"])
        if share is not None:
            accelerator.wait_for_everyone()
    return encoded


__all__ = [
    "CachedFeatures",
    "FeatureCache",
    "FeatureCacheMismatchError",
    "cache_fingerprint",
    "dataset_signature",
    "feature_grid",
    "fill_feature_cache",
]
