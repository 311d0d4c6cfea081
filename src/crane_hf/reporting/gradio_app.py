"""The Gradio app: drop images, see score, verdict and the decision figure, move the thresholds live, save them.

    app = build_app(open_model, model_choices=["crane+/mvtec", "my-model/"], save_thresholds=save)
    app.launch(server_name="127.0.0.1", server_port=7860)

`crane-hf app --model ...` starts it (`crane_hf/commands/app.py`); `crane-hf push --space DIR` copies this module and
`decision_figure.py` into a Hugging Face Space folder, where `open_model` is transformers' pipeline with remote code.
So this module imports only gradio, numpy, Pillow and its neighbour `decision_figure` (no other part of crane_hf).

The model runs once per image: its score and anomaly map stay in the session's state, and moving the image or pixel
threshold (or the colour scale) only redraws the figure and the verdicts.

Few-shot: a session may give a handful of normal images of the class, or a reference memory saved before (a
.safetensors file); its images are then scored with the pipeline's few-shot path (`reference_images` /
`reference_memory`: fused zero-shot + few-shot scores and maps). An image that is one of the reference images (the
same file, bytes or pixels) is refused by the pipeline (`ValueError`) and named in the page; the others are scored.
Saved thresholds are saved for that memory (and the memory with them).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .decision_figure import (
    COLOR_SCALES,
    at_or_above,
    decision_digits,
    display_rgb,
    render_decision_figure,
    verdict,
)

MAX_IMAGES = 64  # images kept per session (each keeps its float32 map)


@dataclass
class AppModel:
    """A loaded detector: `detector(image)` returns a dict with "score" (float in [0, 1]) and "anomaly_map" (float32
    [H, W] at the image's size), as `pipeline("zero-shot-anomaly-detection")` does; the model's default thresholds;
    `folder`: the local model folder thresholds can be saved to (None: not saveable, e.g. a preset or Hub id)."""

    name: str
    detector: Callable[[Any], dict[str, Any]]
    image_threshold: float
    pixel_threshold: float
    folder: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_pipeline(cls, name: str, detector: Any, folder: str | None = None) -> AppModel:
        config = detector.model.config
        return cls(name, detector, float(config.image_threshold), float(config.pixel_threshold), folder)

    def score(
        self, image: np.ndarray, path: str | None = None, reference: dict[str, Any] | None = None
    ) -> tuple[float, np.ndarray]:
        """(image score, anomaly map float32 [H, W]) of an RGB uint8 image; one image at a time per model.

        `path`: the image's file, if it came as one: the pipeline reads it (as `crane-hf predict` does) and can tell
        a reference image by its file and bytes too. `reference`: the session's few-shot reference (`reference`);
        scores and maps are then the fused ones, and an image that is one of its reference images is refused by the
        pipeline (`ValueError`). The app decides with its own thresholds (the sliders), so the call names one: the
        model's (calibrated for its own computation) are not asked for."""
        call = dict((reference or {}).get("call", {}))
        with self.lock:
            result = self.detector(path or Image.fromarray(image), threshold=self.image_threshold, **call)
        anomaly_map = np.asarray(result["anomaly_map"], dtype=np.float32)
        score = float(result["score"])
        if not np.isfinite(score) or not np.isfinite(anomaly_map).all():
            raise ValueError("the model returned a non-finite score or map; nothing is shown.")
        return score, anomaly_map

    def reference(self, files: Sequence[str]) -> dict[str, Any]:
        """A session's few-shot reference from uploaded files: one saved reference memory (a .safetensors file,
        checked against the model: `pipeline.load_reference_memory`) or normal images of the class (their memory
        bank is built by `pipeline.build_reference_memory` from the pixels, as the app reads images, so that the
        same picture uploaded again, as a file or into the image box, is known by its pixels).

        Returns {"call": the pipeline's call arguments, "memory": the `ReferenceMemory`, "label": a description}.
        Raises `ValueError` naming a file that is not a readable image, or a memory of another model."""
        files = [os.fspath(file) for file in files]
        if not files:
            raise ValueError("give normal images of the class, or one saved reference memory (.safetensors).")
        memories = [file for file in files if file.endswith(".safetensors")]
        if memories:
            if len(files) > 1:
                raise ValueError("give one reference memory (.safetensors) alone, or normal images, not both.")
            with self.lock:
                memory = self.detector.load_reference_memory(files[0])
            label = f"reference memory {os.path.basename(files[0])} ({memory.num_images} images)"
            return {"call": {"reference_memory": files[0]}, "memory": memory, "label": label}
        images = []
        for file in files:
            try:
                images.append(_rgb(file))
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise ValueError(f"{os.path.basename(file)}: not a readable image ({error})") from error
        with self.lock:
            memory = self.detector.build_reference_memory(images)
        return {"call": {"reference_images": images}, "memory": memory, "label": f"{len(images)} reference images"}


def _rgb(image: Any) -> np.ndarray:
    """An uploaded image (numpy from gr.Image, or a file path) as RGB uint8; a file is read as the pipeline reads it
    (`display_rgb`: EXIF orientation applied, as gr.Image also does, so that the figure and the map have the same
    size; 16-bit images scaled, not clipped to white)."""
    if isinstance(image, str):
        with Image.open(image) as opened:
            opened.load()
            return display_rgb(opened)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array[:, :, :3]


def _check_threshold(name: str, value: Any) -> float:
    number = float(value)
    if not np.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    return number


def render_state(
    state: dict[str, Any], image_threshold: float, pixel_threshold: float, color_scale: str, selected: str | None
) -> tuple[str, Image.Image | None, list[list[Any]]]:
    """(result text, decision figure, table rows) of the session's images at the given thresholds; no model call."""
    items = state.get("items", [])
    if not items:
        return "Upload or drop an image to score it.", None, []
    image_threshold = _check_threshold("image threshold", image_threshold)
    pixel_threshold = _check_threshold("pixel threshold", pixel_threshold)
    table = [
        [
            i["name"],
            round(i["score"], decision_digits(i["score"], image_threshold, 4)),
            verdict(i["score"], image_threshold),
        ]
        for i in items
    ]
    item = next((i for i in items if i["name"] == selected), items[-1])
    decided = verdict(item["score"], image_threshold)
    digits = decision_digits(item["score"], image_threshold, 4)
    fraction = float(at_or_above(item["map"], pixel_threshold).mean())
    text = (
        f"### {decided}: score {item['score']:.{digits}f}\n"
        f"**{item['name']}** · image threshold {image_threshold:.{digits}f} · pixel threshold {pixel_threshold:.3f} · "
        f"{100 * fraction:.1f}% of the pixels at or above it · model {state.get('model', '')}"
    )
    if state.get("reference"):
        text += f" · few-shot with {state['reference']['label']}"
    figure = render_decision_figure(
        item["image"],
        item["map"],
        score=item["score"],
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        name=item["name"],
        color_scale=color_scale,
    )
    return text, figure, table


def build_app(
    open_model: Callable[[str], AppModel],
    model_choices: Sequence[str],
    save_thresholds: Callable[[AppModel, float, float, Any], str] | None = None,
    title: str = "Crane zero-shot anomaly detection",
    description: str = "",
    allow_custom_models: bool = True,
) -> Any:
    """The Gradio Blocks of the app (not launched).

    Args:
        open_model: loads (and may cache) a model from one of `model_choices` or a folder typed by the user; raises
            `ValueError` / `OSError` with a message to show.
        model_choices: presets, folders or Hub ids offered; the first is loaded when a session starts.
        save_thresholds: `save_thresholds(model, image_threshold, pixel_threshold, memory)` writes the thresholds
            into the model's folder (for the session's few-shot reference memory, None: none) and returns a message;
            None hides saving.
        allow_custom_models: let users type a model that is not in `model_choices` (a Space offers only its own).
    """
    import gradio as gr

    def load(spec: str, state: dict[str, Any]):
        state = dict(state or {})
        try:
            model = open_model(spec)
        except (ValueError, OSError) as error:
            return (state, f"**Could not load {spec}:** {error}", gr.update(), gr.update(), *_redraw(state))
        dropped = (
            " · the reference images were for the previous model: give them again" if state.get("reference") else ""
        )
        state["model"], state["reference"] = spec, None
        state["items"], refused = _rescored(model, state)  # the images already there, scored by the new model
        saveable = "" if model.folder else " (a preset or Hub model: start the app on a model folder to save)"
        status = f"Model **{spec}** · default thresholds image {model.image_threshold:.3f}, pixel " + (
            f"{model.pixel_threshold:.3f}{saveable}{dropped}{_refused_note(refused)}"
        )
        return (
            state,
            status,
            gr.update(value=model.image_threshold),
            gr.update(value=model.pixel_threshold),
            *_redraw(state, model.image_threshold, model.pixel_threshold),
        )

    def _rescored(model: AppModel, state: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
        """The session's images scored again (by `model`, with the session's reference); those the pipeline
        refuses (a reference image) are dropped and named."""
        items, refused = [], []
        for item in state.get("items", []):
            try:
                score, anomaly_map = model.score(item["image"], item.get("path"), state.get("reference"))
            except ValueError as error:
                refused.append(f"{item['name']}: {error}")
                continue
            items.append({**item, "score": score, "map": anomaly_map})
        return items, refused

    def _redraw(state, image_threshold=None, pixel_threshold=None, color_scale="absolute", selected=None):
        if image_threshold is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        text, figure, table = render_state(state, image_threshold, pixel_threshold, color_scale, selected)
        names = [item["name"] for item in state.get("items", [])]
        return text, figure, table, gr.update(choices=names, value=selected if selected in names else None)

    def add_images(
        images: list[tuple[str, np.ndarray, str | None]],
        state,
        image_threshold,
        pixel_threshold,
        color_scale,
        unreadable: Sequence[str] = (),
    ):
        """Score `images` into the session; `unreadable` ("name: reason" of files that could not be read) and the
        images the pipeline refuses are named in the result, the others are scored."""
        state = dict(state or {})
        scored, refused = [], list(unreadable)
        try:
            model = open_model(state["model"])
            for name, image, path in images:
                try:
                    score, anomaly_map = model.score(image, path, state.get("reference"))
                except ValueError as error:  # e.g. one of the few-shot reference images: refused, the others scored
                    refused.append(f"{name}: {error}")
                    continue
                scored.append({"name": name, "image": image, "path": path, "score": score, "map": anomaly_map})
        except (ValueError, OSError, KeyError) as error:
            return state, f"**Could not score the image:** {error}", None, [], gr.update()
        if not scored:
            return state, f"**Not scored:** {'; '.join(refused)}", gr.update(), gr.update(), gr.update()
        items = [i for i in state.get("items", []) if i["name"] not in {s["name"] for s in scored}] + scored
        state["scored"] = _scored_so_far(state) + len(scored)
        state["items"] = items[-MAX_IMAGES:]
        text, *rest = _redraw(state, image_threshold, pixel_threshold, color_scale, scored[-1]["name"])
        return state, text + _refused_note(refused), *rest

    def on_image(image, state, image_threshold, pixel_threshold, color_scale):
        if image is None:
            return state, gr.update(), gr.update(), gr.update(), gr.update()
        # numbered by the images scored in the session so far, not len(items), which stops growing at MAX_IMAGES
        name = f"upload-{_scored_so_far(state or {}) + 1}"
        return add_images([(name, _rgb(image), None)], state, image_threshold, pixel_threshold, color_scale)

    def on_references(files, state, image_threshold, pixel_threshold, color_scale):
        state = dict(state or {})
        if not files:  # cleared: zero-shot again (or the model folder's own memory)
            if not state.get("reference"):
                return state, gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
            state["reference"] = None
            label = "No reference images: zero-shot scores (or the model folder's own reference memory)."
        else:
            paths = [file if isinstance(file, str) else getattr(file, "name", str(file)) for file in files]
            try:
                model = open_model(state["model"])
                reference = model.reference(paths)
            except (ValueError, OSError, KeyError) as error:
                return state, f"**Reference not used:** {error}", gr.update(), gr.update(), gr.update(), gr.update()
            state["reference"] = reference
            label = (
                f"Few-shot with {reference['label']}: scores and maps are the fused zero-shot + few-shot ones. "
                "Thresholds hold for one memory: set them here and save them with it."
            )
        model = open_model(state["model"])
        state["items"], refused = _rescored(model, state)
        redrawn = _redraw(state, image_threshold, pixel_threshold, color_scale)
        return state, label + _refused_note(refused), *redrawn

    def on_files(files, state, image_threshold, pixel_threshold, color_scale):
        if not files:
            return state, gr.update(), gr.update(), gr.update(), gr.update()
        images, unreadable = [], []
        for file in files:  # an unreadable file is named; the others are still scored
            path = file if isinstance(file, str) else getattr(file, "name", str(file))
            try:
                images.append((os.path.basename(path), _rgb(path), path))
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                unreadable.append(f"{os.path.basename(path)}: not a readable image ({error})")
        return add_images(images, state, image_threshold, pixel_threshold, color_scale, unreadable)

    def on_thresholds(state, image_threshold, pixel_threshold, color_scale, selected):
        return _redraw(state or {}, image_threshold, pixel_threshold, color_scale, selected)

    def on_save(state, image_threshold, pixel_threshold):
        if save_thresholds is None:
            return "Saving is not available here."
        try:
            model = open_model((state or {})["model"])
            return save_thresholds(
                model,
                _check_threshold("image threshold", image_threshold),
                _check_threshold("pixel threshold", pixel_threshold),
                ((state or {}).get("reference") or {}).get("memory"),
            )
        except (ValueError, OSError, KeyError) as error:
            return f"**Not saved:** {error}"

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        state = gr.State({})
        gr.Markdown(f"## {title}\n{description}")
        with gr.Row():
            model_box = gr.Dropdown(
                choices=list(model_choices),
                value=model_choices[0],
                allow_custom_value=allow_custom_models,
                interactive=allow_custom_models or len(model_choices) > 1,
                label="model: preset, model folder or Hub id",
                elem_id="model",
                scale=3,
            )
            load_button = gr.Button("Load model", elem_id="load-model", scale=1)
        status = gr.Markdown(elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=1):
                image_input = gr.Image(
                    label="image: upload, drop or paste",
                    type="numpy",
                    sources=["upload", "clipboard"],
                    elem_id="image-input",
                )
                files_input = gr.File(
                    label="or several images", file_count="multiple", file_types=["image"], elem_id="files-input"
                )
                references_input = gr.File(
                    label="few-shot (optional): normal images of the class, or a saved reference memory",
                    file_count="multiple",
                    file_types=["image", ".safetensors"],
                    elem_id="references-input",
                )
                reference_status = gr.Markdown(elem_id="reference-status")
                image_threshold = gr.Slider(
                    0.0, 1.0, value=0.5, step=0.001, label="image threshold", elem_id="image-threshold"
                )
                pixel_threshold = gr.Slider(
                    0.0, 1.0, value=0.5, step=0.001, label="pixel threshold", elem_id="pixel-threshold"
                )
                color_scale = gr.Radio(
                    list(COLOR_SCALES), value="absolute", label="heatmap colours", elem_id="color-scale"
                )
                if save_thresholds is not None:
                    save_button = gr.Button("Save thresholds to the model folder", elem_id="save-thresholds")
                    save_message = gr.Markdown(elem_id="save-message")
            with gr.Column(scale=2):
                result = gr.Markdown("Upload or drop an image to score it.", elem_id="result")
                figure = gr.Image(label="decision figure", type="pil", interactive=False, elem_id="figure")
                shown = gr.Dropdown(choices=[], label="image shown", elem_id="shown")
                table = gr.Dataframe(
                    headers=["image", "score", "verdict"], label="scored images", interactive=False, elem_id="table"
                )
        redraw_outputs = [result, figure, table, shown]
        app.load(load, [model_box, state], [state, status, image_threshold, pixel_threshold, *redraw_outputs])
        load_button.click(load, [model_box, state], [state, status, image_threshold, pixel_threshold, *redraw_outputs])
        settings = [state, image_threshold, pixel_threshold, color_scale]
        image_input.upload(on_image, [image_input, *settings], [state, *redraw_outputs])
        files_input.upload(on_files, [files_input, *settings], [state, *redraw_outputs])
        reference_outputs = [state, reference_status, *redraw_outputs]
        references_input.upload(on_references, [references_input, *settings], reference_outputs)
        references_input.clear(on_references, [references_input, *settings], reference_outputs)
        for control in (image_threshold, pixel_threshold, color_scale, shown):
            control.change(on_thresholds, [*settings, shown], redraw_outputs, show_progress="hidden")
        if save_thresholds is not None:
            save_button.click(on_save, [state, image_threshold, pixel_threshold], save_message)
    return app


def _scored_so_far(state: dict[str, Any]) -> int:
    """How many images the session has scored (its uploads are numbered by it)."""
    return int(state.get("scored", len(state.get("items", []))))


def _refused_note(refused: Sequence[str]) -> str:
    """The images the pipeline refused to score (each "name: reason"), as a line to append; "" when none."""
    return f"\n\n**Not scored:** {'; '.join(refused)}" if refused else ""


def launch_options() -> dict[str, Any]:
    """`launch()` settings that keep the page offline: system fonts instead of Google Fonts, no analytics."""
    import gradio as gr

    theme = gr.themes.Default(
        font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"], font_mono=["monospace"]
    )
    return {"theme": theme}
