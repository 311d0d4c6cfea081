"""Which folders crane-hf may create, replace or clean, so that nothing it did not write is ever deleted.

- Marker and manifest: every output folder crane-hf creates holds `MARKER_NAME`, a JSON file naming the command
  that wrote it and every file it wrote ("files": relative path -> size and SHA-256 of the content it wrote).
  Ownership is file by file and by content: `--overwrite` replaces a folder only if it holds the marker and every
  file under it, at any depth, is listed there with its current size and SHA-256. A listed folder name, an entry
  ending in "/", a subfolder with a marker of its own, a file listed with other content (a user's file under the
  name of one of crane-hf's) or a manifest of names only (crane-hf before content hashes, or a forged one) vouches
  for nothing; anything else is refused, naming the files.
- Protected folders: an output is refused when it is, or contains, the current working folder, the home folder,
  "/" or a folder the command reads (inputs, the model, the dataset root, backbones), compared on real paths.
- One run per output: `output_lock` takes an exclusive `flock` on `.<name>.crane-hf-lock` beside the output for
  the whole run; a second run on the same output is refused at once (the kernel drops the lock of a killed run;
  processes forked meanwhile, such as DataLoader workers, close their copy at once, so they never keep it).
- Temporary folders are named `.<name>.crane-hf-tmp-*` and hold the marker from their creation; folders that a
  killed run left (`.crane-hf-tmp-*`, `.crane-hf-old-*`) are recognised by name and marker and removed by the next
  run on that output, which holds the lock; a retired previous output is put back if the new one never arrived.
- Writability: the folder that will receive the output is probed with a temporary file before any work.
- Resumable runs (`crane-hf predict`) work in `.<name>.crane-hf-partial` beside the output (`open_partial`): marked
  from its creation, kept when the run is interrupted or killed, taken up by a run with `--resume` when it was
  made with the same settings, and otherwise removed (after its marker is checked) by the next run on the output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs are then not detected
    fcntl = None

from .output_names import LOCK_TAG, MARKER_NAME, OLD_TAG, PARTIAL_TAG, TEMP_TAG

SHOWN = 5  # offending files named in a message
MANIFEST_FORMAT = 2  # "files" maps each path to {"size", "sha256"} (format 1, before it: a list of names)


class OutputExistsError(FileExistsError):
    """The output already exists and overwriting was not asked for."""


class UnsafeOutputError(ValueError):
    """The output would replace or delete something crane-hf did not write, or a folder the run needs."""


class OutputInUseError(BlockingIOError):
    """Another crane-hf run is writing the same output."""


def _real(path: str) -> str:
    """`path` as it will be written (no "~" expansion: the command line expands it once, `local_path`)."""
    return os.path.realpath(os.path.abspath(path))


def _contains(folder: str, path: str) -> bool:
    return os.path.commonpath([folder, path]) == folder


def default_protected() -> list[tuple[str, str]]:
    """(what, path) of the folders no output may be or contain: the working folder, the home folder and "/"."""
    return [("the current working folder", os.getcwd()), ("the home folder", os.path.expanduser("~")), ("/", "/")]


def check_not_protected(output: str, protected: Iterable[tuple[str, str]] = ()) -> None:
    """Refuse `output` if it is, or contains, one of the `protected` (what, path) pairs or a default one."""
    target = _real(output)
    candidates = [(what, path, _real(path)) for what, path in [*default_protected(), *protected] if path]
    candidates.sort(key=lambda item: item[2] != target)  # "is" before "contains"
    for what, path, real in candidates:
        if _contains(target, real):
            relation = "is" if target == real else "contains"
            named = what if what == "/" else f"{what} ({path})"
            raise UnsafeOutputError(
                f"refusing to write {output}: it {relation} {named}; choose a new folder for the output."
            )


def protected_paths(what: str, paths: Iterable[str | None]) -> list[tuple[str, str]]:
    """(what, path) pairs for the existing local paths among `paths` (glob patterns give their fixed prefix)."""
    import glob

    found = []
    for path in paths:
        if not path:
            continue
        if glob.has_magic(path):
            parts = []
            for part in path.split(os.sep):
                if glob.has_magic(part):
                    break
                parts.append(part)
            path = os.sep.join(parts) or "."
        if os.path.exists(path):
            found.append((what, path))
    return found


def read_marker(folder: str) -> dict[str, Any] | None:
    """The marker of a crane-hf output folder, or None when `folder` holds none (or an unreadable one)."""
    try:
        with open(os.path.join(folder, MARKER_NAME), encoding="utf-8") as stream:
            marker = json.load(stream)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "crane-hf" else None


def is_crane_hf_output(folder: str) -> bool:
    """Whether `folder` (not a link) holds a valid crane-hf marker (a published output, or a temporary folder of a
    run); a file merely named like the marker proves nothing."""
    return os.path.isdir(folder) and not os.path.islink(folder) and read_marker(folder) is not None


# The names `tempfile` gives crane-hf's temporary files (a prefix ending in TEMP_TAG, then 8 characters of
# [a-z0-9_]; "previous": the kept previous version of a file being replaced, `atomic._stage_and_replace`) and of its
# locks; a file named otherwise is not crane-hf's, whatever tag its name holds.
_TEMPORARY_FILE = re.compile(rf"\..+{re.escape(TEMP_TAG)}(?:[a-z0-9_]{{8}}|previous)")
_LOCK_FILE = re.compile(rf"\..+{re.escape(LOCK_TAG)}")
_PROCESS_ID = re.compile(rb"[0-9]{0,20}\n?")  # what `output_lock` writes in a lock file


def _holds_process_id(path: str) -> bool:
    """Whether the regular file at `path` (not followed if a link) holds nothing but what `output_lock` writes."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 32:
            return False
        with open(path, "rb") as stream:
            return _PROCESS_ID.fullmatch(stream.read(33)) is not None
    except OSError:
        return False


def is_own_temporary_file(path: str) -> bool:
    """Whether `path` is a temporary file or a lock that crane-hf leaves when killed, by the exact form of its name
    (and, for a lock, its content): a regular file, never a link."""
    name = os.path.basename(path)
    if _LOCK_FILE.fullmatch(name):
        return _holds_process_id(path)
    return bool(_TEMPORARY_FILE.fullmatch(name)) and os.path.isfile(path) and not os.path.islink(path)


def _listing(folder: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        relative = os.path.relpath(root, folder)
        for name in sorted(names) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = name if relative == "." else f"{relative}/{name}".replace(os.sep, "/")
            if path != MARKER_NAME:
                files.append(path)
    return files


ContentRecord = dict[str, Any]


def content_record(path: str) -> ContentRecord:
    """What a manifest records of the file at `path`: {"size": bytes, "sha256": hex digest of its content}, or
    {"link": target} for a symbolic link (never followed)."""
    if os.path.islink(path):
        return {"link": os.readlink(path)}
    with open(path, "rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
        return {"size": os.fstat(stream.fileno()).st_size, "sha256": digest}


def bytes_record(data: bytes) -> ContentRecord:
    """`content_record` of a file that will hold `data`."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def matches_record(path: str, record: Any) -> bool:
    """Whether the file (or link) at `path` still holds the content `record` (`content_record`) says crane-hf
    wrote; the size is compared before anything is read."""
    if not isinstance(record, dict):
        return False
    try:
        if "link" in record:
            return os.path.islink(path) and os.readlink(path) == record["link"]
        info = os.lstat(path)
        if not os.path.isfile(path) or os.path.islink(path) or info.st_size != record.get("size"):
            return False
        return content_record(path) == {"size": record.get("size"), "sha256": record.get("sha256")}
    except OSError:
        return False


def manifest_records(marker: dict[str, Any] | None) -> dict[str, ContentRecord] | None:
    """Relative path -> content record of the files a marker says crane-hf wrote; None when it records no content
    (no marker, or a manifest of names only, as crane-hf wrote before `MANIFEST_FORMAT` 2): such files cannot be
    shown to be crane-hf's."""
    files = (marker or {}).get("files")
    if not isinstance(files, dict):
        return None
    return {
        path: record
        for path, record in files.items()
        if isinstance(path, str) and not path.endswith("/") and isinstance(record, dict)
    }


def write_marker(
    folder: str,
    command: str | None,
    state: str = "complete",
    files: Sequence[str] | dict[str, ContentRecord] | None = None,
) -> None:
    """Write the marker of `folder` (the manifest): `files` are the relative paths of the files crane-hf wrote
    there (their content recorded now, `content_record`), or their records already taken; by default every file
    now in it. The marker holds no time or process id, so that the same run writes the same bytes."""
    from .. import __version__

    names = _listing(folder) if files is None else files
    if not isinstance(names, dict):
        names = {name: content_record(os.path.join(folder, *name.split("/"))) for name in names}
    marker = {
        "written_by": "crane-hf",
        "version": __version__,
        "manifest": MANIFEST_FORMAT,
        "command": command,
        "state": state,
        "files": dict(sorted(names.items())),
    }
    handle, staging = tempfile.mkstemp(prefix=f"{MARKER_NAME}{TEMP_TAG}", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(marker, stream, indent=1)
            stream.write("\n")
        os.replace(staging, os.path.join(folder, MARKER_NAME))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)
        raise


def claim_entries(folder: str, entries: Iterable[str], command: str | None) -> None:
    """Add the files `entries` (paths relative to `folder`, "/" separated) to the manifest of `folder` with their
    content now, creating the marker (its state kept); listed files that no longer exist are dropped from it, so
    that a later file of that name is not taken for crane-hf's. Files listed before keep the content recorded
    then (a file changed since is not claimed again)."""
    claim_contents(
        folder, {entry: content_record(os.path.join(folder, *entry.split("/"))) for entry in entries}, command
    )


def claim_contents(folder: str, contents: dict[str, ContentRecord], command: str | None) -> None:
    """`claim_entries` with the content of each entry given (relative path -> `content_record`): files about to be
    renamed to those paths, claimed before they get their names, so that a run killed in between leaves no file
    that its folder's marker does not list."""
    marker = read_marker(folder) or {}
    records = {
        path: record
        for path, record in (manifest_records(marker) or {}).items()
        if os.path.lexists(os.path.join(folder, *path.split("/")))
    }
    records.update(contents)
    write_marker(folder, marker.get("command") or command, marker.get("state", "complete"), files=records)


FileSignature = tuple[int, int, int]


def file_signatures(folder: str) -> dict[str, FileSignature]:
    """Every file (and link) under `folder` but its marker, relative path -> (inode, mtime in ns, size): taken
    before a run writes into a folder, so that `claim_changed` can tell the files the run wrote."""
    found = {}
    for path in _listing(folder) if os.path.isdir(folder) else []:
        info = os.lstat(os.path.join(folder, *path.split("/")))
        found[path] = (info.st_ino, info.st_mtime_ns, info.st_size)
    return found


def claim_changed(
    folder: str, before: dict[str, FileSignature], prefixes: Sequence[str], command: str | None
) -> list[str]:
    """List in the manifest of `folder` the files under it that are new or changed since `before`
    (`file_signatures`) and whose relative path starts with one of `prefixes`: the files a run wrote where it
    writes, and no file a user dropped elsewhere meanwhile. Returns the paths claimed."""
    now = file_signatures(folder)
    changed = [
        path for path, signature in now.items() if before.get(path) != signature and path.startswith(tuple(prefixes))
    ]
    if changed:
        claim_entries(folder, changed, command)
    return changed


def unowned_entries(folder: str) -> list[str]:
    """Files and links under `folder`, at any depth, that its manifest does not show to be crane-hf's: not listed,
    or listed with other content than they hold now (the folder itself when it has no marker; every file when
    the manifest records names only). A folder is owned only through the files it holds: a listed folder name,
    an entry ending in "/", or a subfolder's own marker owns nothing."""
    marker = read_marker(folder)
    if marker is None:
        return [folder]
    records = manifest_records(marker) or {}
    found: list[str] = []

    def visit(directory: str, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda item: item.name):
                relative = prefix + entry.name
                if (not prefix and entry.name == MARKER_NAME) or _is_temporary(entry):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    visit(entry.path, relative + "/")
                elif not matches_record(entry.path, records.get(relative)):
                    found.append(entry.path)

    visit(folder, "")
    return found


def _is_temporary(entry: os.DirEntry) -> bool:
    """A lock or temporary file of crane-hf (`is_own_temporary_file`), or a temporary folder of a run (named with a
    crane-hf tag and holding a valid crane-hf marker)."""
    name = entry.name
    if not name.startswith(".") or not any(tag in name for tag in (TEMP_TAG, OLD_TAG, LOCK_TAG, PARTIAL_TAG)):
        return False
    if entry.is_dir(follow_symlinks=False):
        return is_crane_hf_output(entry.path)
    return is_own_temporary_file(entry.path)


def clean_stale_temporaries_in(folder: str) -> list[str]:
    """`clean_stale_temporaries` for every output whose temporaries lie in `folder` (call it holding the lock of
    `folder`, which covers them: e.g. a training run's checkpoints and published files)."""
    names, done = set(), []
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        for tag in (TEMP_TAG, OLD_TAG):
            if entry.startswith(".") and tag in entry:
                names.add(entry[1 : entry.index(tag)])
        if entry.startswith(".") and entry.endswith(LOCK_TAG) and _remove_if_unlocked(os.path.join(folder, entry)):
            done.append(os.path.join(folder, entry))
    return done + [
        path for name in sorted(names) if name for path in clean_stale_temporaries(os.path.join(folder, name))
    ]


def _remove_if_unlocked(lock_path: str) -> bool:
    """Remove a lock file that no live process holds (a killed run's); False if it is held or cannot be opened."""
    if fcntl is None:
        return False
    try:
        handle = os.open(lock_path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        return False
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock_path)
    os.close(handle)
    return True


def check_replaceable(path: str) -> None:
    """Refuse to replace `path` unless it is an empty folder or a crane-hf output holding only its own files."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        raise UnsafeOutputError(f"refusing to replace {path}: it is not a folder crane-hf wrote.")
    if not os.listdir(path):
        return
    marker = read_marker(path)
    if marker is None:
        raise UnsafeOutputError(
            f"refusing to replace {path}: it was not written by crane-hf (no {MARKER_NAME}); crane-hf only "
            "replaces its own outputs. Move it away yourself or choose another output."
        )
    if manifest_records(marker) is None:
        raise UnsafeOutputError(
            f"refusing to replace {path}: its {MARKER_NAME} lists file names without their content (an older "
            "crane-hf, or edited), so crane-hf cannot tell its files from yours. Check the folder and delete it "
            "yourself, or choose another output."
        )
    foreign = unowned_entries(path)
    if foreign:
        more = f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else ""
        raise UnsafeOutputError(
            f"refusing to replace {path}: it holds files crane-hf did not write, or changed since it wrote them "
            f"({', '.join(foreign[:SHOWN])}{more}). Move them away or choose another output."
        )


def check_writable(path: str) -> None:
    """Refuse, before any work, an output whose folder cannot be created or written (probed with a temporary file)."""
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if os.path.islink(existing) and not os.path.exists(existing):
        raise NotADirectoryError(f"cannot write {path}: {existing} is a symbolic link to nothing.")
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"cannot write {path}: {existing} is a file, not a folder.")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".crane-hf-probe{TEMP_TAG}", dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise PermissionError(f"cannot write {path}: {existing} is not writable ({error.strerror}).") from error


def check_output_dir(path: str, overwrite: bool, protected: Iterable[tuple[str, str]] = ()) -> None:
    """Every check of an output folder that needs no lock: protected folders, existing contents, writability.

    Raises `UnsafeOutputError` (protected folder, or contents crane-hf did not write), `OutputExistsError` (a
    non-empty output without `overwrite`) or an `OSError` naming the folder that cannot be written.
    """
    check_not_protected(path, protected)
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)):
        if not overwrite:
            if read_marker(path) is None:
                raise OutputExistsError(
                    f"{path} already exists and was not written by crane-hf; choose another output (crane-hf "
                    "never replaces folders it did not write)."
                )
            raise OutputExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")
        check_replaceable(path)
    check_writable(path)


_HELD_LOCKS: set[int] = set()  # descriptors of the output locks this process holds


def _close_inherited_locks() -> None:
    """In a child forked while locks were held (e.g. a DataLoader worker): close its copies of the lock files, so
    that a lock ends with the process that took it, not with the last of its children."""
    for handle in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(handle)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _foreign_lock(lock_path: str, what: str) -> str:
    return (
        f"refusing to use {lock_path} as the lock of the output: it is {what}, not a lock crane-hf made; move it away."
    )


@contextlib.contextmanager
def output_lock(path: str) -> Iterator[None]:
    """Hold the exclusive lock of the output `path` (its parent folder must exist); `OutputInUseError` if taken."""
    path = os.path.abspath(path)
    lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{LOCK_TAG}")
    if fcntl is None:
        yield
        return
    while True:
        try:  # never through a link: the lock file is truncated and written below
            handle = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as error:
            if not os.path.islink(lock_path):
                raise
            raise UnsafeOutputError(_foreign_lock(lock_path, "a symbolic link")) from error
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(handle)
            raise UnsafeOutputError(_foreign_lock(lock_path, "not a file of its own (a hard link, or a special file)"))
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 32).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise OutputInUseError(
                f"{path} is being written by another crane-hf run (process {holder}); wait for it to finish or "
                "choose another output."
            ) from None
        try:
            same = os.path.samestat(os.fstat(handle), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same and not _holds_process_id(lock_path):
            os.close(handle)
            raise UnsafeOutputError(_foreign_lock(lock_path, "a file holding something else than a process id"))
        if same:  # not a lock file that its previous holder removed while we waited for it
            break
        os.close(handle)
    _HELD_LOCKS.add(handle)
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        yield
    finally:
        _HELD_LOCKS.discard(handle)
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_path)
        os.close(handle)


def _unmarked_start(folder: str) -> bool:
    """Whether `folder` is a real folder holding nothing but, at most, the temporary file of a marker being written:
    what a run killed while creating a folder of its own leaves (nothing in it can be a user's)."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return False
    return all(
        item.startswith(MARKER_NAME + TEMP_TAG) and is_own_temporary_file(os.path.join(folder, item))
        for item in os.listdir(folder)
    )


def clean_stale_temporaries(path: str) -> list[str]:
    """Remove what killed runs left beside the output `path`; call it holding `output_lock(path)`.

    Temporary folders `.<name>.crane-hf-tmp-*` holding a marker (or nothing but the marker's own temporary file:
    a run killed while creating it) and temporary files `.<name>.crane-hf-tmp-*` are removed; a retired previous
    output (`.<name>.crane-hf-old-*/previous`) is put back when `path` is missing, the rest removed.
    Returns the paths removed or restored.
    """
    path = os.path.abspath(path)
    parent, name = os.path.dirname(path), os.path.basename(path)
    if not os.path.isdir(parent):
        return []
    done = []
    for entry in sorted(os.listdir(parent)):
        full = os.path.join(parent, entry)
        if entry.startswith(f".{name}{TEMP_TAG}"):
            if os.path.isdir(full) and not os.path.islink(full):
                # marked, or killed before its marker was in place (empty, or only the marker's own temporary
                # file): nothing in it can be a user's
                if is_crane_hf_output(full) or _unmarked_start(full):
                    shutil.rmtree(full)
                    done.append(full)
            elif is_own_temporary_file(full):
                os.remove(full)
                done.append(full)
        elif entry.startswith(f".{name}{OLD_TAG}") and os.path.isdir(full) and is_crane_hf_output(full):
            previous = os.path.join(full, "previous")
            if os.path.lexists(previous) and not os.path.lexists(path):
                os.rename(previous, path)
            shutil.rmtree(full)
            done.append(full)
    return done


def on_main_process(state: Any, action: Callable[[], Any]) -> Any:
    """Run `action` (claiming an output) on the main process of an accelerate `state` only; every process gets its
    (picklable) result, or raises its refusal, so that no process waits forever for a main process that stopped."""
    result, problem = None, None
    if state.is_main_process:
        try:
            result = action()
        except (OSError, ValueError) as error:
            problem = error
    shared = [result, None if problem is None else str(problem)]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(shared)
    if problem is not None:
        raise problem
    if shared[1] is not None:
        raise ValueError(shared[1])
    return shared[0]


def make_staging_dir(path: str, command: str | None) -> str:
    """A new marked temporary folder beside `path`, recognisable by a later run if this one is killed."""
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}{TEMP_TAG}", dir=os.path.dirname(path))
    write_marker(staging, command, state="staging", files=[])
    return staging


PARTIAL_SETTINGS = "run-settings.json"


def partial_dir(path: str) -> str:
    """The folder where a resumable run on the output `path` keeps its results until it completes."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{PARTIAL_TAG}")


def open_partial(
    path: str,
    command: str,
    resume: bool,
    settings: dict[str, Any],
    owned_by_run: Callable[[str], set[str]] | None = None,
) -> tuple[str, str]:
    """Open the partial folder of the output `path` for a resumable run (call it holding `output_lock(path)`).

    Returns (folder, what happened): "resumed" (`resume` and a partial folder of `command` made with equal
    `settings`: its results are kept), "discarded" (a partial folder existed and `resume` was not asked: removed)
    or "new". Raises `UnsafeOutputError` if the folder exists without crane-hf's marker of a partial `command` run,
    or holds a file that is neither listed in that marker with its current content nor among the files
    `owned_by_run(folder)` shows the run wrote (relative paths with "/", their content checked against the run's
    own records): it is never removed, and nothing in it is published as the run's own. Raises `ValueError`
    naming the first differing setting when resuming with other `settings`.
    """
    folder = partial_dir(path)
    outcome = "new"
    if _unmarked_start(folder):  # an earlier version made the folder before its marker: killed in between
        shutil.rmtree(folder)
    if os.path.lexists(folder):
        marker = read_marker(folder) if os.path.isdir(folder) and not os.path.islink(folder) else None
        if marker is None or marker.get("state") != "partial" or marker.get("command") != command:
            raise UnsafeOutputError(
                f"refusing to use {folder}: it is not the partial results of a crane-hf {command} run; move it away."
            )
        records = manifest_records(marker) or {}
        own = owned_by_run(folder) if owned_by_run else set()
        foreign = [
            name
            for name in _listing(folder)
            if name not in own and not matches_record(os.path.join(folder, *name.split("/")), records.get(name))
        ]
        if foreign:
            shown = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
            raise UnsafeOutputError(
                f"refusing to use {folder}: it holds {shown}, which a crane-hf {command} run did not write there "
                "(or changed since); move them away."
            )
        if resume:
            try:
                with open(os.path.join(folder, PARTIAL_SETTINGS), encoding="utf-8") as stream:
                    previous = json.load(stream)
            except (OSError, ValueError):
                previous = None
            current = json.loads(json.dumps(settings))
            if not isinstance(previous, dict):
                raise ValueError(f"--resume: {folder} holds no readable {PARTIAL_SETTINGS}; rerun without --resume.")
            for key in sorted(set(previous) | set(current)):
                if previous.get(key) != current.get(key):
                    raise ValueError(
                        f"--resume: the partial results in {folder} were computed with {key} {previous.get(key)!r}, "
                        f"this run has {current.get(key)!r}; rerun with the same settings, or without --resume to "
                        "start over."
                    )
            return folder, "resumed"
        shutil.rmtree(folder)
        outcome = "discarded"
    written = (json.dumps(settings, indent=1, sort_keys=True)).encode("utf-8")
    # Made complete (marker, then settings) under a temporary name, then renamed: a run killed at any moment leaves
    # either a marked partial folder or a temporary folder that the next run's `clean_stale_temporaries` removes.
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}{TEMP_TAG}", dir=os.path.dirname(folder))
    write_marker(staging, command, state="partial", files={PARTIAL_SETTINGS: bytes_record(written)})
    with open(os.path.join(staging, PARTIAL_SETTINGS), "wb") as stream:
        stream.write(written)
    os.rename(staging, folder)
    return folder, outcome


def retire_and_replace(staging: str, path: str) -> None:
    """Put the complete folder `staging` at `path`, moving an existing `path` aside first and deleting it after."""
    if not os.path.lexists(path):
        os.rename(staging, path)
        return
    retired = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}{OLD_TAG}", dir=os.path.dirname(path))
    write_marker(retired, None, state="retired", files=[])
    os.rename(path, os.path.join(retired, "previous"))
    os.rename(staging, path)
    shutil.rmtree(retired, ignore_errors=True)


__all__ = [
    "MARKER_NAME",
    "PARTIAL_SETTINGS",
    "OutputExistsError",
    "OutputInUseError",
    "UnsafeOutputError",
    "bytes_record",
    "check_not_protected",
    "check_output_dir",
    "check_replaceable",
    "check_writable",
    "claim_changed",
    "claim_contents",
    "claim_entries",
    "clean_stale_temporaries",
    "clean_stale_temporaries_in",
    "content_record",
    "default_protected",
    "file_signatures",
    "is_crane_hf_output",
    "is_own_temporary_file",
    "make_staging_dir",
    "manifest_records",
    "matches_record",
    "on_main_process",
    "open_partial",
    "output_lock",
    "partial_dir",
    "protected_paths",
    "read_marker",
    "retire_and_replace",
    "unowned_entries",
]
