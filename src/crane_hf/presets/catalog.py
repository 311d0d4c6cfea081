"""The bundled presets: which official checkpoint each one comes from, and the paper's facts about it."""

from __future__ import annotations

CLIP_BACKBONE = "openai/clip-vit-large-patch14-336"
DINO_BACKBONE = "facebook/dinov2-with-registers-base"
CRANE_SETTINGS = {"feature_layers": [6, 12, 18, 24], "soft_mean": True}
CRANE_PLUS_SETTINGS = {"feature_layers": [24], "soft_mean": False}
CRANE_PLUS_MEDICAL_SETTINGS = {"feature_layers": [24], "soft_mean": True}

# Published results (spec section 8): image (AUROC, AP, F1-max) and pixel (AUROC, AUPRO, F1-max), in percent.
MVTEC_CRANE = {"dataset": "MVTec-AD", "image": [93.8, 97.5, 93.8], "pixel": [91.3, 84.6, 41.3]}
MVTEC_CRANE_PLUS = {"dataset": "MVTec-AD", "image": [93.9, 97.6, 93.6], "pixel": [91.2, 88.1, 43.8]}
VISA_CRANE = {"dataset": "VisA", "image": [85.3, 87.9, 82.6], "pixel": [95.1, 87.5, 30.9]}
VISA_CRANE_PLUS = {"dataset": "VisA", "image": [83.6, 86.7, 81.2], "pixel": [95.3, 90.6, 30.2]}

PRESET_SOURCES = {
    "crane/mvtec": (
        "trained_on_mvtec_crane_epoch_5.pth",
        "crane",
        "MVTec-AD test split",
        5,
        CRANE_SETTINGS,
        "every dataset except MVTec-AD",
        [VISA_CRANE],
    ),
    "crane/visa": (
        "trained_on_visa_crane_epoch_5.pth",
        "crane",
        "VisA test split",
        5,
        CRANE_SETTINGS,
        "MVTec-AD",
        [MVTEC_CRANE],
    ),
    "crane+/mvtec": (
        "trained_on_mvtec_cranep_epoch_5.pth",
        "crane+",
        "MVTec-AD test split",
        5,
        CRANE_PLUS_SETTINGS,
        "industrial datasets except MVTec-AD (use soft_mean=True on DAGM)",
        [VISA_CRANE_PLUS],
    ),
    "crane+/visa": (
        "trained_on_visa_cranep_epoch_5.pth",
        "crane+",
        "VisA test split",
        5,
        CRANE_PLUS_SETTINGS,
        "MVTec-AD",
        [MVTEC_CRANE_PLUS],
    ),
    "crane+/mvtec-epoch1": (
        "trained_on_mvtec_cranep_epoch_1.pth",
        "crane+",
        "MVTec-AD test split",
        1,
        CRANE_PLUS_MEDICAL_SETTINGS,
        "medical datasets (the paper's medical setting)",
        [],
    ),
}


def preset_file_name(name: str) -> str:
    """File of a preset name: "crane+/mvtec-epoch1" -> "crane_plus-mvtec-epoch1.safetensors"."""
    return name.replace("+", "_plus").replace("/", "-") + ".safetensors"
