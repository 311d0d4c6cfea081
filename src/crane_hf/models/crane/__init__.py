"""Crane and Crane+, the model folder: exactly the modules that `save_pretrained` and `crane-hf push` ship as remote
code, importing nothing beyond torch, transformers, huggingface_hub, safetensors, numpy, Pillow and each other
(`tests/test_layout.py` checks it).

- `configuration_crane.py`: `CraneConfig`, backbones and the published settings of Crane and Crane+;
- `thresholds.py`: the one comparison of a value with a decision threshold, threshold checks, the exact rates of
  calibration;
- `modeling_crane.py`: `CraneForAnomalyDetection`, which composes the blocks below into scores and maps;
- the blocks: `clip_layers.py` (CLIP blocks), `e_attention.py` (E-Attn), `d_attention.py` (D-Attn),
  `prompt_learning.py` and `prompt_tokenization.py` (learned prompts, text encoder, prompt ids),
  `score_pooling.py`, `position_embeddings.py`, `anomaly_losses.py`, `gaussian_smoothing.py`,
  `reproducibility.py` (batch-independent kernels), `checkpoint_validation.py`, `json_reading.py` (model-folder
  JSON with repeated keys refused);
- `image_processing_crane.py`: `CraneImageProcessor`, images and masks in, maps post-processed out;
- `pipeline_zero_shot_anomaly_detection.py` with `visualization.py` (overlays) and `image_reading.py` (guarded
  decoding of image files);
- `convert_original.py`: the official `.pth` prompt checkpoints into a model.
"""

from .configuration_crane import CraneConfig
from .image_processing_crane import CraneImageProcessor
from .modeling_crane import CraneAnomalyDetectionOutput, CraneForAnomalyDetection, CranePreTrainedModel
from .pipeline_zero_shot_anomaly_detection import ZeroShotAnomalyDetectionPipeline

__all__ = [
    "CraneAnomalyDetectionOutput",
    "CraneConfig",
    "CraneForAnomalyDetection",
    "CraneImageProcessor",
    "CranePreTrainedModel",
    "ZeroShotAnomalyDetectionPipeline",
]
