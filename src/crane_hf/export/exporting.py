"""Export a Crane / Crane+ model to an ONNX or OpenVINO folder that runs without the model code.

The graph is traced by `torch.onnx.export` (the `torch.export` based exporter, opset 23, whose attention becomes
ONNX's `Attention` operator); OpenVINO's IR is converted from that ONNX file by `openvino.convert_model`, so both
formats hold the same graph. The exported folder describes itself (`folder.py`: its files, and how a stranger's
folder is checked).

Crane+ to OpenVINO is two graphs, DINOv2's patch tokens (`DinoTokensGraph`) and the rest taking the D-Attn weights
as an input, because OpenVINO's CPU plugin computes float64 in float32 and D-Attn's hard mask must be decided in
float64 (docs/export.md); the runner computes the weights between them. The ONNX file stays one graph.

Before the folder appears, the exported file is run on a probe batch of two seeded random images and compared
with the eager model (`verify_export`); a deviation above its tolerance raises `ExportParityError` and leaves
nothing behind.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from ..io.atomic import atomic_output_dir
from ..io.output_safety import protected_paths
from ..models.crane.configuration_crane import MAX_IMAGE_SIZE, _as_int
from ..models.crane.d_attention import float32_mask_flips, float64_dattn
from ..models.crane.gaussian_smoothing import gaussian_smooth
from ..models.crane.image_processing_crane import CraneImageProcessor
from ..models.crane.modeling_crane import CraneForAnomalyDetection
from .folder import DINO_GRAPHS, EXPORT_FILE, FORMATS, INPUT_NAME, read_export_metadata
from .graph import CraneExportGraph, DinoTokensGraph
from .packages import require
from .runner import POST_PROCESSING_FIELDS

OPSET = 23  # the first opset with ONNX's Attention operator (what scaled_dot_product_attention exports to)
DEFAULT_TOLERANCE = 1e-4
PROBE_BATCH = 2  # the probe batch differs from 1 so that the dynamic batch dimension is exercised


class ExportParityError(ValueError):
    """The exported graph's outputs differ from the eager model's by more than the tolerance."""


def _versions() -> dict[str, str]:
    names = ("crane-hf", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "openvino")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _check_image_size(model: CraneForAnomalyDetection, image_size: int) -> int:
    config = model.config
    patches = [_as_int(config.clip_config.vision_config.patch_size)]
    if config.use_dattn:
        patches.append(_as_int(config.dino_config.patch_size))
    if isinstance(image_size, bool) or int(image_size) != image_size or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
    if image_size > MAX_IMAGE_SIZE:  # as a config refuses it, before the probe batch is allocated
        raise ValueError(f"image_size={image_size} exceeds the largest supported input side {MAX_IMAGE_SIZE}.")
    for patch in patches:
        if image_size % patch:
            raise ValueError(f"image_size={image_size} must be a multiple of the patch size {patch}.")
    return int(image_size)


def export_onnx(graph: CraneExportGraph | DinoTokensGraph, path: str, image_size: int, opset: int = OPSET) -> None:
    """Trace `graph` with `torch.onnx.export` (dynamo) to `path`: input [batch, 3, S, S] (and, for a graph taking
    D-Attn weights, [batch, M, M]), batch dynamic.

    The weights are stored as ONNX external data in `<path>.data` beside it (whatever their size: the graph file stays
    small, so a runner checks its external-data locations without reading the weights, `folder.py`).
    """
    require("onnx", "ONNX export")
    examples = [torch.zeros(PROBE_BATCH, 3, image_size, image_size)]
    if len(graph.input_names) == 2:  # D-Attn weights: uniform rows (the values do not matter to the trace)
        cells = (image_size // _as_int(graph.model.config.dino_config.patch_size)) ** 2
        examples.append(torch.full((PROBE_BATCH, cells, cells), 1.0 / cells))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            tuple(examples),
            dynamo=True,
            opset_version=opset,
            input_names=list(graph.input_names),
            output_names=list(graph.output_names),
            dynamic_shapes=tuple({0: batch} for _ in examples),
            optimize=True,
            verbose=False,
        )
    program.save(path, external_data=True)


def convert_to_openvino(onnx_path: str, xml_path: str, float16_weights: bool = False) -> None:
    """OpenVINO IR (`xml_path` and its .bin) converted from an ONNX file by `openvino.convert_model`.

    `float16_weights` stores the weights in float16 (half the file; computation stays float32 on CPUs), which
    changes the outputs: its deviation is measured by the verification like any other.
    """
    require("openvino", "OpenVINO export")
    import openvino

    ov_model = openvino.convert_model(onnx_path)
    openvino.save_model(ov_model, xml_path, compress_to_fp16=float16_weights)


@dataclass
class Verification:
    """Differences between the exported graph and the model on the probe batch (absolute; scores and maps in [0, 1]).

    The reference is the eager model with its D-Attn weights in float64 (`float64_dattn`), what the graph computes
    (identical to the eager model for Crane). `eager_float32_mask_flips` counts the D-Attn mask decisions of the
    probe batch where the eager float32 computation differs from float64 (None for Crane).
    """

    backend: str
    batch: int
    max_abs_diff_scores: float
    max_abs_diff_maps: float
    mean_abs_diff_maps: float
    max_abs_diff_smoothed_maps: float | None
    eager_float32_mask_flips: int | None
    tolerance: float

    def failures(self) -> list[str]:
        """What exceeds the tolerance (NaN counts as exceeding): scores, and every pixel of every map."""
        checks = [("scores, largest", self.max_abs_diff_scores), ("maps, largest", self.max_abs_diff_maps)]
        if self.max_abs_diff_smoothed_maps is not None:
            checks.append(("smoothed maps, largest", self.max_abs_diff_smoothed_maps))
        return [f"{name} {value:.3g} > {self.tolerance:g}" for name, value in checks if not value <= self.tolerance]


def eager_float32_mask_flips(model: CraneForAnomalyDetection, pixel_values: torch.Tensor) -> int | None:
    """How many off-diagonal D-Attn mask decisions of the eager float32 model differ from float64's on
    `pixel_values` (float32 [B, 3, S, S]; `d_attention.float32_mask_flips`); None for a model without D-Attn."""
    config = model.config
    if not config.use_dattn:
        return None
    with torch.inference_mode():
        tokens, _ = model._dino_patch_tokens(pixel_values)
        return int(float32_mask_flips(tokens, config.dattn_beta, config.dattn_gamma).sum())


def verify_export(
    model: CraneForAnomalyDetection, folder: str, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0
) -> Verification:
    """Run the exported graph in `folder` and the model on the same seeded probe batch and compare.

    The reference is the eager model with D-Attn in float64 (`float64_dattn`): the graph decides D-Attn's hard mask
    in float64 (`dino_similarity_attention_float64`), as exact arithmetic does, where eager float32 can decide a
    logit within its rounding of 0 the other way (counted in `eager_float32_mask_flips`). Accepted when the largest
    score difference and the largest difference at every pixel of the maps (and of the smoothed maps) are at most
    `tolerance`.

    Raises:
        ExportParityError: a difference above the tolerance (or a non-finite output).
    """
    from .runner import ExportedCraneModel

    metadata = read_export_metadata(folder)
    size = metadata["image_size"]
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(PROBE_BATCH, 3, size, size, generator=generator)
    runner = ExportedCraneModel(folder)
    exported = {name: torch.from_numpy(value) for name, value in runner.run(probe.numpy()).items()}
    with torch.inference_mode(), float64_dattn():
        reference = model(probe)
    sigma = metadata.get("smoothing_sigma")
    smoothed = gaussian_smooth(reference.anomaly_maps, sigma) if sigma else None
    map_diff = (exported["anomaly_maps"] - reference.anomaly_maps).abs()
    result = Verification(
        backend=runner.backend,
        batch=PROBE_BATCH,
        max_abs_diff_scores=float((exported["anomaly_scores"] - reference.anomaly_scores).abs().max()),
        max_abs_diff_maps=float(map_diff.max()),
        mean_abs_diff_maps=float(map_diff.mean()),
        max_abs_diff_smoothed_maps=(
            float((exported["smoothed_anomaly_maps"] - smoothed).abs().max()) if smoothed is not None else None
        ),
        eager_float32_mask_flips=eager_float32_mask_flips(model, probe),
        tolerance=float(tolerance),
    )
    failures = result.failures()
    if failures:
        raise ExportParityError(
            f"The exported graph ({runner.backend}) differs from the model on a probe batch of {PROBE_BATCH} images: "
            f"{'; '.join(failures)}. Nothing was written."
        )
    return result


def export_model(
    model: CraneForAnomalyDetection,
    output_dir: str | os.PathLike,
    format: str = "onnx",
    image_size: int | None = None,
    smoothed_maps: bool = False,
    image_processor: CraneImageProcessor | None = None,
    float16_weights: bool = False,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
    protected: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Export `model` to a self-describing folder (see the module docstring) and return its metadata.

    Args:
        model: a float32 `CraneForAnomalyDetection` in eval mode, on the CPU.
        output_dir: the folder to write (built under a temporary name, renamed when complete).
        format: "onnx" (ONNX Runtime, any ONNX runtime with opset 23) or "openvino" (OpenVINO IR; for Crane+ two
            graphs, DINOv2's and the rest, with D-Attn's weights computed between them by the runner in float64).
        image_size: the side S of the square input the graph takes; default `model.config.image_size`.
        smoothed_maps: also output the maps smoothed with `model.config.smoothing_sigma` (for runtimes without
            PyTorch; the runner smooths the unsmoothed maps itself, as the pipeline does).
        image_processor: the processor to save beside the graph (its image size is set to S); default the one
            matching the config.
        float16_weights: OpenVINO only: store the weights in float16 (the verification measures the deviation;
            raise `tolerance` to accept it).
        verify: compare the exported graph with the eager model on a probe batch before writing the folder.
        tolerance: the largest difference of the scores and at any pixel of the maps that the verification
            accepts (absolute; scores and maps are in [0, 1]; `verify_export`).
        overwrite: replace an existing `output_dir` (an earlier output of crane-hf; never the folder the model was
            loaded from, `model.name_or_path`, nor one holding it, nor a `protected` (what, path) folder).
        protected: more (what, path) folders the output may not be or contain (the command's backbone folders).

    Raises:
        ValueError: a bad argument (format, image size, a non-float32 or training-mode model), a model holding a
            reference memory (few-shot: the graph computes the zero-shot branch only), or an output that is or
            contains the model folder (`UnsafeOutputError`).
        ImportError: an exporter or runtime is not installed (the message names the packages).
        ExportParityError: the verification found a larger deviation than `tolerance`.
        OutputExistsError: `output_dir` exists and `overwrite` is False.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
    if float16_weights and format != "openvino":
        raise ValueError("float16_weights applies to the openvino format only.")
    if getattr(model, "reference_memory", None) is not None:
        raise ValueError(
            f"{model.name_or_path or 'The model'} holds a reference memory (few-shot), whose fused scores the "
            "exported graph would not compute: export covers the zero-shot branch only. To export the zero-shot "
            "model, remove the memory first (model.set_reference_memory(None), or a model folder without "
            "reference_memory.safetensors)."
        )
    if any(parameter.device.type != "cpu" for parameter in model.parameters()):
        raise ValueError("Export a model on the CPU (model.to('cpu')).")
    size = _check_image_size(model, model.config.image_size if image_size is None else image_size)
    sigma = float(model.config.smoothing_sigma) if smoothed_maps else 0.0
    require("onnx", "ONNX export")
    if verify:
        require("onnxruntime" if format == "onnx" else "openvino", f"Verifying the {format} export")
    if format == "openvino":
        require("openvino", "OpenVINO export")
    # Crane+ to OpenVINO: D-Attn's weights from outside the graph, in float64 (the module docstring)
    dattn_weights_outside = model.config.use_dattn and format == "openvino"
    graph = CraneExportGraph(model, smoothing_sigma=sigma, dattn_weights_input=dattn_weights_outside)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.image_size = size
    processor = copy.deepcopy(image_processor or CraneImageProcessor.from_crane_config(model.config))
    processor.image_size = size
    metadata: dict[str, Any] = {
        "format": format,
        "graph_file": FORMATS[format],
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"},
        "outputs": list(graph.output_names),
        "image_size": size,
        "smoothing_sigma": sigma or None,
        "variant": config.variant,
        "opset": OPSET,
        **({"dino_graph_file": DINO_GRAPHS[format]} if dattn_weights_outside else {}),
        "weights": "float16" if float16_weights else "float32",
        # What the graph computes (config.json may be edited afterwards; the runner refuses one that differs here).
        "computation": {
            name: value
            for name, value in json.loads(json.dumps(config.inference_computation, default=str)).items()
            if name not in POST_PROCESSING_FIELDS
        },
        "exported_with": _versions(),
    }
    protected = [*(protected or []), *protected_paths("the model folder", [model.name_or_path])]
    with atomic_output_dir(
        os.fspath(output_dir), overwrite=overwrite, protected=protected, command="export"
    ) as staging:
        graphs = [(graph, FORMATS[format])]
        if dattn_weights_outside:
            graphs.append((DinoTokensGraph(model), DINO_GRAPHS[format]))
        for each, name in graphs:
            graph_path = os.path.join(staging, name)
            if format == "onnx":
                export_onnx(each, graph_path, size)
                continue
            with tempfile.TemporaryDirectory(prefix=".onnx-", dir=staging) as scratch:
                onnx_path = os.path.join(scratch, "model.onnx")
                export_onnx(each, onnx_path, size)
                convert_to_openvino(onnx_path, graph_path, float16_weights=float16_weights)
        config.to_json_file(os.path.join(staging, "config.json"))
        processor.to_json_file(os.path.join(staging, "preprocessor_config.json"))
        _write_metadata(staging, metadata)
        if verify:
            metadata["verification"] = verify_export(model, staging, tolerance).__dict__
            _write_metadata(staging, metadata)
    return metadata


def _write_metadata(folder: str, metadata: dict[str, Any]) -> None:
    with open(os.path.join(folder, EXPORT_FILE), "w", encoding="utf-8") as stream:
        json.dump(metadata, stream, indent=2)
        stream.write("\n")


__all__ = [
    "DEFAULT_TOLERANCE",
    "ExportParityError",
    "Verification",
    "convert_to_openvino",
    "eager_float32_mask_flips",
    "export_model",
    "export_onnx",
    "verify_export",
]
