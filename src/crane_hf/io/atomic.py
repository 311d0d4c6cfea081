"""Writing outputs so that nothing the user had is lost: temporary name first, then an atomic rename.

A process killed at any moment leaves either the previous file/folder or the new one, never a half-written one;
existing outputs are replaced only when the caller says so, and output folders only when crane-hf wrote all they
hold (`output_safety.py`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .output_names import TEMP_TAG
from .output_safety import (
    PARTIAL_SETTINGS,
    OutputExistsError,
    check_output_dir,
    clean_stale_temporaries,
    make_staging_dir,
    open_partial,
    output_lock,
    retire_and_replace,
    write_marker,
)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_can_write(path: str, overwrite: bool) -> None:
    """Raise `OutputExistsError` if `path` exists (a non-empty folder or a file) and `overwrite` is False."""
    if overwrite or not os.path.exists(path):
        return
    if os.path.isdir(path) and not os.listdir(path):
        return
    raise OutputExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")


@contextlib.contextmanager
def _claimed(path: str, overwrite: bool, protected: list[tuple[str, str]]) -> Iterator[None]:
    """Check the output `path`, hold its lock, remove what killed runs left beside it and check again."""
    check_output_dir(path, overwrite, protected)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with output_lock(path):
        clean_stale_temporaries(path)
        check_output_dir(path, overwrite, protected)
        yield


@contextlib.contextmanager
def atomic_output_dir(
    path: str,
    overwrite: bool = False,
    protected: Iterable[tuple[str, str]] = (),
    command: str | None = None,
) -> Iterator[str]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    Before anything is created, `path` is checked (`output_safety.check_output_dir`): it may not be or contain a
    `protected` (what, path) folder, the working, home or root folder; an existing `path` is replaced only with
    `overwrite` and only if crane-hf wrote everything in it; its folder must be writable. The run then holds the
    lock of `path` (a concurrent run on it is refused), removes what killed runs left beside it, checks again,
    and works in a marked temporary folder. On success the folder gets its manifest (`MARKER_NAME`) and replaces
    `path`; an output that appeared meanwhile is not replaced without `overwrite`. On error or interruption the
    temporary folder is removed and `path` is left as it was.
    """
    path = os.path.abspath(path)
    protected = list(protected)
    with _claimed(path, overwrite, protected):
        staging = make_staging_dir(path, command)
        try:
            yield staging
            write_marker(staging, command)
            os.chmod(staging, 0o777 & ~_current_umask())
            check_output_dir(path, overwrite, protected)  # an output that appeared meanwhile is not replaced
            retire_and_replace(staging, path)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            named = str(error.filename) if error.filename is not None else None
            if named is not None and named.startswith(staging + os.sep):  # name the file as it would have been
                raise OSError(error.errno, error.strerror, path + named[len(staging) :]) from error
            if named is None and error.errno is not None:  # e.g. a full disk: name the output
                raise OSError(error.errno, error.strerror, path) from error
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


@contextlib.contextmanager
def naming_write_errors(path: str) -> Iterator[None]:
    """Re-raise an `OSError` that names no file (a full disk, an I/O error while writing) as the same error
    naming `path`, so that its one-line message says which file could not be written."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, path) from error


def write_text_file(path: str, text: str) -> None:
    """Write `text` (UTF-8, line ends as given) to `path`, a file inside a folder the caller publishes atomically;
    an error names `path` (`naming_write_errors`)."""
    with naming_write_errors(path), open(path, "w", encoding="utf-8", newline="") as stream:
        stream.write(text)


@contextlib.contextmanager
def resumable_output_dir(
    path: str,
    overwrite: bool,
    protected: Iterable[tuple[str, str]],
    command: str,
    resume: bool,
    settings: dict,
    owned_by_run: Callable[[str], set[str]] | None = None,
) -> Iterator[tuple[str, str]]:
    """`atomic_output_dir` for a run that can be resumed: yields (folder, "new" | "resumed" | "discarded").

    The same checks, lock and cleaning as `atomic_output_dir`; the run works in the partial folder of `path`
    (`output_safety.open_partial`: taken up with `resume` when made with equal `settings`), which is kept when the
    body raises (an `OSError` naming no file, such as a full disk, is raised again naming `path`) or the process
    is interrupted or killed, so that a later run with `--resume` finishes it; `owned_by_run(folder)` gives the files
    such a run shows it wrote there, content checked (any other file makes the folder refused, never discarded or
    published). When
    the body returns, the folder gets its manifest and replaces `path` in one rename; if that is refused (an output
    appeared meanwhile) the folder is removed.
    """
    path = os.path.abspath(path)
    protected = list(protected)
    with _claimed(path, overwrite, protected):
        folder, outcome = open_partial(path, command, resume, settings, owned_by_run)
        try:
            yield folder, outcome
        except OSError as error:  # the partial folder is kept for --resume
            if error.filename is None and error.errno is not None:  # e.g. a full disk: name the output
                raise OSError(error.errno, error.strerror, path) from error
            raise
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, PARTIAL_SETTINGS))
            write_marker(folder, command)
            os.chmod(folder, 0o777 & ~_current_umask())
            check_output_dir(path, overwrite, protected)  # an output that appeared meanwhile is not replaced
            retire_and_replace(folder, path)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise


def atomic_write_bytes(path: str, data: bytes, overwrite: bool = True) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`; an error while writing
    (a full disk) names `path` and leaves the previous file as it was."""
    check_can_write(path, overwrite)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_write_many({path: data})


def atomic_write_many(contents: dict[str, bytes]) -> None:
    """Write several files (target path -> bytes) all or nothing, e.g. calibrate's config.json and
    calibration.json, which must describe the same thresholds.

    Every file is written under a temporary name in its folder
    first (an error names the target: `naming_write_errors`), and the targets are replaced only when all are
    complete; if a replacement fails, the targets already replaced get their previous content back. So a failure
    leaves every previous file as it was, and no half-written file under a target's name.
    """
    _stage_and_replace({path: (lambda stream, data=data: stream.write(data), None) for path, data in contents.items()})


def atomic_write_files(sources: dict[str, str], folder: str) -> None:
    """Copy files (name in `folder` -> source path) all or nothing (`atomic_write_many`): a failure while writing
    (a full disk, an unwritable folder) leaves the previous files of `folder` as they were. Modes are copied from
    the sources."""

    def copier(source: str) -> Callable[[Any], None]:
        def copy(stream: Any) -> None:
            with open(source, "rb") as original:
                shutil.copyfileobj(original, stream)

        return copy

    _stage_and_replace({os.path.join(folder, name): (copier(source), source) for name, source in sources.items()})


def _stage_and_replace(writers: dict[str, tuple[Callable[[Any], Any], str | None]]) -> None:
    """Write each target (path -> (write(stream), source whose mode to copy or None)) to a temporary file beside it,
    then rename them all onto their targets, restoring the replaced ones if a rename fails."""
    staged: list[tuple[str, str]] = []
    backups: list[tuple[str, str]] = []
    replaced: list[str] = []
    try:
        for target, (write, mode_source) in writers.items():
            folder, name = os.path.split(os.path.abspath(target))
            with naming_write_errors(target):
                handle, staging = tempfile.mkstemp(prefix=f".{name}{TEMP_TAG}", dir=folder)
                staged.append((staging, target))
                with os.fdopen(handle, "wb") as stream:
                    write(stream)
                    stream.flush()
                    os.fsync(stream.fileno())
                if mode_source is None:
                    os.chmod(staging, 0o666 & ~_current_umask())
                else:
                    shutil.copymode(mode_source, staging)
        if len(staged) > 1:  # keep the previous files (hard links) until every target is replaced
            for _, target in staged:
                if os.path.isfile(target):
                    folder, name = os.path.split(os.path.abspath(target))
                    backup = os.path.join(folder, f".{name}{TEMP_TAG}previous")
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(backup)
                    try:
                        os.link(target, backup)
                    except OSError:  # a file system without hard links
                        shutil.copyfile(target, backup)
                    backups.append((backup, target))
        for staging, target in staged:
            with naming_write_errors(target):
                os.replace(staging, target)
            replaced.append(target)
    except BaseException:
        for backup, target in backups:
            if target in replaced:
                with contextlib.suppress(OSError):
                    os.replace(backup, target)
        for staging, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.remove(staging)
        raise
    finally:
        for backup, _ in backups:
            with contextlib.suppress(FileNotFoundError):
                os.remove(backup)


def atomic_write_text(path: str, text: str, overwrite: bool = True) -> None:
    """UTF-8 text version of `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
