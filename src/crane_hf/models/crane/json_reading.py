"""Reading the JSON files of a model folder (config.json, preprocessor_config.json, the safetensors index) with
every key repeated within one object refused: JSON parsers keep only the last value of a repeated key, so a
config.json holding "image_threshold" twice would silently decide with one of them."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Any


class DuplicateJSONKeyError(ValueError):
    """A JSON file repeats a key within one object; the message names the file and the keys."""


def pairs_without_duplicates(found: list[str]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A `json` `object_pairs_hook` that records in `found` one line per key repeated within one object (the key,
    how often, the object's first keys) and builds the object as `json` does."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        counts = Counter(key for key, _ in pairs)
        for key, count in counts.items():
            if count > 1:
                keys = ", ".join(map(repr, list(counts)[:6])) + (", ..." if len(counts) > 6 else "")
                found.append(
                    f"key {key!r} appears {count} times in one object (keys {keys}); JSON keeps only the last"
                )
        return dict(pairs)

    return hook


def loads_without_duplicates(text: str, source: str | os.PathLike) -> Any:
    """`json.loads(text)`; `DuplicateJSONKeyError` ("<source>: key 'k' appears 2 times ...") for repeated keys.
    Invalid JSON raises `json.JSONDecodeError` as `json.loads` does."""
    found: list[str] = []
    value = json.loads(text, object_pairs_hook=pairs_without_duplicates(found))
    if found:
        raise DuplicateJSONKeyError(f"{os.fspath(source)}: {'; '.join(found)}.")
    return value


def load_json_without_duplicates(path: str | os.PathLike) -> Any:
    """The parsed UTF-8 JSON file at `path`; `DuplicateJSONKeyError` naming it and the keys repeated within an
    object; `OSError` / `json.JSONDecodeError` / `UnicodeDecodeError` as `open` and `json.load` raise them."""
    with open(path, encoding="utf-8") as stream:
        return loads_without_duplicates(stream.read(), path)


def check_json_file(path: str | os.PathLike) -> None:
    """Refuse (`DuplicateJSONKeyError`) a JSON file at `path` that repeats a key within an object; a file that is
    absent or not valid JSON is left to its reader, which reports it in its own words."""
    try:
        load_json_without_duplicates(path)
    except (OSError, ValueError) as error:
        if isinstance(error, DuplicateJSONKeyError):
            raise
