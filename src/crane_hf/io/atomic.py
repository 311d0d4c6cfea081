"""Writing outputs so that nothing the user had is lost: temporary name first, then an atomic rename.

A process killed at any moment leaves either the previous file/folder or the new one, never a half-written one;
existing outputs are replaced only when the caller says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputExistsError(FileExistsError):
    """The output already exists and overwriting was not asked for."""


def check_can_write(path: str, overwrite: bool) -> None:
    """Raise `OutputExistsError` if `path` exists (a non-empty folder or a file) and `overwrite` is False."""
    if overwrite or not os.path.exists(path):
        return
    if os.path.isdir(path) and not os.listdir(path):
        return
    raise OutputExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    On error the temporary folder is removed and `path` is left as it was.
    """
    path = os.path.abspath(path)
    check_can_write(path, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_current_umask())
        if os.path.exists(path):
            retired = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(retired, "previous"))
            os.rename(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_bytes(path: str, data: bytes, overwrite: bool = True) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`."""
    check_can_write(path, overwrite)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(staging, 0o666 & ~_current_umask())
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)
        raise


def atomic_write_text(path: str, text: str, overwrite: bool = True) -> None:
    """UTF-8 text version of `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
