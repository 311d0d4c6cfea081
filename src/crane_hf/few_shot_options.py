"""The few-shot option of `crane-hf predict` and `calibrate`: `--reference`, normal images of the class (files,
folders, globs) or a reference memory saved before (a .safetensors file), and its checks.

Imports nothing heavy at module level (`--help` stays fast); `check_reference` runs before the model is loaded and
refuses, with one line naming the file, an empty folder, a path that matches nothing, an unreadable image or a file
that is not a reference memory; `load_reference_memory` then builds (or loads and checks) the memory for the loaded
model and sets it (`CraneForAnomalyDetection.set_reference_memory`), refusing the memory of another model.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .io.image_files import find_image_inputs


@dataclass
class ReferenceSource:
    """What `--reference` named: a saved memory file, or the image files to build one from."""

    memory_file: str | None = None
    image_paths: list[str] = field(default_factory=list)


def add_reference_arguments(parser: argparse.ArgumentParser, purpose: str = "") -> None:
    """`--reference PATH [PATH ...]` (read back by `check_reference`)."""
    parser.add_argument(
        "--reference",
        nargs="+",
        metavar="PATH",
        default=None,
        help="few-shot: images of normal parts of the class (files, folders, globs), or a reference memory saved "
        "before (a .safetensors file); scores and maps become the fused zero-shot + few-shot ones" + purpose,
    )


def check_reference(values: list[str] | None, exclude: Iterable[str] = ()) -> ReferenceSource | None:
    """What `--reference` names, checked before any work (`None` when not given).

    Raises:
        ValueError: "--reference PATH: problem", for a memory file that does not exist or is not a reference memory,
            a folder without images, a path or pattern that matches nothing, or an image that cannot be read.
    """
    if not values:
        return None
    if len(values) == 1 and values[0].endswith(".safetensors"):
        from .models.crane.reference_memory import is_reference_memory_file

        path = values[0]
        if not os.path.isfile(path):
            raise ValueError(f"--reference {path}: no such file.")
        if not is_reference_memory_file(path):
            raise ValueError(f"--reference {path}: not a crane-hf reference memory (saved by ReferenceMemory.save).")
        return ReferenceSource(memory_file=path)
    found = find_image_inputs(values, exclude=exclude)
    for item in found.skipped:
        raise ValueError(f"--reference {item.path}: {item.reason}.")
    if not found.paths:
        raise ValueError(f"--reference {' '.join(values)}: no image files found.")
    from .models.crane.image_reading import read_image

    for path in found.paths:  # decoded once here, so that an unreadable reference stops the run before any work
        try:
            read_image(path)
        except ValueError as error:
            raise ValueError(f"--reference {path}: {str(error).removeprefix(f'{path}: ')}") from error
    return ReferenceSource(image_paths=list(found.paths))


def load_reference_memory(model: Any, processor: Any, source: ReferenceSource, class_name: str | None = None) -> Any:
    """Build the memory of `source`'s images with `model` (or load its memory file, checked against `model`), set
    it on the model and return it (a `ReferenceMemory`).

    Raises:
        ValueError: the memory file was built for another model (settings, feature sizes or backbone weights),
            naming the file.
    """
    from .model_loading import make_pipeline
    from .models.crane.reference_memory import ReferenceMemory

    if source.memory_file is not None:
        memory = ReferenceMemory.load(source.memory_file)
        model.set_reference_memory(memory, f"--reference {source.memory_file}")
        return memory
    memory = make_pipeline(model, processor).build_reference_memory(source.image_paths, class_name=class_name)
    model.reference_memory = memory  # built by this model: nothing to check
    return memory


def reference_images_among(
    items: Iterable[Any],
    memory: Any,
    fingerprint: Callable[[Any], str],
    path: Callable[[Any], str | None] | None = None,
    pixels: Callable[[Any], str] | None = None,
) -> list[Any]:
    """The `items` that are images of `memory` (a `ReferenceMemory`): the same file as one it was built from (by
    resolved path, where `memory.image_paths` knows them) or the same content (`fingerprint(item)`, "sha256:<hex>",
    is one of `memory.fingerprints`: a copy under another name is the same image). A memory finds its own images
    perfectly normal, so they are never scored as unseen images (calibrate and evaluate leave them out, predict
    refuses them). An item whose fingerprint cannot be computed (`OSError`, `ValueError`) is not one of them: it is
    skipped, with its reason, when it is read.

    `path(item)` gives an item's file path (None: not a file; `path=None`: no item is a file). `pixels(item)`, where
    given, the "sha256:<hex>" of its decoded RGB pixels: asked only of items not found otherwise, and only when the
    memory knows its images' pixels (`ReferenceMemory.pixel_fingerprints`), it finds a reference image in other
    bytes (re-encoded).
    """
    known = memory.known_fingerprints
    files = {os.path.realpath(name) for name in getattr(memory, "image_paths", ())}
    by_pixels = pixels is not None and bool(getattr(memory, "pixel_fingerprints", ()))

    def is_reference(item: Any) -> bool:
        name = path(item) if path is not None else None
        if (name is not None and os.path.realpath(name) in files) or fingerprint(item) in known:
            return True
        return by_pixels and pixels(item) in known

    found = []
    for item in items:
        try:
            if is_reference(item):
                found.append(item)
        except (OSError, ValueError):
            continue
    return found


def reference_files_among(paths: list[str], memory: Any) -> list[str]:
    """The image files among `paths` that are images of `memory` (`reference_images_among`)."""
    from .models.crane.reference_memory import file_fingerprint

    return reference_images_among(paths, memory, file_fingerprint, path=str)


__all__ = [
    "ReferenceSource",
    "add_reference_arguments",
    "check_reference",
    "load_reference_memory",
    "reference_files_among",
    "reference_images_among",
]
