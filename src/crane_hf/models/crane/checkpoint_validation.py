"""Refuse checkpoints whose tensors do not fit the model, naming every offending tensor, before loading anything.

Checkpoints are read as safetensors only (never pickled .bin files); their headers give each tensor's shape and
dtype without reading the data.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open

from .json_reading import load_json_without_duplicates

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors are missing, unexpected, mis-shaped or of the wrong kind of dtype."""


def safetensors_header(paths: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype such as "F32") of every tensor in the files.

    A file whose header is truncated, oversized or malformed raises `CheckpointMismatchError` naming it.
    """
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in paths:
        with _safetensors_errors(path), safe_open(path, framework="pt") as reader:
            for name in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor_slice = reader.get_slice(name)
                found[name] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    return found


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on the CPU); a damaged file raises `CheckpointMismatchError` naming it."""
    from safetensors.torch import load_file

    with _safetensors_errors(path):
        return load_file(path)


@contextlib.contextmanager
def _safetensors_errors(path: str) -> Iterator[None]:
    """safetensors' errors (`SafetensorError`, raised for truncated or oversized headers) with the file named."""
    try:
        yield
    except SafetensorError as error:
        raise CheckpointMismatchError(f"{path}: not a valid safetensors file ({error}).") from error


def checkpoint_problems(
    found: dict[str, tuple[tuple[int, ...], str]], expected: dict[str, torch.Tensor], require_all: bool = True
) -> list[str]:
    """What is wrong with `found` (name -> (shape, dtype)) against the model's `expected` tensors."""
    problems = []
    missing = sorted(set(expected) - set(found)) if require_all else []
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
    wrong = []
    for name in sorted(set(found) & set(expected)):
        shape, dtype = found[name]
        reference = expected[name]
        is_float = dtype in FLOAT_DTYPES
        if shape != tuple(reference.shape) or is_float != reference.is_floating_point():
            kind = "floating point" if reference.is_floating_point() else str(reference.dtype)
            wrong.append(f"{name} {shape} {dtype} (expected {tuple(reference.shape)}, {kind})")
    if wrong:
        problems.append("tensors of the wrong shape or dtype: " + "; ".join(wrong))
    return problems


def check_checkpoint(
    found: dict[str, tuple[tuple[int, ...], str]],
    expected: dict[str, torch.Tensor],
    source: str,
    require_all: bool = True,
) -> None:
    """Raise `CheckpointMismatchError` naming the offending tensors of `source`, if any."""
    problems = checkpoint_problems(found, expected, require_all)
    if problems:
        raise CheckpointMismatchError(f"{source} does not fit this model: " + "; ".join(problems) + ".")


def check_floating_point(found: dict[str, tuple[tuple[int, ...], str]], source: str) -> None:
    """Every tensor of a Crane checkpoint is floating point; refuse the others by name."""
    wrong = [f"{name} {dtype}" for name, (_, dtype) in sorted(found.items()) if dtype not in FLOAT_DTYPES]
    if wrong:
        raise CheckpointMismatchError(f"{source} has tensors that are not floating point: {'; '.join(wrong)}.")


class NonFiniteWeightsError(CheckpointMismatchError):
    """A checkpoint holds NaN or infinite values (e.g. prompts of a diverged training run)."""


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse tensors holding NaN or infinite values, naming each and `source` (`NonFiniteWeightsError`)."""
    bad = [
        f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
        for name, t in sorted(tensors.items())
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise NonFiniteWeightsError(
            f"{source} holds NaN or infinite values in {'; '.join(bad)}: it cannot give meaningful scores "
            "(was it written by a diverged training run?)."
        )


def check_loading_info(info: dict, source: str) -> None:
    """Refuse what transformers' `output_loading_info` reports as missing, unexpected or mis-shaped."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing tensors {', '.join(sorted(info['missing_keys']))}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected tensors {', '.join(sorted(info['unexpected_keys']))}")
    if info.get("mismatched_keys"):
        shapes = [
            f"{name} {tuple(found)} (expected {tuple(wanted)})"
            for name, found, wanted in sorted(info["mismatched_keys"])
        ]
        problems.append("tensors of the wrong shape: " + "; ".join(shapes))
    if info.get("error_msgs"):
        problems.extend(str(message) for message in info["error_msgs"])
    if problems:
        raise CheckpointMismatchError(f"{source} does not fit this model: " + "; ".join(problems) + ".")


def resolve_safetensors_files(resolve: callable, folder_or_id: str, weights_name: str, index_name: str) -> list[str]:
    """Local paths of a checkpoint's safetensors files (one file, or the shards of an index).

    `resolve(name)` returns the local path of a file of the checkpoint, or None when it has no such file.
    """
    single = resolve(weights_name)
    if single is not None:
        return [single]
    index = resolve(index_name)
    if index is None:
        raise CheckpointMismatchError(
            f"{folder_or_id} has no safetensors weights ({weights_name}); crane_hf loads weights only from "
            "safetensors files, never from pickled .bin/.pth files."
        )
    shards = shard_names(index)
    paths = [resolve(name) for name in shards]
    missing = [name for name, path in zip(shards, paths) if path is None or not os.path.isfile(path)]
    if missing:
        raise CheckpointMismatchError(f"{folder_or_id} is missing the weight shards {', '.join(missing)}.")
    folder = os.path.realpath(os.path.dirname(index))
    outside = [name for name, path in zip(shards, paths) if not _inside(folder, os.path.realpath(path))]
    if outside:
        raise CheckpointMismatchError(f"{index}: the weight shards {', '.join(outside)} lead outside {folder}.")
    return paths


def shard_names(index: str) -> list[str]:
    """The shard file names of a `model.safetensors.index.json`, each a plain name inside the model folder.

    Raises `CheckpointMismatchError` naming the index for a malformed file and for shard paths that are absolute,
    contain ".." or a separator (they must name files of the folder itself).
    """
    try:
        weight_map = load_json_without_duplicates(index)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointMismatchError(
            f"{index}: not a valid index (a JSON object with a 'weight_map'): {error}."
        ) from error
    bad = [
        repr(name)
        for name in shards
        if not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or os.path.isabs(name)
        or "\x00" in name
    ]
    if bad:
        raise CheckpointMismatchError(
            f"{index}: shard paths must be file names inside the model folder; refused {', '.join(bad)}."
        )
    return shards


def _inside(folder: str, path: str) -> bool:
    return os.path.commonpath([folder, path]) == folder
