"""Content fingerprints: recognise the same training data and the same backbones whatever their paths look like.

- `file_sha256`: SHA-256 of a regular file's bytes (a named pipe or device is refused, never read).
- `row_digest` and `combine_digests`: SHA-256 over the rows of an anomaly dataset in order: the image path relative
  to the dataset root, class, defect type, label and the SHA-256 of the image's and the mask's bytes. The same
  files reached through another path (relative or absolute, a trailing slash, a copy elsewhere) give the same
  fingerprint; a different file with the same name does not. `data_loading.dataset_fingerprint` computes it for a
  whole dataset (there, next to `undecoded`, so that this module imports no other part of crane_hf).
- `module_fingerprint`: SHA-256 over every parameter and buffer of a module (name, dtype, shape and bytes).

`crane-hf train` records both in each checkpoint and resumes only when they match; the feature cache is keyed by
the same data fingerprint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Sequence
from typing import Any

import torch

NOT_REGULAR = "not a regular file (a named pipe, device or socket): not read"


def file_sha256(path: str) -> str:
    """Hex SHA-256 of the regular file at `path`. Anything else (a named pipe, whose opening blocks until a writer
    comes; a device such as /dev/zero, which never ends; a socket) raises `OSError` (strerror `NOT_REGULAR`) naming
    `path`: it is opened without blocking and checked before a byte is read."""
    handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(handle, "rb") as stream:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(handle, True)
        return hashlib.file_digest(stream, "sha256").hexdigest()


def row_digest(record: dict[str, Any]) -> str:
    """Hex SHA-256 of one undecoded row (`crane_hf.data.records` columns; image and mask as {"path", "bytes"})."""

    def content(value: dict[str, Any] | None) -> str | None:
        if not value:
            return None
        if value.get("bytes"):
            return hashlib.sha256(value["bytes"]).hexdigest()
        return file_sha256(value["path"])

    entry = [
        record["image_path"],
        record["class_name"],
        record["defect_type"],
        int(record["label"]),
        content(record["image"]),
        content(record["mask"]),
    ]
    return hashlib.sha256(json.dumps(entry).encode()).hexdigest()


def combine_digests(digests: Sequence[str]) -> str:
    """One hex SHA-256 over row digests, in order."""
    digest = hashlib.sha256()
    for item in digests:
        digest.update(item.encode())
    return digest.hexdigest()


def module_fingerprint(modules: Iterable[torch.nn.Module | None]) -> str:
    """Hex SHA-256 over the parameters and buffers of `modules` (None entries count as absent)."""
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        digest.update(f"module {index}: {'none' if module is None else type(module).__name__}\n".encode())
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{name} {data.dtype} {tuple(data.shape)}\n".encode())
            if data.numel():
                digest.update(data.reshape(-1).view(torch.uint8).numpy())  # the bytes, not copied
    return digest.hexdigest()


__all__ = ["NOT_REGULAR", "combine_digests", "file_sha256", "module_fingerprint", "row_digest"]
