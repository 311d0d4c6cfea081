"""Finding the image files a user named for a batch command: files, folders, glob patterns; inputs that match
nothing are reported, never fatal; symbolic links to folders are not followed and crane-hf's own outputs are left
out (`find_image_inputs`)."""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .output_names import MARKER_NAME

NOT_REGULAR_REASON = "not a regular file (a named pipe, device or socket): not read"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm")


@dataclass
class SkippedFile:
    path: str
    reason: str


@dataclass
class ImageInputs:
    """What `find_image_inputs` found: image paths, inputs it could not use (with the reason), folders left out."""

    paths: list[str]
    skipped: list[SkippedFile]
    left_out: list[str]


class _Search:
    """One search of files, folders and glob patterns (see `find_image_inputs`)."""

    def __init__(self, exclude: Iterable[str]):
        self.exclude = {os.path.realpath(path) for path in exclude}
        self.skipped: list[SkippedFile] = []
        self.left_out: list[str] = []

    def leave_out(self, folder: str) -> bool:
        """Whether `folder` is an output (excluded, or any folder holding a crane-hf marker): noted, not searched."""
        if os.path.realpath(folder) in self.exclude or os.path.isfile(os.path.join(folder, MARKER_NAME)):
            self.left_out.append(folder)
            return True
        return False

    def keep_file(self, path: str, root: str, real_root: str) -> bool:
        """A file of a search under `root` (real path `real_root`): symbolic links that lead outside `root` are
        reported, not followed; links into an excluded folder are left out; what is not a regular file (a named
        pipe, whose opening would block, or a device) is reported, never opened. Plain files need no other check:
        excluded folders are never entered."""
        if os.path.islink(path):
            real = os.path.realpath(path)
            if not _inside(real_root, real):
                self.skipped.append(SkippedFile(path, f"symbolic link leading outside {root}: not followed"))
                return False
            if self.in_excluded(real):
                return False
        return self.regular(path)

    def regular(self, path: str) -> bool:
        """Whether `path` is a regular file (links followed); an existing one that is not is reported."""
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return False
        if stat.S_ISREG(mode):
            return True
        if not stat.S_ISDIR(mode):
            self.skipped.append(SkippedFile(path, NOT_REGULAR_REASON))
        return False

    def in_excluded(self, real_path: str) -> bool:
        return any(_inside(folder, real_path) for folder in self.exclude)

    def real_subfolder(self, path: str) -> bool:
        """Whether to descend into `path`: a folder, not a symbolic link (reported), not an output (left out)."""
        if os.path.islink(path):
            if os.path.isdir(path):
                self.skipped.append(SkippedFile(path, "symbolic link to a folder: not followed"))
            return False
        return os.path.isdir(path) and not self.leave_out(path)

    def images_in(self, folder: str, root: str) -> list[str]:
        """Image files under `folder`, recursively, without following symbolic links to folders."""
        found = []
        real_root = os.path.realpath(root)
        for parent, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if self.real_subfolder(os.path.join(parent, d)))
            for name in sorted(files):
                path = os.path.join(parent, name)
                if name.lower().endswith(IMAGE_EXTENSIONS) and self.keep_file(path, root, real_root):
                    found.append(path)
        return found

    def expand(self, directory: str, parts: list[str]) -> Iterator[str]:
        """Paths under `directory` matching the pattern components `parts` (glob's rules, links not followed)."""
        if not parts:
            yield directory
            return
        head, tail = parts[0], parts[1:]
        if head == "**":
            for parent, dirs, _ in os.walk(directory):
                yield from self.expand(parent, tail)
                dirs[:] = sorted(
                    d for d in dirs if not d.startswith(".") and self.real_subfolder(os.path.join(parent, d))
                )
            return
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return
        for name in names:
            if (name.startswith(".") and not head.startswith(".")) or not fnmatch.fnmatchcase(name, head):
                continue
            path = os.path.join(directory, name)
            if not tail:
                yield path
            elif self.real_subfolder(path):
                yield from self.expand(path, tail)

    def glob(self, pattern: str) -> tuple[str, list[str]]:
        """(root, matches) of a glob pattern; the root is its part before the first wildcard."""
        parts = pattern.split(os.sep)
        fixed = []
        while parts and not glob.has_magic(parts[0]):
            fixed.append(parts.pop(0))
        root = os.sep.join(fixed) or (os.sep if pattern.startswith(os.sep) else ".")
        if not os.path.isdir(root):
            return root, []
        matches = self.expand(root, [part for part in parts if part])
        if root == "." and not pattern.startswith("."):
            return root, [os.path.relpath(match) if match != "." else match for match in matches]
        return root, list(matches)

    def entry(self, entry: str) -> list[str]:
        """The image files of one input (file, folder or pattern)."""
        if os.path.lexists(entry) and self.in_excluded(os.path.realpath(entry)):  # in the run's own output
            self.left_out.append(entry)
            return []
        if os.path.isdir(entry):  # named: searched even if it is a crane-hf output
            return self.images_in(entry, entry)
        if os.path.lexists(entry) or not glob.has_magic(entry):
            return [entry] if self.regular(entry) else []
        root, matches = self.glob(entry)
        real_root = os.path.realpath(root)
        found = []
        for match in matches:
            if os.path.isdir(match) and not os.path.islink(match):
                found.extend([] if self.leave_out(match) else self.images_in(match, root))
            elif os.path.islink(match) and os.path.isdir(match):
                self.skipped.append(SkippedFile(match, "symbolic link to a folder: not followed"))
            elif os.path.lexists(match) and self.keep_file(match, root, real_root):
                found.append(match)
        return found


def _inside(folder: str, path: str) -> bool:
    return os.path.commonpath([folder, path]) == folder


def find_image_inputs(inputs: Iterable[str], exclude: Iterable[str] = ()) -> ImageInputs:
    """Expand files, folders (recursively, image extensions only) and glob patterns, in a stable order.

    Symbolic links to folders are never followed (so a link to "/" or a link loop is not walked; each is reported),
    and symbolic links to files outside the folder or pattern root they were found under are reported, not read.
    Folders holding a crane-hf output marker and the `exclude` folders (the run's own output) are left out of
    folders and patterns (listed in `left_out`), so a run never reads what crane-hf wrote; a folder given by name
    is searched unless it is excluded.
    """
    search = _Search(exclude)
    paths: list[str] = []
    for entry in inputs:
        before = len(search.skipped) + len(search.left_out)
        found = search.entry(entry)
        if not found and len(search.skipped) + len(search.left_out) == before:
            reason = (
                "folder holds no image files" if os.path.isdir(entry) else "no such file, folder or matching pattern"
            )
            search.skipped.append(SkippedFile(entry, reason))
        paths.extend(found)
    unique = list(dict.fromkeys(os.path.normpath(p) for p in paths))
    skipped = list({item.path: item for item in search.skipped}.values())
    return ImageInputs(unique, skipped, list(dict.fromkeys(search.left_out)))


def collect_image_paths(inputs: Iterable[str], exclude: Iterable[str] = ()) -> tuple[list[str], list[SkippedFile]]:
    """`find_image_inputs` as (image paths, inputs that matched nothing or were refused)."""
    found = find_image_inputs(inputs, exclude)
    return found.paths, found.skipped
