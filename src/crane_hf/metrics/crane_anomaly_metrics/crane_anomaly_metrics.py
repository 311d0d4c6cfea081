"""`evaluate` module wrapping crane_hf.metrics: image AUROC/AP/F1-max and pixel AUROC/AP/F1-max/AUPRO.

Load it offline with `evaluate.load(crane_hf.metrics.evaluate_module_path())` (configuration "default": labels,
scores, masks, maps) or `evaluate.load(path, "image")` (labels and scores only). `compute()` takes
`aupro_variant` ("official" or "legacy") and `max_fpr` (default 0.3). Maps are stored as float32 and are
read back from evaluate's Arrow cache as Python lists: for whole test sets prefer `AnomalyMetricAccumulator`.
"""

import datasets
import evaluate
import numpy as np

from crane_hf.metrics import AnomalyMetricAccumulator

_DESCRIPTION = """Exact anomaly-detection metrics of crane_hf.metrics: image-level AUROC, AP and F1-max from image
labels and scores; with ground-truth masks and anomaly maps also pixel-level AUROC, AP, F1-max and AUPRO (MVTec-AD
definition by default, or the official Crane code's 200-threshold computation with aupro_variant="legacy").
Undefined metrics (a single class present) are None."""

_KWARGS_DESCRIPTION = """
Args:
    labels: [N] image labels in {0, 1} (1 = anomalous).
    scores: [N] image anomaly scores.
    masks: [N, H, W] binary ground-truth masks (configuration "default" only).
    maps: [N, H, W] anomaly maps (configuration "default" only); H and W may differ between images.
    aupro_variant: "official" (default) or "legacy".
    max_fpr: FPR limit of AUPRO, default 0.3.
Returns:
    image_auroc, image_ap, image_f1_max and, in configuration "default", pixel_auroc, pixel_ap, pixel_f1_max,
    pixel_aupro (floats, or None when undefined).
"""

_CITATION = """@inproceedings{bergmann2019mvtec,
  title={MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  booktitle={CVPR},
  year={2019}
}"""

_IMAGE_FEATURES = {"labels": datasets.Value("int64"), "scores": datasets.Value("float64")}
_PIXEL_FEATURES = {
    "masks": datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))),
    "maps": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
}
_CONFIGURATIONS = ("default", "image")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CraneAnomalyMetrics(evaluate.Metric):
    """Image and pixel anomaly-detection metrics (exact), from crane_hf.metrics."""

    def _info(self):
        if self.config_name not in _CONFIGURATIONS:
            raise ValueError(f"config_name must be one of {_CONFIGURATIONS}, got {self.config_name!r}.")
        features = dict(_IMAGE_FEATURES)
        if self.config_name == "default":
            features.update(_PIXEL_FEATURES)
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
        )

    def _compute(self, labels, scores, masks=None, maps=None, aupro_variant="official", max_fpr=0.3):
        # evaluate hands the columns back as Python lists (nested ones cannot use its numpy format).
        accumulator = AnomalyMetricAccumulator(map_dtype=np.float32)
        labels, scores = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
        if maps is None:
            accumulator.update(labels, scores)
        else:  # one image at a time: H and W may differ between images
            for index in range(len(labels)):
                accumulator.update(
                    labels[index : index + 1],
                    scores[index : index + 1],
                    masks=np.asarray(masks[index], dtype=np.uint8)[None],
                    maps=np.asarray(maps[index], dtype=np.float32)[None],
                )
        return accumulator.compute(aupro_variant=aupro_variant, max_fpr=max_fpr)
