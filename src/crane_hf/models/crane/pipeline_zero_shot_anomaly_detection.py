"""`pipeline("zero-shot-anomaly-detection")`: a score, a yes/no and a heatmap per image.

    from transformers import pipeline
    import crane_hf  # registers the task (or load a published folder with trust_remote_code=True)

    detector = pipeline("zero-shot-anomaly-detection", model="path/or/hub-id")
    result = detector("part.png")
    result["score"], result["is_anomalous"], result["anomaly_map"]   # float, bool, float32 [H, W]

Inputs: PIL images, local paths, URLs, encoded image bytes, numpy arrays, torch tensors, lists of these, and
`datasets` columns or datasets with an "image" column (streamed lazily, like transformers' KeyDataset). The EXIF
orientation is applied whichever way an image arrives; multi-frame images are refused.

A score or map that is not finite (a corrupt or diverged model) raises `ValueError` for that image: it is never
reported as `is_anomalous: False`.

Few-shot: with a handful of images of good parts, pass them as `reference_images=[...]` (paths, PIL images, arrays;
to `pipeline(...)` or to a call) or a saved memory as `reference_memory=` (a `ReferenceMemory` or its .safetensors
file); a model folder holding `reference_memory.safetensors` uses its memory by default. Then `score`,
`is_anomalous` and `anomaly_map` are the fused ones (`reference_memory.py`: (1 - w) zero-shot + w few-shot,
w = `config.few_shot_fusion_weight`), and `zero_shot_score`, `few_shot_score`, `zero_shot_map` and `few_shot_map`
are returned too.

    detector = pipeline("zero-shot-anomaly-detection", model="path", reference_images=["good1.png", "good2.png"])
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from transformers import Pipeline

from .configuration_crane import threshold_context
from .image_processing_crane import image_to_rgb_array
from .image_reading import read_encoded_image, read_image, read_image_bytes, read_image_url
from .reference_memory import ReferenceMemory, array_fingerprint, file_fingerprint
from .thresholds import at_or_above, check_threshold
from .visualization import render_overlay

PIPELINE_TASK = "zero-shot-anomaly-detection"


class _SequenceDataset(torch.utils.data.Dataset):
    """A `datasets` column (or dataset with an "image" column) seen as a torch Dataset, so the pipeline streams.

    A `datasets.Image` column is read undecoded and decoded here as image files are (`read_encoded_image`: the
    decompression-bomb guard, named errors); an image that cannot be decoded raises a `ValueError` naming the row,
    its `image_path` when the dataset has that column, and the problem.
    """

    def __init__(self, items: Any):
        # `datasets` is not imported here (remote code may import only what transformers needs, and transformers'
        # import check reads every import of this file): an object of `datasets` exists only where `datasets` is
        # already imported, so its classes are taken from `sys.modules`.
        datasets = sys.modules.get("datasets")
        dataset, column = (
            (items, "image") if hasattr(items, "column_names") else (getattr(items, "source", None), None)
        )
        column = column or getattr(items, "column_name", None)
        self.paths = None
        self.encoded = (
            datasets is not None
            and isinstance(dataset, datasets.Dataset)
            and isinstance(dataset.features.get(column), datasets.Image)
            and dataset.format["type"] is None
        )
        if self.encoded:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
            self.items = dataset[column]
            self.paths = dataset["image_path"] if "image_path" in dataset.column_names else None
        else:
            self.items = items["image"] if hasattr(items, "column_names") else items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        from PIL import Image

        try:
            item = self.items[index]
            return read_encoded_image(item) if self.encoded and item is not None else item
        except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as error:
            path = f" (image_path {self.paths[index]!r})" if self.paths is not None else ""
            raise ValueError(f"dataset row {index}{path}: {error}") from error


def _is_datasets_input(inputs: Any) -> bool:
    from_datasets = type(inputs).__module__.startswith("datasets.")
    return (from_datasets and isinstance(inputs, Sequence)) or hasattr(inputs, "column_names")


SCORE_KEYS = ("score", "zero_shot_score", "few_shot_score")
MAP_KEYS = ("anomaly_map", "zero_shot_map", "few_shot_map")


def _refuse_reference_image(memory: ReferenceMemory, image: Any, file: str | None, encoded: bytes | None) -> None:
    """Raise `ValueError` if the image to score is one of `memory`'s reference images: the same file (resolved
    path), the same file or encoded bytes (sha256), or the same RGB pixels (sha256): the fingerprints
    `build_reference_memory` records, and those of its decoded pixels (a re-encoded copy). Compared with itself it
    would score as normal, a silent pass."""
    known = memory.known_fingerprints
    same = file is not None and (
        os.path.realpath(file) in {os.path.realpath(name) for name in getattr(memory, "image_paths", ())}
        or file_fingerprint(file) in known
    )
    if encoded is not None:  # as a file's bytes, and as `build_reference_memory` fingerprints bytes
        same = same or f"sha256:{hashlib.sha256(encoded).hexdigest()}" in known
        same = same or array_fingerprint(np.frombuffer(encoded, dtype=np.uint8)) in known
    if same or array_fingerprint(image_to_rgb_array(image)) in known or pixel_fingerprint(image) in known:
        name = file or "an input image"
        raise ValueError(
            f"{name} is one of the few-shot memory's reference images (the same file, bytes or pixels): compared "
            "with itself it scores as normal. Leave it out of the images to score (or out of the reference images)."
        )


def pixel_fingerprint(image: Any) -> str:
    """ "sha256:<hex>" of a decoded image's RGB pixels (`image_to_rgb_array`) at 8 bits: 16-bit and float pixels
    are rounded to uint8 first. The same for the same picture whatever file bytes, PIL mode or bit depth held it (a
    16-bit copy of an 8-bit image, its float array), so a copy of a reference image is known by it
    (`ReferenceMemory.pixel_fingerprints`); pictures that differ by less than half an 8-bit step everywhere give the
    model the same input to within that step, and compare with each other as with themselves."""
    rgb = image_to_rgb_array(image)
    if rgb.dtype != np.uint8:  # float32 in [0, 1]
        rgb = np.rint(rgb.astype(np.float64) * 255.0).astype(np.uint8)
    return array_fingerprint(rgb)


def _is_local_path(image: Any) -> bool:
    """Whether `image` names a local file (a path, not a URL)."""
    return isinstance(image, (str, os.PathLike)) and not str(image).startswith(("http://", "https://"))


def _one_map(anomaly_map: Any) -> np.ndarray:
    """A float32 [H, W] numpy map from the forward's map of one image (a list of one map at batch size 1)."""
    if isinstance(anomaly_map, list):
        (anomaly_map,) = anomaly_map
    height, width = anomaly_map.shape[-2:]
    return anomaly_map.reshape(height, width).numpy().astype(np.float32, copy=False)


def _as_uint8(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 for display, from the processor's uint8 or [0, 1] float arrays."""
    return rgb if rgb.dtype == np.uint8 else (rgb * 255.0 + 0.5).astype(np.uint8)


def model_inputs_for_image(
    image_processor: Any, image: Any, dtype: torch.dtype | None, keep_image: bool = False, source: str | None = None
) -> dict[str, Any]:
    """What `ZeroShotAnomalyDetectionPipeline.preprocess` gives for a decoded image (PIL image or array): a dict
    with `pixel_values` (float [1, 3, S, S] in `dtype`, default float32), `original_size` (int64 [1, 2]: height,
    width) and, with `keep_image`, `image` (uint8 RGB [H, W, 3], for overlays). A module-level function so that
    batch commands can run it in DataLoader worker processes. Raises `ValueError` (prefixed with `source`, a file
    name or URL, where given) for images that cannot be converted to RGB (e.g. NaN values)."""
    try:
        rgb = image_to_rgb_array(image)
    except ValueError as error:
        raise ValueError(f"{source}: {error}" if source else str(error)) from error
    inputs = image_processor(rgb, return_tensors="pt")
    model_inputs = {
        "pixel_values": inputs["pixel_values"].to(dtype or torch.float32),
        "original_size": inputs["original_sizes"],
    }
    if keep_image:
        model_inputs["image"] = _as_uint8(rgb)
    return model_inputs


class ZeroShotAnomalyDetectionPipeline(Pipeline):
    """Anomaly detection with a Crane model.

    Call parameters:
        threshold (`float`): image-score decision threshold; default `model.config.image_threshold`.
        pixel_threshold (`float`): threshold of the overlay contour; default `model.config.pixel_threshold`.
        smoothing_sigma (`float`): Gaussian sigma of the returned maps; default `model.config.smoothing_sigma`.
        return_overlay (`bool`): also return `overlay`, a PIL heatmap blended on the image with the contour.
        timeout (`float`): seconds to wait for URLs (default 10; bodies over 64 MiB and decompression bombs are
            refused, as for files: `image_reading.read_image_url`).
        reference_images (`list`): few-shot: normal images of the class (paths, PIL images, arrays, encoded bytes);
            their memory bank is built once (`build_reference_memory`) and kept while the same images are given.
        reference_memory (`ReferenceMemory`, `str` or `os.PathLike`): few-shot with a memory built before (or its
            .safetensors file), checked against the model (`CraneForAnomalyDetection.check_reference_memory`).

    Returns per image a dict with `score` (float in [0, 1]), `is_anomalous` (bool), `anomaly_map` (float32 numpy
    array at the image's original size, smoothed) and, on request, `overlay`. With a reference memory, `score`,
    `is_anomalous` and `anomaly_map` are the fused ones and `zero_shot_score`, `few_shot_score`, `zero_shot_map`
    and `few_shot_map` are added.

    Raises `ValueError` before any image is read when a decision would use a model threshold calibrated under
    another computation than the model's (`CraneConfig.check_thresholds`), or for another reference memory (or
    none: thresholds of zero-shot scores do not hold for fused ones): recalibrate, or pass `threshold` (and,
    with overlays, `pixel_threshold`).
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_video_processor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, task: str = PIPELINE_TASK, **kwargs: Any):
        super().__init__(*args, task=task or PIPELINE_TASK, **kwargs)

    def _sanitize_parameters(
        self,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        smoothing_sigma: float | None = None,
        return_overlay: bool | None = None,
        timeout: float | None = None,
        reference_images: Any = None,
        reference_memory: ReferenceMemory | str | os.PathLike | None = None,
        _memory_images: ReferenceMemory | None = None,
    ) -> tuple[dict, dict, dict]:
        preprocess: dict[str, Any] = {}
        forward: dict[str, Any] = {}
        postprocess: dict[str, Any] = {}
        if _memory_images is not None:  # set by __call__: the memory the call fuses with
            preprocess["memory_images"] = _memory_images
        if reference_images is not None and reference_memory is not None:
            raise ValueError("give reference_images or reference_memory, not both.")
        if reference_images is not None:
            forward["reference_memory"] = self.build_reference_memory(reference_images, timeout=timeout)
        elif reference_memory is not None:
            forward["reference_memory"] = self.load_reference_memory(reference_memory)
        if timeout is not None:
            preprocess["timeout"] = timeout
        if return_overlay is not None:
            preprocess["keep_image"] = bool(return_overlay)
            postprocess["return_overlay"] = bool(return_overlay)
        for name, value in (("threshold", threshold), ("pixel_threshold", pixel_threshold)):
            if value is not None:
                postprocess[name] = check_threshold(value, name)
        if smoothing_sigma is not None:
            if float(smoothing_sigma) < 0:
                raise ValueError(f"smoothing_sigma={smoothing_sigma} must be >= 0.")
            forward["smoothing_sigma"] = float(smoothing_sigma)
        return preprocess, forward, postprocess

    def build_reference_memory(
        self, images: Any, class_name: str | None = None, timeout: float | None = None, batch_size: int = 8
    ) -> ReferenceMemory:
        """The few-shot memory bank of normal `images` (one image or a list: paths, URLs, PIL images, arrays,
        encoded bytes), read and preprocessed as the images to score are, `batch_size` at a time.

        Each image's fingerprint is the sha256 of its file bytes (paths, bytes) or of its RGB pixel array. The memory
        of the last images given is kept, so that calls with the same reference images build it once.

        Raises:
            ValueError: no images, or an image that cannot be read (named).
        """
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("reference_images is empty: give at least one normal image.")
        fingerprints = [self._fingerprint(image) for image in images]
        cached = getattr(self, "_reference_cache", None)
        if cached is not None and cached[0] == (tuple(fingerprints), class_name):
            return cached[1]

        pixels: list[str] = []

        def batches() -> Iterator[torch.Tensor]:
            for start in range(0, len(images), batch_size):
                chunk = []
                for image in images[start : start + batch_size]:
                    decoded, _, _, source = self._decode(image, timeout)
                    pixels.append(pixel_fingerprint(decoded))
                    chunk.append(model_inputs_for_image(self.image_processor, decoded, self.dtype, False, source))
                yield torch.cat([inputs["pixel_values"] for inputs in chunk])

        memory = self.model.build_reference_memory(batches(), fingerprints, class_name=class_name)
        memory.image_paths = [os.fspath(image) for image in images if _is_local_path(image)]
        memory.pixel_fingerprints = pixels
        self._reference_cache = ((tuple(fingerprints), class_name), memory)
        return memory

    def load_reference_memory(self, memory: ReferenceMemory | str | os.PathLike) -> ReferenceMemory:
        """A memory object or .safetensors file, checked against this pipeline's model (`ValueError` naming it).

        A file is read and checked once, and again only when it changes: the memory of the last file is kept with
        the file's resolved path, inode, size and modification time (a call checks its thresholds and then runs,
        both with this memory)."""
        source = "the reference memory"
        key = None
        if isinstance(memory, (str, os.PathLike)):
            source = os.fspath(memory)
            if not os.path.isfile(source):
                raise ValueError(f"reference memory {source}: no such file.")
            status = os.stat(source)
            key = (os.path.realpath(source), status.st_ino, status.st_size, status.st_mtime_ns)
            cached = getattr(self, "_memory_file_cache", None)
            if cached is not None and cached[0] == key:
                return cached[1]
            memory = ReferenceMemory.load(source)
        if not isinstance(memory, ReferenceMemory):
            raise TypeError(f"reference_memory must be a ReferenceMemory or a file path, got {type(memory).__name__}.")
        self.model.check_reference_memory(memory, source)
        if key is not None:
            self._memory_file_cache = (key, memory)
        return memory

    @staticmethod
    def _fingerprint(image: Any) -> str:
        """sha256 of a local file's or encoded image's bytes, else of the image's RGB pixel array."""
        if _is_local_path(image):
            try:
                return file_fingerprint(image)
            except OSError as error:
                raise ValueError(f"{os.fspath(image)}: cannot be read ({error.strerror or error}).") from error
        if isinstance(image, (bytes, bytearray)):
            return array_fingerprint(np.frombuffer(bytes(image), dtype=np.uint8))
        if isinstance(image, str):  # a URL: the decoded pixels
            image = read_image_url(image)
        return array_fingerprint(image_to_rgb_array(image))

    def get_inference_context(self) -> type[torch.inference_mode]:
        """Inference runs under `torch.inference_mode` (transformers' default is `no_grad`)."""
        return torch.inference_mode

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """Score one image (returns a dict), a list of images (a list), or a dataset column (a lazy iterator)."""
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        elif _is_datasets_input(inputs):
            inputs = _SequenceDataset(inputs)
        if isinstance(inputs, list) and not inputs:
            return []
        memory = self._memory_in_use(kwargs)
        self._check_thresholds(kwargs, memory)
        if memory is not None:
            kwargs = {**kwargs, "_memory_images": memory}
        return super().__call__(inputs, **kwargs)

    def _check_thresholds(self, kwargs: dict[str, Any], memory: ReferenceMemory | None) -> None:
        """Refuse, before any image is read, to decide with the model's thresholds when they were calibrated under
        another computation than the model's (`CraneConfig.check_thresholds`; a threshold given to the call or to
        the pipeline is used instead and needs no check). Thresholds hold for the reference memory they were
        calibrated with (`memory`, the call's `_memory_in_use`): zero-shot thresholds are refused for fused scores,
        and the other way round."""
        check = getattr(self.model.config, "check_thresholds", None)
        if check is None:
            return
        params = {**self._forward_params, **self._postprocess_params, **kwargs}
        image = params.get("threshold") is None
        pixel = bool(params.get("return_overlay")) and params.get("pixel_threshold") is None
        if not (image or pixel):
            return
        context = threshold_context(self.model, memory)
        check(image=image, pixel=pixel, smoothing_sigma=params.get("smoothing_sigma"), **context)

    def _memory_in_use(self, kwargs: dict[str, Any]) -> ReferenceMemory | None:
        """The reference memory a call with `kwargs` fuses its scores with: the call's, else the pipeline's, else
        the model's; None for zero-shot. A call's memory is built (or loaded and checked) here, once: the pipeline
        keeps the memory of the last reference images (`build_reference_memory`) and of the last memory file
        (`load_reference_memory`), which the call then uses."""
        if kwargs.get("reference_images") is not None or kwargs.get("reference_memory") is not None:
            names = ("reference_images", "reference_memory", "timeout")
            _, forward, _ = self._sanitize_parameters(**{name: kwargs[name] for name in names if name in kwargs})
            return forward.get("reference_memory")
        if self._forward_params.get("reference_memory") is not None:
            return self._forward_params["reference_memory"]
        return getattr(self.model, "reference_memory", None)

    def preprocess(
        self,
        image: Any,
        timeout: float | None = None,
        keep_image: bool = False,
        memory_images: ReferenceMemory | None = None,
    ) -> dict[str, Any]:
        """Read and preprocess one image. With `memory_images` (the few-shot memory in use), an image that is one of
        the memory's reference images is refused (`ValueError`): compared with itself it would score as normal."""
        image, file, encoded, source = self._decode(image, timeout)
        if memory_images is not None:
            _refuse_reference_image(memory_images, image, file, encoded)
        return model_inputs_for_image(self.image_processor, image, self.dtype, keep_image, source)

    @staticmethod
    def _decode(image: Any, timeout: float | None) -> tuple[Any, str | None, bytes | None, str | None]:
        """An input as (decoded image, the local file it was read from, the encoded bytes it was given as, the file
        or URL that names it in errors); a PIL image or array is returned as given."""
        encoded = file = None
        if isinstance(image, os.PathLike):  # a pathlib.Path is a file path, as a string is
            image = os.fspath(image)
        if isinstance(image, dict) and ("bytes" in image or "path" in image):  # an undecoded `datasets` Image
            encoded, file = image.get("bytes"), (None if image.get("bytes") else image.get("path"))
            image = read_encoded_image(image)
        elif isinstance(image, (bytes, bytearray)):  # an encoded image file held in memory
            encoded = bytes(image)
            image = read_image_bytes(encoded, "image bytes")
        source = image if isinstance(image, str) else None
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            # Downloaded with a timeout and a byte limit, decoded as files are (multi-frame refused, EXIF
            # orientation, 16-bit kept, bomb guard): the same picture gives the same map by URL and by path.
            image = read_image_url(image, timeout=timeout)
        elif isinstance(image, str):
            file = image
            image = read_image(image)
        return image, file, encoded, source

    def _forward(
        self,
        model_inputs: dict[str, Any],
        smoothing_sigma: float | None = None,
        reference_memory: ReferenceMemory | None = None,
    ) -> dict[str, Any]:
        """Model, then smoothing and resizing of the whole batch on the model's device."""
        outputs = self.model(model_inputs["pixel_values"], reference_memory=reference_memory)
        sigma = self.model.config.smoothing_sigma if smoothing_sigma is None else smoothing_sigma
        sizes = model_inputs["original_size"].reshape(-1, 2)

        def post_process(maps: torch.Tensor) -> Any:
            return self.image_processor.post_process_anomaly_maps(maps, sigma=sigma, target_sizes=sizes)

        if outputs.fused_maps is None:
            result = {"score": outputs.anomaly_scores, "anomaly_map": post_process(outputs.anomaly_maps)}
        else:  # few-shot: the decision is the fused one; both branches are returned too
            result = {
                "score": outputs.fused_scores,
                "anomaly_map": post_process(outputs.fused_maps),
                "zero_shot_score": outputs.anomaly_scores,
                "zero_shot_map": post_process(outputs.anomaly_maps),
                "few_shot_score": outputs.few_shot_scores,
                "few_shot_map": post_process(outputs.few_shot_maps),
            }
        if "image" in model_inputs:
            result["image"] = model_inputs["image"]
        return result

    def postprocess(
        self,
        model_outputs: dict[str, Any],
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        return_overlay: bool = False,
    ) -> dict[str, Any]:
        config = self.model.config
        threshold = config.image_threshold if threshold is None else threshold
        pixel_threshold = config.pixel_threshold if pixel_threshold is None else pixel_threshold
        maps = {name: _one_map(model_outputs[name]) for name in MAP_KEYS if name in model_outputs}
        scores = {name: float(model_outputs[name].reshape(-1)[0]) for name in SCORE_KEYS if name in model_outputs}
        for name, value in (*scores.items(), *maps.items()):
            if not np.isfinite(value).all():
                raise ValueError(
                    f"the model gave a non-finite {name.replace('_', ' ')} (score {scores['score']}) for this image; "
                    "no decision is made (is the model folder corrupt or diverged?)"
                )
        anomaly_map = maps["anomaly_map"]
        height, width = anomaly_map.shape
        score = scores["score"]
        result: dict[str, Any] = {
            "score": score,
            "is_anomalous": at_or_above(score, threshold),
            "anomaly_map": anomaly_map,
        }
        for name in ("zero_shot_score", "few_shot_score"):
            if name in scores:
                result[name] = scores[name]
        for name in ("zero_shot_map", "few_shot_map"):
            if name in maps:
                result[name] = maps[name]
        if return_overlay:
            image = np.asarray(model_outputs["image"]).reshape(height, width, 3)
            result["overlay"] = render_overlay(image, anomaly_map, threshold=pixel_threshold)
        return result


def custom_pipelines() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry of a saved folder's config.json: the task, this module's pipeline class and its
    model class, so that `pipeline(PIPELINE_TASK, model=folder, trust_remote_code=True)` runs the folder's copy of
    this file where crane_hf is not installed (transformers' `clean_custom_task` reads it)."""
    module = __name__.rsplit(".", 1)[-1]
    impl = f"{module}.{ZeroShotAnomalyDetectionPipeline.__name__}"
    return {PIPELINE_TASK: {"impl": impl, "pt": ["AutoModel"], "type": "image"}}
