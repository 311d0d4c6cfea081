"""Few-shot anomaly detection: the reference memory (memory bank) of a class's normal images and its scoring.

From k normal images of one class the memory keeps the patch features the model already computes for its zero-shot
map: every distinct dense CLIP map (`CraneForAnomalyDetection.encode_image`, L2-normalized), and for Crane+ the
DINOv2 last-layer patch tokens (L2-normalized here), all on the maps' patch grid. A test patch is scored by its
cosine distance to the nearest memory patch of the same source (exact nearest neighbour, no sampling or coreset):

    few_shot_patch = mean over sources of (1 - max_m cos(f, m)) / 2          in [0, 1]

The map is upsampled bilinearly to the input size like the zero-shot map (and smoothed with it by
`post_process_anomaly_maps`); the image's few-shot score is its largest patch value. Nearest-neighbour patch
matching of normal images is WinCLIP+'s few-shot branch (Jeong et al., CVPR 2023, "WinCLIP", section 4) and
VAND / APRIL-GAN's (Chen et al., 2023, arXiv 2305.17382), on DINOv2 features AnomalyDINO (Damm et al., WACV 2025);
the halving keeps the distance in [0, 1] as WinCLIP+ does, so maps and thresholds live on one scale.

Fusion (`CraneConfig.few_shot_fusion_weight`, w, default 0.5):

    fused_map = (1 - w) * zero_shot_map + w * few_shot_map
    fused_score = (1 - w) * zero_shot_score + w * few_shot_score

w = 0.5 is the average of the zero-shot and few-shot maps and scores that WinCLIP+ uses (APRIL-GAN sums the two
maps, which ranks pixels the same); w = 1 is the few-shot branch alone, w = 0 the zero-shot model.

A memory is saved as safetensors (`save`, `load`; `MEMORY_FILE_NAME` beside a model's weights): the features, the
class name, each image's fingerprint (sha256 of the file bytes, or of the pixel array) and, where known, the sha256 of
its decoded RGB pixels (so that a re-encoded copy of a reference image, other bytes with the same pixels, is known as
one), the settings that decide the features and the model's features of a fixed probe image, by which a memory of
another model is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MEMORY_FILE_NAME = "reference_memory.safetensors"
MEMORY_FORMAT = "crane-reference-memory/1"
# Similarities computed at a time by `nearest_patch_distances` (float32: 16 MiB), whatever k and the image size.
DISTANCE_CHUNK_ELEMENTS = 1 << 22
# Mean cosine similarity between a memory's probe features and the model's, below which the memory is refused:
# the same weights in another dtype stay above 0.99, another backbone is far below.
PROBE_MIN_COSINE = 0.9
# Why an image to score whose decoded pixels are those of a reference image is left out (predict, calibrate).
SAME_PIXELS_REASON = (
    "the same pixels as a reference image of the few-shot memory (compared with itself it would score as normal)"
)
FEW_SHOT_FEATURES = ("all", "clip", "dino")
# How far from 1 the L2 norm of a memory feature row may be: float16 / bfloat16 models normalize in their dtype
# (errors near 4e-3); a row further off was not written by `build_reference_memory` and is refused.
UNIT_NORM_TOLERANCE = 2e-2
# The config fields that decide the features a memory holds; a memory built under other values is refused.
FEATURE_FIELDS = (
    "variant",
    "image_size",
    "feature_layers",
    "eattn_layers",
    "eattn_type",
    "eattn_map_source",
    "dattn_input",
    "both_eattn_dattn",
    "dattn_beta",
    "dattn_gamma",
    "clip_image_mean",
    "clip_image_std",
    "dino_image_mean",
    "dino_image_std",
)


def file_fingerprint(path: str | os.PathLike) -> str:
    """ "sha256:<hex>" of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def array_fingerprint(array: np.ndarray) -> str:
    """ "sha256:<hex>" of a pixel array: its dtype, shape and bytes (C order)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return f"sha256:{digest.hexdigest()}"


def is_reference_memory_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a safetensors file written by `ReferenceMemory.save` (reads the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as reader:
            return (reader.metadata() or {}).get("format") == MEMORY_FORMAT
    except (SafetensorError, OSError):
        return False


def probe_pixel_values(image_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fixed, structured input [1, 3, S, S] (sines of several frequencies per channel, in CLIP-normalized units)
    whose features identify the model a memory was built with."""
    coordinates = torch.linspace(0.0, 1.0, image_size, dtype=torch.float64)
    y, x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    channels = [torch.sin(2 * math.pi * (a * x + b * y) + c) for a, b, c in ((3, 5, 0.1), (7, 2, 1.3), (1, 9, 2.2))]
    return (1.5 * torch.stack(channels)).unsqueeze(0).to(dtype)


def nearest_patch_distances(
    queries: torch.Tensor, memory: torch.Tensor, chunk_elements: int = DISTANCE_CHUNK_ELEMENTS
) -> torch.Tensor:
    """Cosine distance 1 - max_m <q, m> of each query patch to its nearest memory patch: [B, N] float32.

    Args:
        queries: L2-normalized patch features [B, N, C].
        memory: L2-normalized memory patches [P, C].
        chunk_elements: at most this many similarities exist at a time (rows of queries x columns of memory), so
            memory use is bounded whatever P (k images x N patches) and the image size.

    Exact: every similarity is computed (float32); the maximum is taken chunk by chunk. Each image is processed on
    its own with the same chunks, so its distances do not depend on the other images of the batch.

    Raises:
        ValueError: feature sizes differ, or the memory is empty.
    """
    if queries.dim() != 3 or memory.dim() != 2 or queries.shape[-1] != memory.shape[-1]:
        raise ValueError(
            f"query features {list(queries.shape)} and memory {list(memory.shape)} must be [B, N, C] and [P, C]."
        )
    if memory.shape[0] == 0:
        raise ValueError("the reference memory holds no patches.")
    memory = memory.to(device=queries.device, dtype=torch.float32)
    columns = max(1, min(memory.shape[0], chunk_elements))
    rows = max(1, chunk_elements // columns)
    result = torch.empty(queries.shape[:2], dtype=torch.float32, device=queries.device)
    for image, image_queries in enumerate(queries.float()):
        for start in range(0, image_queries.shape[0], rows):
            block = image_queries[start : start + rows]
            best = torch.full((block.shape[0],), -math.inf, dtype=torch.float32, device=queries.device)
            for column in range(0, memory.shape[0], columns):
                similarity = block @ memory[column : column + columns].T
                best = torch.maximum(best, similarity.amax(dim=1))
            result[image, start : start + rows] = 1.0 - best
    return result


def fuse(zero_shot: torch.Tensor, few_shot: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - weight) * zero_shot + weight * few_shot (maps or scores; see the module docstring)."""
    return (1.0 - weight) * zero_shot + weight * few_shot


@dataclass
class ReferenceMemory:
    """The memory bank of one class: patch features of k normal images, as `CraneForAnomalyDetection` computes them.

    Attributes:
        features: source name -> L2-normalized float32 patches [k * N, C]: "clip_0", "clip_1", ... (the distinct
            dense CLIP maps, in `encode_image`'s order) and for Crane+ "dino" (DINOv2 patch tokens).
        grid: the patch grid (gh, gw) the features were computed on, N = gh * gw.
        fingerprints: one per image, "sha256:<hex>" of its file bytes or pixel array.
        class_name: the class the images show (informative; `None` when not given).
        settings: the `FEATURE_FIELDS` of the model's config that decide the features (and the backbones' names).
        probe: source name -> the model's features of `probe_pixel_values` [N, C], to recognize the model.
        image_paths: the files the memory was built from, where it was built from files in this process (not saved:
            a loaded memory knows its images by fingerprint only); used to recognize them by path.
        pixel_fingerprints: "sha256:<hex>" of each image's decoded RGB pixel array (`array_fingerprint` of
            `image_to_rgb_array`), where the builder decoded them (empty otherwise): a copy of a reference image
            in other bytes (re-encoded, or given as a PIL image or array) is known by them.
    """

    features: dict[str, torch.Tensor]
    grid: tuple[int, int]
    fingerprints: list[str]
    class_name: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, torch.Tensor] = field(default_factory=dict)
    image_paths: list[str] = field(default_factory=list)
    pixel_fingerprints: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        """k, the number of reference images."""
        return len(self.fingerprints)

    @property
    def num_patches(self) -> int:
        """Memory patches per source (k * N)."""
        return next(iter(self.features.values())).shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the feature tensors."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self.features.values())

    @property
    def identity(self) -> str:
        """ "sha256:<hex>" of the sorted image fingerprints: which normal images the memory holds, whatever their
        order. Calibrated thresholds record it (`CraneConfig.threshold_computation`): they hold for this memory."""
        digest = hashlib.sha256("\n".join(sorted(self.fingerprints)).encode("utf-8")).hexdigest()
        return f"sha256:{digest}"

    @property
    def known_fingerprints(self) -> frozenset[str]:
        """Every fingerprint by which an image is one of this memory's: of its bytes or pixel array (`fingerprints`)
        and of its decoded pixels (`pixel_fingerprints`)."""
        return frozenset(self.fingerprints) | frozenset(self.pixel_fingerprints)

    def to(self, device: torch.device | str) -> ReferenceMemory:
        """Move the feature tensors to `device` (in place; a no-op where they are); returns the memory."""
        for name, tensor in self.features.items():
            if tensor.device != torch.device(device):
                self.features[name] = tensor.to(device)
        return self

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary: class, k, sources and their sizes, grid, fingerprints."""
        return {
            "class_name": self.class_name,
            "images": self.num_images,
            "sources": {name: int(tensor.shape[-1]) for name, tensor in self.features.items()},
            "grid": list(self.grid),
            "fingerprints": list(self.fingerprints),
        }

    def few_shot_patch_map(self, features: dict[str, torch.Tensor], sources: str = "all") -> torch.Tensor:
        """The few-shot patch map [B, N] in [0, 1]: mean over the chosen sources of (1 - nearest cosine) / 2.

        Args:
            features: source name -> normalized test features [B, N, C] on this memory's grid.
            sources: "all", "clip" (the CLIP maps only) or "dino" (the DINOv2 tokens only), as
                `CraneConfig.few_shot_features`.
        """
        names = select_sources(list(self.features), sources)
        maps = [nearest_patch_distances(features[name], self.features[name]) for name in names]
        return (torch.stack(maps).mean(dim=0) / 2.0).clamp_(0.0, 1.0)

    # ------------------------------------------------------------------ files
    def to_bytes(self) -> bytes:
        """The memory as the bytes of its safetensors file (what `save` writes and `load` reads)."""
        from safetensors.torch import save

        tensors = {f"features.{name}": tensor.contiguous().cpu() for name, tensor in self.features.items()}
        tensors.update({f"probe.{name}": tensor.contiguous().cpu() for name, tensor in self.probe.items()})
        metadata = {
            "format": MEMORY_FORMAT,
            "class_name": json.dumps(self.class_name),
            "fingerprints": json.dumps(self.fingerprints),
            "grid": json.dumps(list(self.grid)),
            "settings": json.dumps(self.settings, sort_keys=True),
            "pixel_fingerprints": json.dumps(self.pixel_fingerprints),
        }
        return save(tensors, metadata=metadata)

    def save(self, path: str | os.PathLike) -> None:
        """Write the memory to `path` (safetensors), through a temporary file renamed when complete."""
        path = os.fspath(path)
        temporary = f"{path}.tmp-{os.getpid()}"
        try:
            with open(temporary, "wb") as stream:
                stream.write(self.to_bytes())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceMemory:
        """Read a memory written by `save`; any problem raises `ValueError` naming the file and what is wrong."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as reader:
                metadata = reader.metadata() or {}
                names = list(reader.keys())
                if metadata.get("format") != MEMORY_FORMAT:
                    raise ValueError(f"{path}: not a crane-hf reference memory (format {metadata.get('format')!r}).")
                tensors = {name: reader.get_tensor(name) for name in names}
        except SafetensorError as error:
            raise ValueError(f"{path}: not a valid safetensors file ({error}).") from error
        try:
            values = {key: json.loads(metadata[key]) for key in ("class_name", "fingerprints", "grid", "settings")}
            pixel_fingerprints = json.loads(metadata.get("pixel_fingerprints", "[]"))  # absent from older files
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: damaged reference-memory metadata ({error!r}).") from None
        unknown = sorted(name for name in tensors if not name.startswith(("features.", "probe.")))
        if unknown:
            raise ValueError(f"{path}: damaged reference memory: unknown tensors {unknown}.")
        features = {name.removeprefix("features."): t for name, t in tensors.items() if name.startswith("features.")}
        probe = {name.removeprefix("probe."): t for name, t in tensors.items() if name.startswith("probe.")}
        grid, fingerprints = values["grid"], values["fingerprints"]
        grid = tuple(grid) if isinstance(grid, list) else grid
        fingerprints = list(fingerprints) if isinstance(fingerprints, list) else fingerprints
        memory = cls(features, grid, fingerprints, values["class_name"], values["settings"], probe)  # type: ignore[arg-type]
        memory.pixel_fingerprints = pixel_fingerprints
        memory.check_consistent(path)
        return memory

    def check_consistent(self, source: str = "the reference memory") -> None:
        """Refuse a memory whose parts are not what `build_reference_memory` and `save` make (types, sizes, dtypes,
        finiteness, unit-length features), naming `source`: a memory from a stranger's folder decides pass/fail, so
        any other content fails closed (`ValueError`)."""
        problems = []
        grid_ok = isinstance(self.grid, tuple) and len(self.grid) == 2 and all(_positive_int(v) for v in self.grid)
        if not grid_ok:
            problems.append(f"grid must be two positive integers, got {self.grid!r}")
        if not isinstance(self.fingerprints, list) or not all(isinstance(f, str) and f for f in self.fingerprints):
            problems.append(f"fingerprints must be a list of non-empty strings, got {self.fingerprints!r}")
        pixels = self.pixel_fingerprints
        if not isinstance(pixels, list) or not all(isinstance(f, str) and f for f in pixels):
            problems.append(f"pixel_fingerprints must be a list of non-empty strings, got {pixels!r}")
        elif pixels and isinstance(self.fingerprints, list) and len(pixels) != len(self.fingerprints):
            problems.append(f"{len(pixels)} pixel_fingerprints for {len(self.fingerprints)} images")
        if not (self.class_name is None or isinstance(self.class_name, str)):
            problems.append(f"class_name must be a string or null, got {self.class_name!r}")
        if not isinstance(self.settings, dict):
            problems.append(f"settings must be a JSON object, got {self.settings!r}")
        if problems:
            raise ValueError(f"{source}: damaged reference memory: " + "; ".join(problems) + ".")
        if not self.features or not self.fingerprints:
            problems.append("no features or no images")
        expected = self.num_images * self.grid[0] * self.grid[1]
        for name, tensor in self.features.items():
            if not tensor.is_floating_point() or tensor.dim() != 2 or tensor.shape[0] != expected:
                problems.append(f"features.{name} {list(tensor.shape)} {tensor.dtype} (expected [{expected}, C])")
            elif not torch.isfinite(tensor).all():
                problems.append(f"features.{name} holds non-finite values")
            elif not ((tensor.float().norm(dim=-1) - 1.0).abs() <= UNIT_NORM_TOLERANCE).all():
                problems.append(
                    f"features.{name} holds rows that are not unit vectors (the memory keeps L2-normalized features)"
                )
            probe = self.probe.get(name)
            if probe is None or probe.dim() != 2 or probe.shape[-1] != tensor.shape[-1]:
                problems.append(f"probe.{name} missing or of another size")
            elif not probe.is_floating_point() or not torch.isfinite(probe).all():
                problems.append(f"probe.{name} holds non-finite or non-float values")
        if set(self.probe) - set(self.features):
            problems.append(f"probe tensors without features: {sorted(set(self.probe) - set(self.features))}")
        if problems:
            raise ValueError(f"{source}: damaged reference memory: " + "; ".join(problems) + ".")

    def check_matches(self, settings: dict[str, Any], probe: dict[str, torch.Tensor], source: str) -> None:
        """Refuse this memory for a model whose feature settings or probe features differ (ValueError naming
        `source`, the field and both values, or the source and the cosine found)."""
        different = [
            f"{name} {self.settings.get(name)!r} (this model: {value!r})"
            for name, value in settings.items()
            if name in FEATURE_FIELDS and self.settings.get(name) != value
        ]
        sizes = {name: int(tensor.shape[-1]) for name, tensor in probe.items()}
        mine = {name: int(tensor.shape[-1]) for name, tensor in self.features.items()}
        if mine != sizes:
            different.append(f"features {mine} (this model: {sizes})")
        if different:
            raise ValueError(f"{source} was built for another model: " + "; ".join(different) + ".")
        for name, expected in probe.items():
            stored = self.probe[name].to(device=expected.device, dtype=torch.float32)
            if stored.shape != expected.shape:
                raise ValueError(
                    f"{source} was built on a {list(self.grid)} patch grid; this model's probe gives "
                    f"{list(expected.shape)} for {name}."
                )
            cosine = F.cosine_similarity(stored, expected.float(), dim=-1).mean().item()
            if not cosine >= PROBE_MIN_COSINE:
                raise ValueError(
                    f"{source} was built with other backbone weights: its {name} features of the probe image differ "
                    f"from this model's (mean cosine {cosine:.3f} < {PROBE_MIN_COSINE})."
                )


def _positive_int(value: Any) -> bool:
    """Whether `value` is an int (not a bool) >= 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def select_sources(names: Iterable[str], sources: str) -> list[str]:
    """The memory sources `CraneConfig.few_shot_features` selects among `names` ("all", "clip", "dino")."""
    names = list(names)
    if sources == "all":
        chosen = names
    elif sources in ("clip", "dino"):
        chosen = [name for name in names if name.startswith(sources)]
    else:
        raise ValueError(f"few_shot_features={sources!r} is unknown; choose one of {', '.join(FEW_SHOT_FEATURES)}.")
    if not chosen:
        raise ValueError(f"few_shot_features={sources!r} selects none of the memory's sources {names}.")
    return chosen


__all__ = [
    "MEMORY_FILE_NAME",
    "SAME_PIXELS_REASON",
    "ReferenceMemory",
    "array_fingerprint",
    "file_fingerprint",
    "fuse",
    "is_reference_memory_file",
    "nearest_patch_distances",
    "probe_pixel_values",
    "select_sources",
]
