"""The exported computation: pixel values in, image scores and anomaly maps out, text features as constants.

`CraneExportGraph` wraps a `CraneForAnomalyDetection` in eval mode. Its forward is the model's own inference code
(`encode_image`, then `forward_from_features`) with the text features of the two static prompts computed once at
construction and held as a buffer, so the exported file holds neither the text tower nor the prompts: the text
features are constant at inference (spec section 4: the prompts are fixed after training).

Two things differ from an eager call only while a graph is traced for export, both with the same values up to the
last bits: the few image-by-image loops (`reproducibility.per_sample`) become one batched call, so the graph keeps
a dynamic batch size; and the Gaussian smoothing convolves the rows as a batch instead of as groups. The input
check of `forward` (shape, NaN) is the runner's job (`ExportedCraneModel`), before the graph is run.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.crane.gaussian_smoothing import gaussian_smooth
from ..models.crane.modeling_crane import CraneForAnomalyDetection
from .folder import INPUT_NAME, OUTPUT_NAMES


class CraneExportGraph(nn.Module):
    """Pixels to scores and maps, for `torch.onnx.export`.

    Args:
        model: a float32 `CraneForAnomalyDetection` in eval mode (its weights are shared, not copied).
        smoothing_sigma: when set (> 0), also return the maps smoothed with this Gaussian sigma in pixels
            (`gaussian_smooth`, scipy's rule); `None` or 0 returns the unsmoothed maps only.

    Forward: `pixel_values` float32 [B, 3, S, S] (`CraneImageProcessor` output) ->
        `anomaly_scores` float32 [B] in [0, 1], `anomaly_maps` float32 [B, S, S] in [0, 1] (unsmoothed) and, with
        `smoothing_sigma`, `smoothed_anomaly_maps` float32 [B, S, S].

    Raises:
        ValueError: the model is in training mode or not float32.
    """

    def __init__(self, model: CraneForAnomalyDetection, smoothing_sigma: float | None = None):
        super().__init__()
        if model.training:
            raise ValueError("Export a model in eval mode (model.eval()): training draws context conditioning.")
        dtypes = {parameter.dtype for parameter in model.parameters()}
        if dtypes != {torch.float32}:
            names = ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in dtypes))
            raise ValueError(f"Export needs a float32 model; this one has {names} weights (load it with float32).")
        if smoothing_sigma is not None and smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma={smoothing_sigma} must be >= 0.")
        self.model = model
        self.smoothing_sigma = float(smoothing_sigma or 0.0)
        with torch.no_grad():
            text_embeds = model.static_text_embeds().detach().clone()
        self.register_buffer("text_embeds", text_embeds, persistent=False)
        self.eval()

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES if self.smoothing_sigma else OUTPUT_NAMES[:2]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        image_embeds, patch_features, grid = model.encode_image(pixel_values)
        output = model.forward_from_features(
            image_embeds, patch_features, grid, tuple(pixel_values.shape[-2:]), text_embeds=self.text_embeds
        )
        if not self.smoothing_sigma:
            return output.anomaly_scores, output.anomaly_maps
        return output.anomaly_scores, output.anomaly_maps, gaussian_smooth(output.anomaly_maps, self.smoothing_sigma)


__all__ = ["INPUT_NAME", "OUTPUT_NAMES", "CraneExportGraph"]
