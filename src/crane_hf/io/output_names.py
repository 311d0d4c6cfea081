"""Names and paths of output files built from data (file names, class names, meta.json entries).

Two rules, for every command that writes a file named after its input:

- `safe_file_name` turns any text into one portable file name component: no separator, no "." or "..", no
  control or NUL character, none of the characters Windows file systems refuse (`<>:"|?*`, so no drive-like
  prefix such as `A:`), no trailing dot or space, no reserved device name (CON, NUL, COM1, ...), at most
  `MAX_NAME_BYTES` bytes of UTF-8 (longer names keep their start and their end, with a hash of the whole name
  between them, so two long names that differ only in the middle stay different);
- `path_inside` joins a relative path to an output folder and refuses, naming the path, anything that would
  leave the folder: absolute paths, drive letters, ".." components, and existing symbolic links that lead out.
"""

from __future__ import annotations

import hashlib
import os
import re

# Linux and macOS allow 255 bytes per name; the margin leaves room for the temporary names of atomic writes.
MAX_NAME_BYTES = 200
# Names crane-hf gives its own files (output_safety.py): the manifest in every output folder it writes, and the tags
# of its temporary files and folders, retired outputs and locks, by which a later run recognises what a killed run
# left.
MARKER_NAME = ".crane-hf-output.json"
TEMP_TAG = ".crane-hf-tmp-"
OLD_TAG = ".crane-hf-old-"
LOCK_TAG = ".crane-hf-lock"
PARTIAL_TAG = ".crane-hf-partial"  # the results of a resumable run while it runs (`output_safety.open_partial`)
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\<>:"|?*]')
# Names Windows reserves for devices, whatever their extension ("CON.png" included).
_RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9\u00b9\u00b2\u00b3]|LPT[0-9\u00b9\u00b2\u00b3])( *$| *\.)", re.I)


class UnsafeOutputPathError(ValueError):
    """A path built from data would leave the output folder."""


def _shorten(name: str, limit: int) -> str:
    """`name` cut to at most `limit` UTF-8 bytes: its start, a hash of the whole name and its last 40 bytes."""
    encoded = name.encode("utf-8")
    if len(encoded) <= limit:
        return name
    digest = "~" + hashlib.sha256(encoded).hexdigest()[:12] + "~"
    tail = encoded[-40:].decode("utf-8", errors="ignore")
    room = limit - len(digest) - len(tail.encode("utf-8"))
    head = encoded[:room].decode("utf-8", errors="ignore")
    return head + digest + tail


def safe_file_name(text: str, suffix: str = "", limit: int = MAX_NAME_BYTES) -> str:
    """`text` as a single file name ending in `suffix`, within `limit` bytes (see the module docstring).

    Separators, control characters and `<>:"|?*` become "_", as do trailing dots and spaces of the whole name; a
    name made only of dots, or a reserved device name, gets a leading "_"; an empty name becomes "_". Different
    `text` values of at most `limit` bytes map to different names unless they differ only in those characters.
    """
    name = _UNSAFE.sub("_", text) or "_"
    if set(name) == {"."} or _RESERVED.match(name):
        name = "_" + name
    name = _shorten(name, limit - len(suffix.encode("utf-8"))) + suffix
    stripped = name.rstrip(". ")
    return stripped + "_" * (len(name) - len(stripped))


def source_file_name(relative_path: str, suffix: str) -> str:
    """An output name for an input file: its relative path with "/" as "__", extension kept, then `suffix`.

    `good/000.png` and `good/000.jpg` give `good__000.png.png` and `good__000.jpg.png`: one output per input.
    """
    parts = [part for part in re.split(r"[/\\]+", relative_path) if part not in ("", ".")]
    return safe_file_name("__".join(parts), suffix)


def path_inside(folder: str, relative: str) -> str:
    """`folder`/`relative`, refused with `UnsafeOutputPathError` if it would not stay inside `folder`.

    Refused: an empty or absolute `relative`, a drive or UNC prefix, a ".." component, a NUL character, and a
    path that an existing symbolic link under `folder` sends elsewhere.
    """
    problem = None
    parts = re.split(r"[/\\]+", relative) if relative else []
    if not relative or not any(part not in ("", ".") for part in parts):
        problem = "is empty"
    elif "\x00" in relative:
        problem = "contains a NUL character"
    elif os.path.isabs(relative) or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
        problem = "is absolute"
    elif ".." in parts:
        problem = "contains '..'"
    if problem is None:
        root = os.path.realpath(folder)
        target = os.path.realpath(os.path.join(folder, *[part for part in parts if part not in ("", ".")]))
        if os.path.commonpath([root, target]) != root:
            problem = "leads outside through a symbolic link"
    if problem is not None:
        raise UnsafeOutputPathError(f"output path {relative!r} {problem}; it must stay inside {folder}.")
    return os.path.join(folder, *[part for part in parts if part not in ("", ".")])


__all__ = [
    "LOCK_TAG",
    "MARKER_NAME",
    "MAX_NAME_BYTES",
    "OLD_TAG",
    "PARTIAL_TAG",
    "TEMP_TAG",
    "UnsafeOutputPathError",
    "path_inside",
    "safe_file_name",
    "source_file_name",
]
