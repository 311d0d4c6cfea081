"""Results of a batch prediction on disk while it runs, and the tables they become.

Each process of each run appends one JSON line per image to its own shard, `rows/run-RRRR-process-PPPPP.jsonl`,
in the order of its positions, flushed after every batch: a killed run loses at most the batch in flight, and a
line torn by the kill (the last one, without its newline) is ignored when read back. A record holds the image's
position in the run's input list (`index`), its path, the SHA-256 of its bytes and either the row of the
predictions table or the reason it was skipped.

A resumed run (`done_fingerprints`) takes as done every position whose latest record is a scored row for the same path,
with its figure and map in place; the image is re-read and counts as done only if its fingerprint is unchanged. When
the run completes, `merged_records` reads every shard at once, in order of position (each shard is sorted, so the merge
holds one line per shard in memory, however many images), keeping the latest record of each position, and
`write_tables` streams them into the tables: predictions.csv, predictions.json, predictions.jsonl and
predictions.parquet (through `datasets`), as asked.
"""

from __future__ import annotations

import csv
import heapq
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

ROWS_FOLDER = "rows"
SHARD_NAME = re.compile(r"run-(\d{4,})-process-(\d{5,})\.jsonl")
# With a reference memory (few-shot), the zero-shot and few-shot branches of "score" (`reference_memory.py`).
FEW_SHOT_COLUMNS = ("zero_shot_score", "few_shot_score")
CSV_COLUMNS = ("path", "score", "is_anomalous", "max_pixel_score", "anomalous_pixel_fraction", "overlay", "sha256")
TABLE_FORMATS = ("csv", "json", "jsonl", "parquet")


class ShardWriter:
    """Appends the records of one process of one run to its shard; `flush()` after every batch."""

    def __init__(self, folder: str, run: int, rank: int):
        os.makedirs(os.path.join(folder, ROWS_FOLDER), exist_ok=True)
        self.path = os.path.join(folder, ROWS_FOLDER, f"run-{run:04d}-process-{rank:05d}.jsonl")
        self.run = run
        self.stream: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps({**record, "run": self.run}, allow_nan=False) + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()


def shard_paths(folder: str) -> list[str]:
    """The shards under `folder` (any run, any process), in order of run and process."""
    rows = os.path.join(folder, ROWS_FOLDER)
    names = sorted(name for name in os.listdir(rows) if SHARD_NAME.fullmatch(name)) if os.path.isdir(rows) else []
    return [os.path.join(rows, name) for name in names]


def next_run(folder: str) -> int:
    """The number of the next run on the partial results in `folder` (1 for the first)."""
    runs = [int(SHARD_NAME.fullmatch(os.path.basename(path)).group(1)) for path in shard_paths(folder)]
    return max(runs, default=0) + 1


def read_records(path: str) -> Iterator[dict[str, Any]]:
    """The records of a shard; its last line is ignored when the newline is missing (torn by a kill). Any other
    line that is not a record raises `ValueError` naming the shard and line: results are never guessed."""
    with open(path, encoding="utf-8", newline="\n") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.endswith("\n"):
                return  # torn by a kill: that image is scored again
            try:
                record = json.loads(line)
                int(record["index"]), str(record["path"]), int(record["run"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}, line {number}: not a prediction record ({error})") from error
            yield record


def merged_records(folder: str) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(latest record, the earlier records it supersedes) of every position found in the shards of `folder`, in
    order of position; the latest is that of the highest run."""
    streams = [read_records(path) for path in shard_paths(folder)]
    ordered = heapq.merge(*streams, key=lambda record: (record["index"], record["run"]))
    group: list[dict[str, Any]] = []
    for record in ordered:
        if group and record["index"] != group[0]["index"]:
            yield group[-1], group[:-1]
            group = []
        group.append(record)
    if group:
        yield group[-1], group[:-1]


def done_fingerprints(folder: str, positions: range, name: Callable[[int], str]) -> dict[int, str]:
    """Position -> SHA-256 of the scored row a previous run holds, for the `positions` whose latest record is a
    scored row for the path the position has now (`name(index)`) and whose figure and map are in `folder` with the
    content the record gives (a run killed after writing a batch's records, before naming its files, left them
    without: those images are scored again)."""
    from ..io.output_safety import matches_record

    done: dict[int, str] = {}
    for record, _ in merged_records(folder):
        index = record["index"]
        if index in positions and "skipped" not in record and record["path"] == name(index):
            written = (record.get("written") or {}).items()
            if all(matches_record(os.path.join(folder, *file.split("/")), content) for file, content in written):
                done[index] = record["sha256"]
    return done


def table_row(record: dict[str, Any]) -> dict[str, Any]:
    """The predictions-table row of a scored record (with a reference memory, also its two branches' scores)."""
    row = {column: record[column] for column in CSV_COLUMNS}
    row.update({column: record[column] for column in FEW_SHOT_COLUMNS if column in record})
    return row


def write_tables(
    folder: str, records: Iterable[dict[str, Any]], summary: dict[str, Any], formats: Iterable[str]
) -> tuple[int, int, list[dict[str, str]]]:
    """Stream the scored `records` (in order) into the tables of `folder` in `formats` (see `TABLE_FORMATS`);
    `summary` heads predictions.json, whose "skipped" entries are the skipped records and `summary["skipped"]`.
    Returns (rows, anomalous rows, skipped entries)."""
    formats = set(formats)
    streams: dict[str, TextIO] = {}
    skipped = list(summary.get("skipped", []))
    scored = anomalous = 0
    try:
        if "csv" in formats:
            streams["csv"] = open(os.path.join(folder, "predictions.csv"), "w", encoding="utf-8", newline="")  # noqa: SIM115
            few_shot = summary.get("reference_memory") is not None  # every row of the run has the two branches
            table = csv.DictWriter(streams["csv"], fieldnames=CSV_COLUMNS + (FEW_SHOT_COLUMNS if few_shot else ()))
            table.writeheader()
        if "jsonl" in formats or "parquet" in formats:
            name = "predictions.jsonl" if "jsonl" in formats else ".predictions.jsonl.tmp"
            streams["jsonl"] = open(os.path.join(folder, name), "w", encoding="utf-8")  # noqa: SIM115
        if "json" in formats:
            streams["json"] = open(os.path.join(folder, "predictions.json"), "w", encoding="utf-8")  # noqa: SIM115
            head = {key: value for key, value in summary.items() if key not in ("skipped", "left_out")}
            streams["json"].write(json.dumps(head, indent=2)[:-2] + ',\n  "predictions": [')
        for record in records:
            if "skipped" in record:
                skipped.append({"path": record["path"], "reason": record["skipped"]})
                continue
            row = table_row(record)
            if "csv" in streams:
                table.writerow(row)
            if "jsonl" in streams:
                streams["jsonl"].write(json.dumps(row, allow_nan=False) + "\n")
            if "json" in streams:
                streams["json"].write(("\n" if scored == 0 else ",\n") + json.dumps(row, allow_nan=False))
            scored += 1
            anomalous += bool(row["is_anomalous"])
        if "json" in streams:
            tail = {"skipped": skipped, "left_out": summary.get("left_out", [])}
            streams["json"].write(("\n  " if scored else "") + "],\n" + json.dumps(tail, indent=2)[2:] + "\n")
    finally:
        for stream in streams.values():
            stream.close()
    if "parquet" in formats:
        _write_parquet(folder, streams["jsonl"].name)
        if "jsonl" not in formats:
            os.remove(streams["jsonl"].name)
    if skipped:
        with open(os.path.join(folder, "skipped.txt"), "w", encoding="utf-8") as stream:
            stream.writelines(f"{item['path']}\t{item['reason']}\n" for item in skipped)
    return scored, anomalous, skipped


def _write_parquet(folder: str, jsonl_path: str) -> None:
    """predictions.parquet from the JSON Lines table, through `datasets` (Arrow batches on disk, not in memory)."""
    import shutil
    import tempfile

    import datasets

    features = datasets.Features(
        {
            "path": datasets.Value("string"),
            "score": datasets.Value("float64"),
            "is_anomalous": datasets.Value("bool"),
            "max_pixel_score": datasets.Value("float64"),
            "anomalous_pixel_fraction": datasets.Value("float64"),
            "overlay": datasets.Value("string"),
            "sha256": datasets.Value("string"),
        }
    )
    cache = tempfile.mkdtemp(prefix=".parquet-cache", dir=folder)
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        if os.path.getsize(jsonl_path):
            table = datasets.Dataset.from_json(jsonl_path, features=features, cache_dir=cache)
        else:
            table = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
        table.to_parquet(os.path.join(folder, "predictions.parquet"))
        del table
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
        shutil.rmtree(cache, ignore_errors=True)


__all__ = [
    "CSV_COLUMNS",
    "FEW_SHOT_COLUMNS",
    "ROWS_FOLDER",
    "TABLE_FORMATS",
    "ShardWriter",
    "done_fingerprints",
    "merged_records",
    "next_run",
    "read_records",
    "shard_paths",
    "table_row",
    "write_tables",
]
