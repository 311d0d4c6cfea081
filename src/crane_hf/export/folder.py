"""The exported folder: what `crane_export.json` describes, and the checks that make a stranger's folder safe to run.

    model.onnx, model.onnx.data  (format "onnx": the graph, and its weights as ONNX external data)
    model.xml, model.bin         (format "openvino": OpenVINO IR)
    dino.xml, dino.bin           (Crane+, format "openvino": DINOv2's patch tokens; model.xml then takes the D-Attn
                                 weights as a second input, computed by the runner in float64 between the two)
    config.json                  the model's `CraneConfig` (thresholds, smoothing sigma; image_size = the export's)
    preprocessor_config.json     the `CraneImageProcessor` at the export's image size
    crane_export.json            format, graph file, input and outputs, the computation the graph does (the
                                 config's inference fields), versions, and the verification result

A folder downloaded from someone else is read as untrusted: every field of `crane_export.json` the runner relies
on is checked (type and value, named in the error), the graph files and the JSON files must be regular files
inside the folder (no symbolic link), and the external-data locations of an ONNX file are read with onnx's
external-data helpers and refused where they leave the folder, before a runtime opens the file. Errors are one
line naming the file and the field or tensor.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .packages import require

EXPORT_FILE = "crane_export.json"
FORMATS = {"onnx": "model.onnx", "openvino": "model.xml"}
DINO_GRAPHS = {"onnx": "dino.onnx", "openvino": "dino.xml"}
INPUT_NAME = "pixel_values"
DATTN_WEIGHTS_NAME = "dattn_weights"  # the second input of a graph whose D-Attn weights come from outside
DINO_TOKENS_NAME = "dino_tokens"
OUTPUT_NAMES = ("anomaly_scores", "anomaly_maps", "smoothed_anomaly_maps")
WEIGHT_TYPES = ("float32", "float16")
MAX_METADATA_BYTES = 1 << 20  # crane_export.json is about 1 kB; a larger file is not one export wrote
MAX_IMAGE_SIZE = 16384


def is_exported_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding `crane_export.json` (written by `export_model`)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(os.fspath(path), EXPORT_FILE))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_export_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed `crane_export.json` of an exported folder, every field the runner uses checked.

    Returns a dict with `format` ("onnx" | "openvino"), `graph_file` (the format's file name), `image_size` (int S),
    `input` ({"name": "pixel_values", "shape": ["batch", 3, S, S], "dtype": "float32"}), `outputs`
    (["anomaly_scores", "anomaly_maps"] and, with smoothed maps, "smoothed_anomaly_maps"), `smoothing_sigma`
    (None, or the sigma in pixels of the smoothed output), `weights` ("float32" | "float16"), `dino_graph_file`
    (absent, or the DINOv2 graph's file name when D-Attn's weights are computed outside the graph) and whatever
    else the file holds (`variant`, `opset`, `exported_with`, `verification`: informational; `computation`: the
    config fields the graph computes with, which the runner compares with `config.json`).

    Raises:
        FileNotFoundError: the folder has no `crane_export.json`.
        ValueError: the file is not JSON, too large, or a field is missing or wrong (the message names it).
    """
    path = os.path.join(os.fspath(folder), EXPORT_FILE)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{folder} is not an exported Crane folder: it has no {EXPORT_FILE}.")
    _regular_file_inside(os.fspath(folder), EXPORT_FILE, "the export record")
    if os.path.getsize(path) > MAX_METADATA_BYTES:
        raise ValueError(f"{path} is {os.path.getsize(path)} bytes; an export writes about 1 kB (refused).")
    try:
        with open(path, encoding="utf-8") as stream:
            metadata = json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} must hold a JSON object.")

    def field(name: str, problem: str) -> ValueError:
        return ValueError(f"{path}: field {name!r} {problem} (got {metadata.get(name)!r}).")

    fmt = metadata.get("format")
    if fmt not in FORMATS:
        raise field("format", f"must be one of {', '.join(FORMATS)}")
    if metadata.get("graph_file") != FORMATS[fmt]:
        raise field("graph_file", f"must be {FORMATS[fmt]!r} for format {fmt!r}")
    size = metadata.get("image_size")
    if not _is_int(size) or not 0 < size <= MAX_IMAGE_SIZE:
        raise field("image_size", f"must be an integer in [1, {MAX_IMAGE_SIZE}]")
    expected_input = {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"}
    if metadata.get("input") != expected_input:
        raise field("input", f"must be {json.dumps(expected_input)}")
    outputs = metadata.get("outputs")
    if outputs not in (list(OUTPUT_NAMES[:2]), list(OUTPUT_NAMES)):
        raise field("outputs", f"must be {list(OUTPUT_NAMES[:2])}, optionally followed by {OUTPUT_NAMES[2]!r}")
    sigma = metadata.get("smoothing_sigma")
    if len(outputs) == 3:
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not (math.isfinite(sigma) and sigma > 0):
            raise field("smoothing_sigma", f"must be a positive number when the outputs include {OUTPUT_NAMES[2]}")
    elif sigma is not None:
        raise field("smoothing_sigma", f"must be null without the {OUTPUT_NAMES[2]} output")
    if metadata.get("dino_graph_file", DINO_GRAPHS[fmt]) != DINO_GRAPHS[fmt]:
        raise field("dino_graph_file", f"must be {DINO_GRAPHS[fmt]!r} for format {fmt!r} when present")
    if "dino_graph_file" in metadata:
        # the runner computes D-Attn's weights between the two graphs with config.json's beta and gamma: they must be
        # recorded, so that an edited config.json is refused (the exports that write this field always record them)
        computation = metadata.get("computation")
        recorded = isinstance(computation, dict) and all(
            isinstance(computation.get(name), (int, float))
            and not isinstance(computation.get(name), bool)
            and math.isfinite(computation.get(name))
            for name in ("dattn_beta", "dattn_gamma")
        )
        if not recorded:
            raise field("computation", "must record dattn_beta and dattn_gamma (numbers) with a dino_graph_file")
    if metadata.get("weights") not in WEIGHT_TYPES:
        raise field("weights", f"must be one of {', '.join(WEIGHT_TYPES)}")
    optional = (
        ("variant", str),
        ("opset", int),
        ("exported_with", dict),
        ("verification", dict),
        ("computation", dict),
    )
    for name, kind in optional:
        if name in metadata and metadata[name] is not None and not isinstance(metadata[name], kind):
            raise field(name, f"must be a {kind.__name__} when present")
    return metadata


def _regular_file_inside(folder: str, name: str, what: str) -> str:
    """`folder/name` if it is a regular file (not a link) whose real path is inside `folder`; else ValueError."""
    path = os.path.join(folder, name)
    if os.path.isabs(name) or os.path.islink(path):
        raise ValueError(f"{path}: {what} must be a regular file inside {folder} (it is a link or absolute path).")
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise ValueError(f"{path}: {what} resolves to {real}, outside {folder} (refused).")
    if os.path.lexists(path) and not os.path.isfile(path):  # a folder, a FIFO (reading it would block), a device
        raise ValueError(f"{path}: {what} must be a regular file inside {folder} (it is not a regular file).")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing ({what}, named by {folder}/{EXPORT_FILE}).")
    return path


def check_onnx_external_data(folder: str, graph_path: str) -> list[str]:
    """The external-data files an ONNX graph reads, each checked to be a regular file inside `folder`.

    Reads the graph without its weights (`onnx.load(..., load_external_data=False)`) and the location of every
    tensor stored outside it with onnx's external-data helpers, before any runtime opens the file: an absolute
    location, one that leaves the folder (`../`, a link) or a missing file is refused, naming the tensor.

    Raises:
        ImportError: onnx is not installed.
        ValueError / FileNotFoundError: the file is not ONNX, or a location is refused.
    """
    require("onnx-check", "Checking an ONNX file's external data")
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    try:
        model = onnx.load(graph_path, load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise ValueError(f"{graph_path} is not a readable ONNX file ({type(error).__name__}: {error}).") from error
    files = []
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        if not location:
            raise ValueError(f"{graph_path}: tensor {tensor.name!r} is stored outside the file but names no location.")
        if location not in files:
            _regular_file_inside(folder, location, f"the external data of tensor {tensor.name!r} ({location!r})")
            files.append(location)
    return files


def check_json_files(folder: str | os.PathLike) -> None:
    """`config.json` and `preprocessor_config.json`, which the runner reads besides the graphs, must be regular files
    inside `folder` too (`crane_export.json` is checked by `read_export_metadata`)."""
    for name, what in (("config.json", "the model's config"), ("preprocessor_config.json", "the image processor")):
        _regular_file_inside(os.fspath(folder), name, what)


def check_graph_files(folder: str | os.PathLike, metadata: dict[str, Any], key: str = "graph_file") -> str:
    """The path of the graph file `metadata[key]` ("graph_file" or "dino_graph_file") of a checked `metadata`, after
    checking every file the runtime will read for it.

    ONNX: the graph and its external-data files (`check_onnx_external_data`); OpenVINO: the `.xml` and the `.bin`
    beside it. Each must be a regular file inside `folder`.
    """
    folder = os.fspath(folder)
    what = "the DINOv2 graph file" if key == "dino_graph_file" else "the graph file"
    graph_path = _regular_file_inside(folder, metadata[key], what)
    if metadata["format"] == "onnx":
        check_onnx_external_data(folder, graph_path)
    else:
        weights = os.path.splitext(metadata[key])[0] + ".bin"
        _regular_file_inside(folder, weights, f"the OpenVINO weights of {metadata[key]}")
    return graph_path


__all__ = [
    "DATTN_WEIGHTS_NAME",
    "DINO_GRAPHS",
    "DINO_TOKENS_NAME",
    "EXPORT_FILE",
    "FORMATS",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "WEIGHT_TYPES",
    "check_graph_files",
    "check_json_files",
    "check_onnx_external_data",
    "is_exported_folder",
    "read_export_metadata",
]
