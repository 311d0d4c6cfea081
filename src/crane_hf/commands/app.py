"""`crane-hf app`: a Gradio app to try images, move the thresholds live and save them into a model folder.

    pip install -e ".[app]"
    crane-hf app --model my-model-folder            # then open http://127.0.0.1:7860

Upload or drop images (or several files), choose a preset or model folder, see each image's score, verdict and
decision figure; the image and pixel thresholds move without running the model again. "Save thresholds" writes them
into the model folder's config.json and calibration.json with calibrate's own writer (`calibrate.write_calibration`:
the same record, and the computation the thresholds hold for) and under the same lock (`calibrate.calibration_lock`);
it refuses a folder that is not a crane model folder, a linked config.json (a Hub cache entry), a calibration.json
crane-hf did not write, and presets.

Few-shot: the page takes a handful of normal images of the class (or a saved reference memory); scores and maps are
then the fused ones, an image that is one of the reference images is refused (named in the page), and "Save
thresholds" saves them for that memory, with the memory, as `crane-hf calibrate --reference` does.

`--model` is checked before the server starts, with the checks `predict` makes (`check_model_loadable`): a typo of a
preset, a folder that does not exist or backbones that cannot be had here are refused in one line (exit 2).

The app itself (`reporting/gradio_app.py`) and its figures (`reporting/decision_figure.py`) are the same modules
`crane-hf push --space` copies into a Hugging Face Space.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

from ..presets import DEFAULT_PRESET
from .cli_support import local_path, one_line, require_range

CALIBRATION_FILE = "calibration.json"
_CALIBRATION_KEYS = {"calibrated_at", "image", "pixel", "previous"}


SET_BY_HAND = "set by hand in crane-hf app"


def save_thresholds_to_folder(
    folder: str, image_threshold: float, pixel_threshold: float, model: Any, memory: Any = None
) -> str:
    """Save the thresholds into `folder` as `crane-hf calibrate` does; returns a message.

    The one writer of both (`calibrate.write_calibration`): config.json gets the thresholds and what they hold for
    (`threshold_computation`: `model`'s computation, its dtype and the reference memory in use), calibration.json the
    same record as calibrate's, with `method` "set by hand in crane-hf app" and no calibration images (`target_fpr`,
    `fpr_on_calibration_set` and `normal_images` None). A model folder loaded later decides with them as with
    calibrated ones, and refuses them under another computation (`CraneConfig.check_thresholds`).

    Args:
        model: the model the app loaded from `folder` (`CraneForAnomalyDetection`; the pipeline's `.model`).
        memory: a `ReferenceMemory` the app's scores were fused with (few-shot with reference images given in the app);
            it is saved into the folder with the thresholds (`reference_memory.safetensors`), as calibrate saves
            its `--reference` memory. None: the model's own memory, if the folder has one, else zero-shot.

    Holds the folder's calibration lock (`calibrate.calibration_lock`) while it reads and writes; the files are
    replaced together, atomically. Raises `ValueError` (nothing written) when: a threshold is not a number in [0, 1]
    (`thresholds.check_threshold`); `folder` has no config.json, a linked one, or one that is not a crane config
    (`model_type` "crane"); calibration.json exists but was not written by crane-hf (a JSON object with the keys
    crane-hf writes); the folder's computation is no longer the loaded model's (changed since the app loaded it);
    `OutputInUseError` while a calibration of the folder runs."""
    from ..models.crane.thresholds import check_threshold
    from .calibrate import calibration_lock

    check_threshold(image_threshold, "image threshold")
    check_threshold(pixel_threshold, "pixel threshold")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder} is not a model folder (no config.json).")
    if os.path.islink(config_path):
        raise ValueError(f"{config_path} is a link (a Hub cache entry?); save the model to a folder of its own first.")
    with calibration_lock(folder):
        return _save_thresholds(folder, float(image_threshold), float(pixel_threshold), model, memory)


def _save_thresholds(folder: str, image_threshold: float, pixel_threshold: float, model: Any, memory: Any) -> str:
    """`save_thresholds_to_folder` once the thresholds are checked and the folder is locked."""
    from ..model_loading import computation_changes
    from ..models.crane.configuration_crane import CraneConfig
    from .calibrate import write_calibration

    config_path = os.path.join(folder, "config.json")
    try:
        with open(config_path, encoding="utf-8") as stream:
            config = json.load(stream)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not readable JSON ({error}).") from error
    if not isinstance(config, dict) or config.get("model_type") != "crane":
        raise ValueError(f"{config_path} is not the config of a crane model; nothing written.")
    record_path = os.path.join(folder, CALIBRATION_FILE)
    if os.path.lexists(record_path):
        try:
            with open(record_path, encoding="utf-8") as stream:
                existing = json.load(stream)
        except (OSError, json.JSONDecodeError):
            existing = None
        if os.path.islink(record_path) or not isinstance(existing, dict) or not set(existing) >= _CALIBRATION_KEYS:
            raise ValueError(f"{record_path} exists and was not written by crane-hf; nothing written.")
    previous = CraneConfig.from_pretrained(folder)
    changed = computation_changes(previous, model.config)
    if changed:
        fields = ", ".join(f"{name} {c['from']!r} -> {c['to']!r}" for name, c in changed.items())
        raise ValueError(
            f"{config_path} computes otherwise than the model the app loaded ({fields}); load the model again "
            "before saving thresholds for it. Nothing written."
        )
    memory = memory if memory is not None else getattr(model, "reference_memory", None)
    record = write_calibration(
        folder,
        model,
        previous,
        image={"target_fpr": None, "threshold": image_threshold, "fpr_on_calibration_set": None},
        pixel={"target_fpr": None, "threshold": pixel_threshold, "fpr_on_calibration_set": None},
        method=SET_BY_HAND,
        memory=memory,
        save_memory=memory is not None and memory is not getattr(model, "reference_memory", None),
    )
    previous_values = record["previous"]
    few_shot = " for the fused scores of its reference memory (saved with them)" if memory is not None else ""
    return (
        f"Saved image threshold {image_threshold:.4f} and pixel threshold {pixel_threshold:.4f} into {config_path}"
        f"{few_shot} (previous: {previous_values['image_threshold']}, {previous_values['pixel_threshold']})."
    )


def model_opener(clip: str | None = None, dino: str | None = None, device: str = "auto") -> Any:
    """A cached `open_model(spec) -> AppModel` for presets, model folders and Hub ids; errors become `ValueError`."""
    from ..reporting.gradio_app import AppModel

    cache: dict[str, AppModel] = {}
    lock = threading.Lock()

    def open_model(spec: str) -> AppModel:
        from ..model_loading import load_detector
        from ..presets import is_preset_name

        spec = (spec or "").strip()
        if not spec:
            raise ValueError("name a preset, a model folder or a Hub id.")
        with lock:
            if spec not in cache:
                preset = is_preset_name(spec)
                try:
                    detector = load_detector(
                        spec, clip=clip if preset else None, dino=dino if preset else None, device=device
                    )
                except (OSError, TypeError, ValueError) as error:
                    raise ValueError(one_line(error)) from error
                folder = spec if not preset and os.path.isfile(os.path.join(spec, "config.json")) else None
                cache[spec] = AppModel.from_pipeline(spec, detector, folder=folder)
            return cache[spec]

    return open_model


def save_for_app(model: Any, image_threshold: float, pixel_threshold: float, memory: Any = None) -> str:
    """The app's save callback: thresholds into the model's own folder (`save_thresholds_to_folder`, for the session's
    reference `memory` if it has one), and into the loaded model."""
    if model.folder is None:
        raise ValueError(f"{model.name} is a preset or Hub model; start the app on a model folder to save thresholds.")
    message = save_thresholds_to_folder(model.folder, image_threshold, pixel_threshold, model.detector.model, memory)
    model.image_threshold, model.pixel_threshold = image_threshold, pixel_threshold
    return message


def build(args: argparse.Namespace) -> Any:
    """The app's Gradio Blocks for the command-line arguments (not launched)."""
    from ..presets import list_presets
    from ..reporting.gradio_app import build_app

    choices = list(dict.fromkeys([args.model, *list_presets()]))
    return build_app(
        model_opener(args.clip, args.dino, args.device),
        choices,
        save_thresholds=save_for_app,
        description="Crane / Crane+ (crane-hf): score, verdict and heatmap of each image; the thresholds move "
        "without running the model again.",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=local_path, default=DEFAULT_PRESET, help="preset, model folder or Hub id loaded first"
    )
    parser.add_argument("--clip", type=local_path, default=None, help="local CLIP folder for presets")
    parser.add_argument("--dino", type=local_path, default=None, help="local DINOv2 folder for presets")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")


def run(args: argparse.Namespace) -> int:
    from ..model_loading import check_model_loadable, resolve_device

    try:  # the arguments and the device are checked before Gradio or the model is loaded
        require_range("--port", args.port, 1, 65535)
        resolve_device(args.device)
    except (TypeError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    try:  # the checks predict and evaluate make: a typo or a missing folder or backbone fails before the server
        check_model_loadable(args.model, clip=args.clip, dino=args.dino)
    except (OSError, ValueError) as error:
        print(f"error: --model {args.model}: {one_line(error)}", file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the app needs Gradio: pip install 'crane-hf[app]' (or pip install gradio)", file=sys.stderr)
        return 2
    from ..reporting.gradio_app import launch_options

    app = build(args)
    print(f"crane-hf app on http://{args.host}:{args.port} (Ctrl+C stops it)")
    app.launch(server_name=args.host, server_port=args.port, **launch_options())
    return 0
