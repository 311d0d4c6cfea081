"""crane_hf: Crane and Crane+ zero-shot anomaly detection as a Hugging Face transformers model.

Importing the package registers `CraneConfig`, `CraneForAnomalyDetection` and `CraneImageProcessor` with the Auto
classes and the task "zero-shot-anomaly-detection" with transformers' pipeline registry, and marks the classes for
`register_for_auto_class` so that saved folders carry their code (`auto_map`) and load with
`trust_remote_code=True` where crane_hf is not installed.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .model_loading import load_detector
from .models.crane.configuration_crane import CraneConfig
from .models.crane.image_processing_crane import CraneImageProcessor
from .models.crane.modeling_crane import CraneAnomalyDetectionOutput, CraneForAnomalyDetection, CranePreTrainedModel
from .models.crane.pipeline_zero_shot_anomaly_detection import ZeroShotAnomalyDetectionPipeline

__version__ = "0.1.0"

AutoConfig.register("crane", CraneConfig, exist_ok=True)
AutoModel.register(CraneConfig, CraneForAnomalyDetection, exist_ok=True)
AutoImageProcessor.register(CraneConfig, image_processor_classes={"pil": CraneImageProcessor}, exist_ok=True)

CraneConfig.register_for_auto_class()
CraneForAnomalyDetection.register_for_auto_class("AutoModel")
CraneImageProcessor.register_for_auto_class("AutoImageProcessor")

PIPELINE_TASK = "zero-shot-anomaly-detection"
PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK, pipeline_class=ZeroShotAnomalyDetectionPipeline, pt_model=AutoModel, type="image"
)

__all__ = [
    "CraneAnomalyDetectionOutput",
    "CraneConfig",
    "CraneForAnomalyDetection",
    "CraneImageProcessor",
    "CranePreTrainedModel",
    "ZeroShotAnomalyDetectionPipeline",
    "load_detector",
]
