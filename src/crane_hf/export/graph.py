"""The exported computation: pixel values in, image scores and anomaly maps out, text features as constants.

`CraneExportGraph` wraps a `CraneForAnomalyDetection` in eval mode. Its forward is the model's own inference code
(`encode_image`, then `forward_from_features`) with the text features of the two static prompts computed once at
construction and held as a buffer, so the exported file holds neither the text tower nor the prompts: the text
features are constant at inference (spec section 4: the prompts are fixed after training).

For Crane+ exported to OpenVINO the computation is two graphs (docs/export.md, "D-Attn's mask"): `DinoTokensGraph`
(pixel values to DINOv2 patch tokens) and `CraneExportGraph(..., dattn_weights_input=True)`, which takes the D-Attn
weights as a second input; the runner computes those weights between the two in float64
(`d_attention.dino_similarity_attention_float64`), which OpenVINO's CPU plugin cannot do inside a graph.

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
from .folder import DATTN_WEIGHTS_NAME, DINO_TOKENS_NAME, INPUT_NAME, OUTPUT_NAMES


class CraneExportGraph(nn.Module):
    """Pixels to scores and maps, for `torch.onnx.export`.

    Args:
        model: a float32 `CraneForAnomalyDetection` in eval mode (its weights are shared, not copied).
        smoothing_sigma: when set (> 0), also return the maps smoothed with this Gaussian sigma in pixels
            (`gaussian_smooth`, scipy's rule); `None` or 0 returns the unsmoothed maps only.
        dattn_weights_input: Crane+ only: take the D-Attn weights as a second input instead of running DINOv2
            (with `DinoTokensGraph` and the runner's float64 weights between them).

    Forward: `pixel_values` float32 [B, 3, S, S] (`CraneImageProcessor` output) and, with `dattn_weights_input`,
        `dattn_weights` float32 [B, M, M] (rows summing to 1, M = (S / 14)^2) ->
        `anomaly_scores` float32 [B] in [0, 1], `anomaly_maps` float32 [B, S, S] in [0, 1] (unsmoothed) and, with
        `smoothing_sigma`, `smoothed_anomaly_maps` float32 [B, S, S].

    Raises:
        ValueError: the model is in training mode or not float32, or `dattn_weights_input` without D-Attn.
    """

    def __init__(
        self,
        model: CraneForAnomalyDetection,
        smoothing_sigma: float | None = None,
        dattn_weights_input: bool = False,
    ):
        super().__init__()
        _check_exportable(model)
        if dattn_weights_input and not model.config.use_dattn:
            raise ValueError(f"dattn_weights_input needs D-Attn; this {model.config.variant} model has none.")
        if smoothing_sigma is not None and smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma={smoothing_sigma} must be >= 0.")
        self.model = model
        self.smoothing_sigma = float(smoothing_sigma or 0.0)
        self.dattn_weights_input = bool(dattn_weights_input)
        with torch.no_grad():
            text_embeds = model.static_text_embeds().detach().clone()
        self.register_buffer("text_embeds", text_embeds, persistent=False)
        self.eval()

    @property
    def input_names(self) -> tuple[str, ...]:
        return (INPUT_NAME, DATTN_WEIGHTS_NAME) if self.dattn_weights_input else (INPUT_NAME,)

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES if self.smoothing_sigma else OUTPUT_NAMES[:2]

    def forward(
        self, pixel_values: torch.Tensor, dattn_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        model = self.model
        image_embeds, patch_features, grid = model.encode_image(pixel_values, dattn_weights=dattn_weights)
        output = model.forward_from_features(
            image_embeds, patch_features, grid, tuple(pixel_values.shape[-2:]), text_embeds=self.text_embeds
        )
        if not self.smoothing_sigma:
            return output.anomaly_scores, output.anomaly_maps
        return output.anomaly_scores, output.anomaly_maps, gaussian_smooth(output.anomaly_maps, self.smoothing_sigma)


class DinoTokensGraph(nn.Module):
    """Pixels to the DINOv2 patch tokens D-Attn is computed from, for `torch.onnx.export` (Crane+).

    Forward: `pixel_values` float32 [B, 3, S, S] (`CraneImageProcessor` output, CLIP-normalized; the model maps them
    to DINOv2's normalization) -> `dino_tokens` float32 [B, M, C_dino], M = (S / 14)^2, class and register tokens
    dropped (`CraneForAnomalyDetection._dino_patch_tokens`).

    Raises:
        ValueError: the model has no D-Attn, is in training mode or is not float32.
    """

    def __init__(self, model: CraneForAnomalyDetection):
        super().__init__()
        _check_exportable(model)
        if not model.config.use_dattn:
            raise ValueError(f"This {model.config.variant} model has no DINOv2 (no D-Attn).")
        self.model = model
        self.eval()

    input_names = (INPUT_NAME,)
    output_names = (DINO_TOKENS_NAME,)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model._dino_patch_tokens(pixel_values)[0]


def _check_exportable(model: CraneForAnomalyDetection) -> None:
    if model.training:
        raise ValueError("Export a model in eval mode (model.eval()): training draws context conditioning.")
    dtypes = {parameter.dtype for parameter in model.parameters()}
    if dtypes != {torch.float32}:
        names = ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in dtypes))
        raise ValueError(f"Export needs a float32 model; this one has {names} weights (load it with float32).")


__all__ = ["INPUT_NAME", "OUTPUT_NAMES", "CraneExportGraph", "DinoTokensGraph"]
