"""meta.json writers for the datasets of the zero-shot benchmarks, from their public folder layouts.

    python -m crane_hf.data.meta_writers mpdd /data/mpdd            # writes /data/mpdd/meta.json
    python -m crane_hf.data.meta_writers --list

Every record is checked before anything is written (images exist, masks exist and have their image's size,
paths stay inside the root); an existing meta.json is replaced only with `--overwrite`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..commands.cli_support import local_path
from ..io.atomic import OutputExistsError
from .layouts import read_visa_csv, scan_class_folders
from .meta_json import write_meta_json
from .records import AnomalyRecord, DatasetLayoutError, validate_records
from .writers_industrial import btad_records, dagm_records, dtd_records, ksdd_records, mpdd_records
from .writers_medical import (
    br35h_records,
    brainmri_records,
    clinicdb_records,
    colondb_records,
    headct_records,
    isic_records,
    tn3k_records,
)


@dataclass(frozen=True)
class MetaWriter:
    """How to index one dataset: its records per split, and whether its anomalous images all have masks."""

    title: str
    records: Callable[[str], dict[str, list[AnomalyRecord]]]
    has_masks: bool = True


WRITERS: dict[str, MetaWriter] = {
    "mvtec": MetaWriter("MVTec-AD", lambda root: scan_class_folders(root, mask_suffixes=("_mask",))),
    "visa": MetaWriter("VisA", read_visa_csv),
    "mpdd": MetaWriter("MPDD", mpdd_records),
    "btad": MetaWriter("BTAD", btad_records),
    "ksdd": MetaWriter("KolektorSDD / KolektorSDD2", ksdd_records),
    "dagm": MetaWriter("DAGM 2007", dagm_records),
    "dtd": MetaWriter("DTD-Synthetic", dtd_records),
    "headct": MetaWriter("Head CT - hemorrhage", headct_records, has_masks=False),
    "brainmri": MetaWriter("Brain MRI Images for Brain Tumor Detection", brainmri_records, has_masks=False),
    "br35h": MetaWriter("Br35H", br35h_records, has_masks=False),
    "isic": MetaWriter("ISIC (lesion segmentation)", isic_records),
    "colondb": MetaWriter("CVC-ColonDB", colondb_records),
    "clinicdb": MetaWriter("CVC-ClinicDB", clinicdb_records),
    "tn3k": MetaWriter("TN3K", tn3k_records),
}


def dataset_records(dataset: str, root: str, check_files: bool = True) -> dict[str, list[AnomalyRecord]]:
    """The checked records per split of `dataset` (a key of `WRITERS`) stored at `root`."""
    if dataset not in WRITERS:
        raise KeyError(f"Unknown dataset {dataset!r}; choose one of {', '.join(WRITERS)}.")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Dataset root {root} does not exist or is not a folder.")
    writer = WRITERS[dataset]
    splits = {split: records for split, records in writer.records(root).items() if records}
    everything = [record for records in splits.values() for record in records]
    if not everything:
        raise FileNotFoundError(f"No {writer.title} images found under {root}; see docs/data.md for the layout.")
    validate_records(root, everything, f"{writer.title} at {root}", check_files, require_masks=writer.has_masks)
    return splits


def write_dataset_meta(dataset: str, root: str, overwrite: bool = False, meta_path: str | None = None) -> str:
    """Index `dataset` at `root` and write its meta.json (default `<root>/meta.json`); returns the path."""
    return write_meta_json(root, dataset_records(dataset, root), overwrite=overwrite, meta_path=meta_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", choices=sorted(WRITERS), help="which dataset's layout to read")
    parser.add_argument("root", nargs="?", help="the folder the dataset was extracted to")
    parser.add_argument("--output", type=local_path, help="where to write the index (default: <root>/meta.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing meta.json")
    parser.add_argument("--list", action="store_true", help="list the supported datasets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, writer in WRITERS.items():
            print(f"{name:10s} {writer.title}")
        return 0
    if not args.dataset or not args.root:
        parser.error("give a dataset and its root folder (or --list)")
    try:
        splits = dataset_records(args.dataset, args.root)
        path = write_meta_json(args.root, splits, overwrite=args.overwrite, meta_path=args.output)
    except (DatasetLayoutError, FileNotFoundError, OutputExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = ", ".join(
        f"{split}: {len(r)} images ({sum(x.label for x in r)} anomalous)" for split, r in splits.items()
    )
    print(f"Wrote {path} ({counts}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
