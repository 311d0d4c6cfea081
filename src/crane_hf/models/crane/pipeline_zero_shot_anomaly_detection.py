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
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import Pipeline

from .image_processing_crane import image_to_rgb_array
from .image_reading import read_encoded_image, read_image, read_image_bytes, read_image_url
from .thresholds import at_or_above, check_threshold
from .visualization import render_overlay


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


def _as_uint8(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 for display, from the processor's uint8 or [0, 1] float arrays."""
    return rgb if rgb.dtype == np.uint8 else (rgb * 255.0 + 0.5).astype(np.uint8)


class ZeroShotAnomalyDetectionPipeline(Pipeline):
    """Anomaly detection with a Crane model.

    Call parameters:
        threshold (`float`): image-score decision threshold; default `model.config.image_threshold`.
        pixel_threshold (`float`): threshold of the overlay contour; default `model.config.pixel_threshold`.
        smoothing_sigma (`float`): Gaussian sigma of the returned maps; default `model.config.smoothing_sigma`.
        return_overlay (`bool`): also return `overlay`, a PIL heatmap blended on the image with the contour.
        timeout (`float`): seconds to wait for URLs (default 10; bodies over 64 MiB and decompression bombs are
            refused, as for files: `image_reading.read_image_url`).

    Returns per image a dict with `score` (float in [0, 1]), `is_anomalous` (bool), `anomaly_map` (float32 numpy
    array at the image's original size, smoothed) and, on request, `overlay`.

    Raises `ValueError` before any image is read when a decision would use a model threshold calibrated under
    another computation than the model's (`CraneConfig.check_thresholds`): recalibrate, or pass `threshold` (and,
    with overlays, `pixel_threshold`).
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_video_processor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        smoothing_sigma: float | None = None,
        return_overlay: bool | None = None,
        timeout: float | None = None,
    ) -> tuple[dict, dict, dict]:
        preprocess: dict[str, Any] = {}
        forward: dict[str, Any] = {}
        postprocess: dict[str, Any] = {}
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
        self._check_thresholds(kwargs)
        return super().__call__(inputs, **kwargs)

    def _check_thresholds(self, kwargs: dict[str, Any]) -> None:
        """Refuse, before any image is read, to decide with the model's thresholds when they were calibrated under
        another computation than the model's (`CraneConfig.check_thresholds`; a threshold given to the call or to
        the pipeline is used instead and needs no check)."""
        check = getattr(self.model.config, "check_thresholds", None)
        if check is None:
            return
        params = {**self._forward_params, **self._postprocess_params, **kwargs}
        image = params.get("threshold") is None
        pixel = bool(params.get("return_overlay")) and params.get("pixel_threshold") is None
        check(image=image, pixel=pixel, smoothing_sigma=params.get("smoothing_sigma"))

    def preprocess(self, image: Any, timeout: float | None = None, keep_image: bool = False) -> dict[str, Any]:
        if isinstance(image, dict) and ("bytes" in image or "path" in image):  # an undecoded `datasets` Image
            image = read_encoded_image(image)
        elif isinstance(image, (bytes, bytearray)):  # an encoded image file held in memory
            image = read_image_bytes(bytes(image), "image bytes")
        source = image if isinstance(image, str) else None
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            # Downloaded with a timeout and a byte limit, decoded as files are (multi-frame refused, EXIF
            # orientation, 16-bit kept, bomb guard): the same picture gives the same map by URL and by path.
            image = read_image_url(image, timeout=timeout)
        elif isinstance(image, str):
            image = read_image(image)
        try:
            rgb = image_to_rgb_array(image)
        except ValueError as error:
            raise ValueError(f"{source}: {error}" if source else str(error)) from error
        inputs = self.image_processor(rgb, return_tensors="pt")
        model_inputs = {
            "pixel_values": inputs["pixel_values"].to(self.dtype or torch.float32),
            "original_size": inputs["original_sizes"],
        }
        if keep_image:
            model_inputs["image"] = _as_uint8(rgb)
        return model_inputs

    def _forward(self, model_inputs: dict[str, Any], smoothing_sigma: float | None = None) -> dict[str, Any]:
        """Model, then smoothing and resizing of the whole batch on the model's device."""
        outputs = self.model(model_inputs["pixel_values"])
        sigma = self.model.config.smoothing_sigma if smoothing_sigma is None else smoothing_sigma
        maps = self.image_processor.post_process_anomaly_maps(
            outputs.anomaly_maps, sigma=sigma, target_sizes=model_inputs["original_size"].reshape(-1, 2)
        )
        result = {"score": outputs.anomaly_scores, "anomaly_map": maps}
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
        anomaly_map = model_outputs["anomaly_map"]
        if isinstance(anomaly_map, list):  # batch_size 1: the forward's list of one map
            (anomaly_map,) = anomaly_map
        height, width = anomaly_map.shape[-2:]
        anomaly_map = anomaly_map.reshape(height, width).numpy().astype(np.float32, copy=False)
        score = float(model_outputs["score"].reshape(-1)[0])
        if not np.isfinite(score) or not np.isfinite(anomaly_map).all():
            raise ValueError(
                f"the model gave a non-finite {'score' if not np.isfinite(score) else 'anomaly map'} (score {score}) "
                "for this image; no decision is made (is the model folder corrupt or diverged?)"
            )
        result: dict[str, Any] = {
            "score": score,
            "is_anomalous": at_or_above(score, threshold),
            "anomaly_map": anomaly_map,
        }
        if return_overlay:
            image = np.asarray(model_outputs["image"]).reshape(height, width, 3)
            result["overlay"] = render_overlay(image, anomaly_map, threshold=pixel_threshold)
        return result
