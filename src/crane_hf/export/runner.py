"""Run an exported Crane folder with ONNX Runtime or OpenVINO, with the pipeline's pre- and post-processing.

`ExportedCraneModel` has the part of a model's interface that `ZeroShotAnomalyDetectionPipeline` and
`crane-hf predict` use (`config`, `device`, `dtype`, `to`, `eval`, and a call on `pixel_values` returning
`anomaly_scores` and `anomaly_maps`), so the pipeline runs it unchanged: the same `CraneImageProcessor`
preprocessing, the same smoothing and resizing of the maps, the same thresholds from the folder's `config.json`.

    from crane_hf.export import load_exported_detector

    detector = load_exported_detector("exported/")   # the "zero-shot-anomaly-detection" pipeline
    detector("part.png")                             # {"score": ..., "is_anomalous": ..., "anomaly_map": ...}

`ExportedCraneModel.run` takes and returns numpy arrays only (the graph itself needs no PyTorch). A Crane+ OpenVINO
folder holds two graphs (`folder.py`): `run` computes the D-Attn weights between them in float64
(`d_attention.dino_similarity_attention_float64`, with PyTorch on the CPU), as the ONNX graph does inside itself.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np
import torch

from ..models.crane.configuration_crane import CraneConfig, _as_int
from ..models.crane.d_attention import dino_similarity_attention_float64
from ..models.crane.image_processing_crane import CraneImageProcessor
from ..models.crane.modeling_crane import CraneAnomalyDetectionOutput
from .folder import (
    DATTN_WEIGHTS_NAME,
    DINO_TOKENS_NAME,
    EXPORT_FILE,
    INPUT_NAME,
    OUTPUT_NAMES,
    check_graph_files,
    check_json_files,
    read_export_metadata,
)
from .packages import require

BACKENDS = ("onnxruntime", "openvino")
# The config fields the pipeline reads after the graph (decisions, smoothing): the only ones an override may change.
POST_PROCESSING_FIELDS = ("image_threshold", "pixel_threshold", "smoothing_sigma")


def check_cpu_device(device: Any, folder: str | os.PathLike = "an exported folder") -> None:
    """Raise `ValueError` unless `device` is None, "auto" or a CPU device: the runtimes here run on the CPU."""
    if device in (None, "auto") or isinstance(device, torch.dtype):
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a device name ({error}).") from error
    if kind != "cpu":
        raise ValueError(
            f"{os.fspath(folder)} runs on the CPU (ONNX Runtime / OpenVINO); device {device!r} is not available "
            "for an exported folder: use cpu or auto."
        )


class ExportedCraneModel:
    """An exported graph (`crane_hf.export.export_model`) loaded into ONNX Runtime or OpenVINO, on the CPU.

    Args:
        folder: the exported folder (`crane_export.json`, the graph files, `config.json`,
            `preprocessor_config.json`), read as untrusted (`folder.py`).
        backend: "onnxruntime" or "openvino"; default the export's own runtime (a Crane ONNX file also runs on
            OpenVINO, not a Crane+ one: its float64 D-Attn mask; an OpenVINO IR only on OpenVINO).
        num_threads: threads of the runtime; default the runtime's (all cores).

    Raises:
        FileNotFoundError / ValueError: the folder is not a complete, consistent exported folder, or a file it
            names leaves the folder (the message names the file and field), or the runtime cannot load its
            graph or weights (a truncated file: the message names the graph file).
        ImportError: the runtime (or onnx, for the check of an ONNX file) is not installed.
    """

    main_input_name = INPUT_NAME

    def __init__(self, folder: str | os.PathLike, backend: str | None = None, num_threads: int | None = None):
        self.folder = os.fspath(folder)
        self.metadata = read_export_metadata(self.folder)
        fmt = self.metadata["format"]
        self.backend = backend or ("onnxruntime" if fmt == "onnx" else "openvino")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}.")
        if self.backend == "onnxruntime" and fmt != "onnx":
            raise ValueError(f"{self.folder} holds an OpenVINO IR, which only the openvino backend runs.")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}.")
        self.image_size = int(self.metadata["image_size"])
        self.output_names = tuple(self.metadata["outputs"])
        check_json_files(self.folder)
        self.config = CraneConfig.from_pretrained(self.folder)
        if self.config.image_size != self.image_size:
            raise ValueError(
                f"{self.folder}/config.json: image_size {self.config.image_size!r} differs from the graph's "
                f"{self.image_size} ({EXPORT_FILE}); the folder is not as export_model wrote it."
            )
        self._check_computation()
        if self.backend == "openvino" and fmt == "onnx" and self.config.use_dattn:
            raise ValueError(
                f"{self.folder} is a Crane+ ONNX graph deciding D-Attn's mask in float64, which OpenVINO's CPU plugin "
                "computes in float32 (docs/export.md): run it with onnxruntime, or export the model with --format "
                "openvino (two graphs, the mask decided in float64 between them)."
            )
        self.config._name_or_path = self.folder
        # D-Attn's weights computed here between a DINOv2 graph and the main graph (OpenVINO has no float64)
        self.dattn_weights_outside = "dino_graph_file" in self.metadata
        if self.dattn_weights_outside and not self.config.use_dattn:
            raise ValueError(
                f"{self.folder}/{EXPORT_FILE} names a DINOv2 graph ({self.metadata['dino_graph_file']}), but "
                f"config.json is a {self.config.variant} model without D-Attn; the folder is not as export_model "
                "wrote it."
            )
        size = self.image_size
        # The shape of each port ([None] = the dynamic batch): a graph exported at another image size, or a DINOv2
        # graph of another model, is refused when it is loaded, not image by image
        self._shapes: dict[str, list[int | None]] = {
            INPUT_NAME: [None, 3, size, size],
            OUTPUT_NAMES[0]: [None],
            **{name: [None, size, size] for name in OUTPUT_NAMES[1:]},
        }
        self._dino = None
        if self.dattn_weights_outside:
            dino = self.config.dino_config
            cells = (size // _as_int(dino.patch_size)) ** 2
            self._shapes[DATTN_WEIGHTS_NAME] = [None, cells, cells]
            self._shapes[DINO_TOKENS_NAME] = [None, cells, int(dino.hidden_size)]
            dino_path = check_graph_files(self.folder, self.metadata, "dino_graph_file")
            self._dino = self._open(dino_path, num_threads, (INPUT_NAME,), (DINO_TOKENS_NAME,))
        inputs = (INPUT_NAME, DATTN_WEIGHTS_NAME) if self.dattn_weights_outside else (INPUT_NAME,)
        graph_path = check_graph_files(self.folder, self.metadata)
        self._session = self._open(graph_path, num_threads, inputs, self.output_names)

    def _open(self, path: str, num_threads: int | None, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Any:
        """`_load`, with a runtime's own error while loading as one `ValueError` naming the file, and the returned
        function's own errors (a graph whose computation fails on the shapes it is given) as one too."""
        try:
            run = self._load(path, num_threads, inputs, outputs)
        except ValueError:
            raise
        except Exception as error:  # the runtimes' own types (onnxruntime's Fail, OpenVINO's RuntimeError, ...)
            raise ValueError(
                f"{path} could not be loaded by {self.backend} (a damaged or truncated file, or not as "
                f"export_model wrote it): {' '.join(str(error).split())}"
            ) from error

        def checked(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            try:
                results = run(feed)
            except Exception as error:  # the runtimes' own types, as above
                raise ValueError(
                    f"{path} failed in {self.backend} on inputs of shapes "
                    f"{ {name: list(value.shape) for name, value in feed.items()} } (not as export_model wrote it): "
                    f"{' '.join(str(error).split())[:500]}"
                ) from error
            batch = next(iter(feed.values())).shape[0]
            for name, value in results.items():
                expected = [batch if dim is None else dim for dim in self._shapes[name]]
                if list(value.shape) != expected:
                    raise ValueError(
                        f"{path} returned {name} of shape {list(value.shape)}, not {expected}; the graph is not "
                        f"the one {EXPORT_FILE} describes."
                    )
            return results

        return checked

    def _check_shapes(self, path: str, ports: dict[str, list[int | None] | None]) -> None:
        """Each port's static dimensions (None: dynamic; a port of unknown rank: None) must be `self._shapes`'."""
        for name, dims in ports.items():
            expected = self._shapes.get(name)
            if dims is None or expected is None:
                continue
            if len(dims) != len(expected) or any(
                have is not None and want is not None and have != want for have, want in zip(dims, expected)
            ):
                shown = ["batch" if dim is None else dim for dim in expected]
                raise ValueError(
                    f"{path}: {name} has shape {['?' if dim is None else dim for dim in dims]}, not {shown} as "
                    f"{EXPORT_FILE} and config.json imply (a graph exported at another image size, or of another "
                    "model)."
                )

    def _check_computation(self) -> None:
        """config.json's inference fields must be those the graph was exported with (`computation` of
        `crane_export.json`; absent in older exports): the records and the overrides are compared with config.json,
        so an edited field would describe what the graph does not compute. Thresholds and sigma may change."""
        for name, value in (self.metadata.get("computation") or {}).items():
            if name in POST_PROCESSING_FIELDS:
                continue
            actual = json.loads(json.dumps(getattr(self.config, name, None), default=str))
            if actual != value:
                raise ValueError(
                    f"{self.folder}/config.json: {name} {actual!r} differs from the graph's {value!r} "
                    f"({EXPORT_FILE}); the computation of an exported graph is fixed: export the model again to "
                    "change it."
                )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs: Any) -> ExportedCraneModel:
        """Same as the constructor (for symmetry with `CraneForAnomalyDetection.from_pretrained`)."""
        return cls(folder, **kwargs)

    @staticmethod
    def _check_ports(
        path: str,
        inputs: list[set[str]],
        outputs: list[set[str]],
        expected_inputs: tuple[str, ...],
        expected_outputs: tuple[str, ...],
    ) -> None:
        """A graph's own input and output names (a set of names per port) must be those `crane_export.json`
        implies: exactly `expected_inputs`, and at least `expected_outputs`."""
        takes_expected = len(inputs) == len(expected_inputs) and all(
            any(name in port for port in inputs) for name in expected_inputs
        )
        if not takes_expected or not set(expected_outputs) <= set().union(*outputs):
            raise ValueError(
                f"{path}: the graph takes {[sorted(n) for n in inputs]} and returns {[sorted(n) for n in outputs]}, "
                f"not {list(expected_inputs)} -> {list(expected_outputs)} as {EXPORT_FILE} says."
            )

    def _load(self, path: str, num_threads: int | None, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Any:
        """A function from a dict of the graph's `inputs` (numpy) to a dict of its `outputs` (numpy)."""
        names = list(outputs)
        if self.backend == "onnxruntime":
            require("onnxruntime", "Running an ONNX export")
            import onnxruntime

            options = onnxruntime.SessionOptions()
            if num_threads:
                options.intra_op_num_threads = num_threads
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            ports = ([{p.name} for p in session.get_inputs()], [{p.name} for p in session.get_outputs()])
            self._check_ports(path, *ports, inputs, outputs)
            self._check_shapes(
                path,
                {
                    p.name: None if p.shape is None else [d if isinstance(d, int) else None for d in p.shape]
                    for p in [*session.get_inputs(), *session.get_outputs()]
                },
            )
            return lambda feed: dict(zip(names, session.run(names, feed)))
        require("openvino", "Running an OpenVINO export")

        # float32 arithmetic: on CPUs with bf16 support OpenVINO would otherwise default to bf16.
        properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if num_threads:
            properties["INFERENCE_NUM_THREADS"] = num_threads
        compiled = _openvino_core().compile_model(path, "CPU", properties)
        ports = ([p.get_names() for p in compiled.inputs], [p.get_names() for p in compiled.outputs])
        self._check_ports(path, *ports, inputs, outputs)

        def dims(port: Any) -> list[int | None] | None:
            shape = port.get_partial_shape()
            if shape.rank.is_dynamic:
                return None
            return [d.get_length() if d.is_static else None for d in shape]

        self._check_shapes(
            path,
            {name: dims(port) for port in [*compiled.inputs, *compiled.outputs] for name in port.get_names()},
        )
        output_ports = {name: compiled.output(name) for name in names}
        request = compiled.create_infer_request()

        def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            results = request.infer(feed)
            return {name: np.array(results[port], copy=True) for name, port in output_ports.items()}

        return run

    def apply_config_overrides(self, overrides: dict[str, Any]) -> None:
        """Set `CraneConfig` fields the pipeline reads after the graph (thresholds, smoothing sigma); any other
        field is computed inside the graph, so a different value is refused (`ValueError`, naming the field)."""
        for key, value in overrides.items():
            if key in POST_PROCESSING_FIELDS:
                setattr(self.config, key, value)
            elif getattr(self.config, key, None) != value:
                raise ValueError(
                    f"{self.folder} is an exported graph computed with {key}={getattr(self.config, key, None)!r}; "
                    f"{key}={value!r} cannot be applied to it (export the model again with it)."
                )

    # ------------------------------------------------------------------ the model interface of the pipeline
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def to(self, device: Any = None, *args: Any, **kwargs: Any) -> ExportedCraneModel:
        """A no-op for the CPU; the runtimes here run on the CPU only (other devices raise `ValueError`)."""
        check_cpu_device(device, self.folder)
        return self

    def eval(self) -> ExportedCraneModel:
        return self

    def image_processor(self) -> CraneImageProcessor:
        """The processor saved beside the graph (its image size is the export's).

        Raises:
            OSError: the folder has no readable `preprocessor_config.json`.
            ValueError: its image size is not the graph's.
        """
        processor = CraneImageProcessor.from_pretrained(self.folder)
        if processor.image_size != self.image_size:
            raise ValueError(
                f"{self.folder}/preprocessor_config.json: image_size {processor.image_size!r} differs from the "
                f"graph's {self.image_size} ({EXPORT_FILE}); the folder is not as export_model wrote it."
            )
        return processor

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on `pixel_values` [B, 3, S, S] (float, S the export's image size).

        Returns a dict of float32 arrays: `anomaly_scores` [B], `anomaly_maps` [B, S, S] (unsmoothed) and, when
        exported with smoothed maps, `smoothed_anomaly_maps` [B, S, S].

        Raises:
            ValueError: wrong shape or dtype, NaN or infinite inputs, or non-finite outputs.
        """
        pixels = np.asarray(pixel_values)
        size = self.image_size
        if pixels.ndim != 4 or pixels.shape[0] < 1 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must have shape [batch, 3, {size}, {size}] (the exported image size), got "
                f"{list(pixels.shape)}; use the folder's CraneImageProcessor to prepare images."
            )
        if not np.issubdtype(pixels.dtype, np.floating):
            raise TypeError(f"pixel_values must be floating point, got {pixels.dtype}.")
        with np.errstate(over="ignore"):  # float64 beyond float32's range: infinite, refused below
            pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if not np.isfinite(pixels).all():
            raise ValueError("pixel_values contains NaN or infinite values (in float32, the graph's input type).")
        feed = {INPUT_NAME: pixels}
        if self._dino is not None:
            tokens = self._dino(feed)[DINO_TOKENS_NAME]
            if not np.isfinite(tokens).all():
                raise ValueError(f"The exported DINOv2 graph ({self.backend}) returned non-finite patch tokens.")
            weights = dino_similarity_attention_float64(
                torch.from_numpy(tokens), self.config.dattn_beta, self.config.dattn_gamma
            )
            feed[DATTN_WEIGHTS_NAME] = np.ascontiguousarray(weights.numpy(), dtype=np.float32)
        outputs = self._session(feed)
        for name, value in outputs.items():
            if not np.isfinite(value).all():
                raise ValueError(f"The exported graph ({self.backend}) returned non-finite values in {name}.")
        return outputs

    def __call__(self, pixel_values: torch.Tensor | np.ndarray, **kwargs: Any) -> CraneAnomalyDetectionOutput:
        """`run` on a tensor, returned as the model's output type (`anomaly_scores` [B], `anomaly_maps` [B, S, S])."""
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().cpu().float().numpy()
        outputs = self.run(pixel_values)
        return CraneAnomalyDetectionOutput(
            anomaly_scores=torch.from_numpy(outputs["anomaly_scores"]),
            anomaly_maps=torch.from_numpy(outputs["anomaly_maps"]),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.folder!r}, backend={self.backend!r}, image_size={self.image_size})"


@functools.cache
def _openvino_core() -> Any:
    """One `openvino.Core` for the process, shared by every graph the runners load (OpenVINO's advice: several
    Cores in one process, as a two-graph Crane+ folder made, crashed the process beside ONNX Runtime)."""
    import openvino

    return openvino.Core()


def load_exported_detector(folder: str | os.PathLike, backend: str | None = None, num_threads: int | None = None):
    """The "zero-shot-anomaly-detection" pipeline around an exported folder (its graph, processor and config)."""
    from ..models.crane.pipeline_zero_shot_anomaly_detection import ZeroShotAnomalyDetectionPipeline

    model = ExportedCraneModel(folder, backend=backend, num_threads=num_threads)
    return ZeroShotAnomalyDetectionPipeline(model=model, image_processor=model.image_processor(), device=model.device)


__all__ = ["BACKENDS", "ExportedCraneModel", "load_exported_detector"]
