"""`crane-hf demo`: the main job, end to end: score example images and write a table and heatmap overlays.

Where the Hugging Face Hub (or its cache) has the paper's backbones, this is `crane-hf predict` with the default
preset (Crane+ with the official prompts) on example images. Where it does not, as on offline machines, the demo
says so plainly and runs the same workflow on SMALL RANDOM backbones whose prompts are trained for a moment on
synthetic defects: the files it writes have the real format, the scores do not have Crane's accuracy.

Example images are synthetic: scikit-image textures and photos with pasted scratches, spots, cracks, holes and
stains (`crane_hf.data.synthetic`), so the demo needs no download.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from ..io.atomic import atomic_output_dir
from ..io.output_safety import check_output_dir, protected_paths
from ..presets import DEFAULT_PRESET, BackboneUnavailableError
from .cli_support import local_path, one_line, require_positive

DEMO_TRAIN_CLASSES = ("brick", "grass", "gravel", "tissue")
DEMO_EXAMPLE_CLASSES = ("coins", "moon")
DEMO_EXAMPLE_DEFECTS = ("scratch", "hole", "color_stain")
DEMO_IMAGE_SIZE = 112
OFFLINE_BANNER = (
    "OFFLINE DEMO: the paper's backbones ({clip}, {dino}) are neither cached nor downloadable here.\n"
    "Running the same workflow on SMALL RANDOM backbones whose prompts are trained for a moment on synthetic\n"
    "defects. The files have the real format; the scores do NOT have Crane's accuracy."
)
OFFLINE_LIMITS = (
    "What this offline demo CAN show: every step and file of the real workflow: prompt training, thresholds\n"
    "calibrated on normal images, scores and verdicts, decision figures, report.html, and the app\n"
    "(crane-hf app --model {model_dir}).\n"
    "What it CANNOT show: how well Crane finds defects. Random backbones have never learned what images look like,\n"
    "so their scores are close to chance: expect defects marked OK and normal images flagged. Judge detection only\n"
    "with the paper's backbones (crane-hf predict IMAGES --model crane+/mvtec)."
)


def train_demo_prompts(
    model: Any, processor: Any, dataset_root: str, steps: int, seed: int = 0, progress: bool = False
) -> list[float]:
    """A few Adam steps (the paper's optimizer settings) on the synthetic defects; returns the losses."""
    import torch
    from tqdm.auto import tqdm

    from ..data import load_anomaly_dataset

    dataset = load_anomaly_dataset(dataset_root, split="test")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.6, 0.999))
    model.train()
    losses = []
    bar = tqdm(total=steps, desc="Training the demo prompts", unit="step", disable=not progress)
    for _ in range(steps):
        rows = dataset[torch.randperm(len(dataset), generator=generator)[:8].tolist()]
        inputs = processor(rows["image"], masks=rows["mask"])
        output = model(inputs["pixel_values"], labels=torch.tensor(rows["label"]), masks=inputs["masks"])
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


def _phase(text: str, progress: bool) -> None:
    """One line naming a phase that has no progress bar of its own (each takes a few seconds at most)."""
    if progress:
        print(f"{text} ...", file=sys.stderr, flush=True)


def _write_examples(folder: str, seed: int) -> None:
    """Synthetic example images (normal and defective) of classes the demo model never trained on."""
    from ..data import generate_synthetic_dataset

    generate_synthetic_dataset(
        folder,
        classes=DEMO_EXAMPLE_CLASSES,
        defects=DEMO_EXAMPLE_DEFECTS,
        image_size=160,
        train_good=0,
        test_good=2,
        test_defective=1,
        seed=seed,
    )


def _offline_demo_model(folder: str, seed: int, steps: int, progress: bool) -> tuple[Any, Any]:
    """Small random backbones with prompts trained on synthetic defects, saved to `folder`/demo-model with
    thresholds calibrated on the normal training images (`crane-hf calibrate`)."""
    from ..data import generate_synthetic_dataset
    from ..models.crane.image_processing_crane import CraneImageProcessor
    from ..models.crane.modeling_crane import CraneForAnomalyDetection
    from ..small_backbones import small_random_backbones
    from .calibrate import calibrate_folder

    training_data = os.path.join(folder, "training-data")
    generate_synthetic_dataset(
        training_data,
        classes=DEMO_TRAIN_CLASSES,
        image_size=DEMO_IMAGE_SIZE,
        train_good=4,
        test_good=4,
        test_defective=2,
        seed=seed + 1,
        progress=progress,
    )
    clip, dino = small_random_backbones(seed, image_size=DEMO_IMAGE_SIZE)
    model = CraneForAnomalyDetection.from_backbones(clip, dino, image_size=DEMO_IMAGE_SIZE, soft_mean=True)
    processor = CraneImageProcessor.from_crane_config(model.config)
    started = time.perf_counter()
    losses = train_demo_prompts(model, processor, training_data, steps, seed, progress)
    if progress:
        print(
            f"Trained the demo prompts for {steps} steps in {time.perf_counter() - started:.0f} s "
            f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})."
        )
    model_dir = os.path.join(folder, "demo-model")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    normal_images = os.path.join(training_data, "*", "train", "good")
    calibrate_folder(model_dir, [normal_images], fpr=0.1, pixel_fpr=0.05, device="cpu", progress=progress)
    return model, processor


def run_demo(
    output: str,
    model_spec: str = DEFAULT_PRESET,
    offline: bool = False,
    steps: int = 40,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write example images, predictions and overlays to `output`; returns the mode, rows and true labels.

    `output` holds `images/` (the examples, MVTec layout), `predictions/` (as `crane-hf predict` writes it) and,
    for the offline demo, `training-data/` and `demo-model/`.
    """
    from ..data import load_anomaly_dataset
    from ..model_loading import load_model
    from .predict import predict_images

    protected = protected_paths("the model folder", [model_spec])
    check_output_dir(output, overwrite, protected)
    model = processor = None
    if not offline:
        try:
            model, processor = load_model(model_spec)
        except BackboneUnavailableError as error:
            print(str(error).splitlines()[0] + "\n", file=sys.stderr)
    mode = "model" if model is not None else "offline-demo"
    with atomic_output_dir(output, overwrite, protected, command="demo") as staging:
        _phase("Writing the example images", progress)
        _write_examples(os.path.join(staging, "images"), seed)
        if model is None:
            from ..presets import load_preset

            preset = load_preset(DEFAULT_PRESET)
            print(OFFLINE_BANNER.format(clip=preset.clip_backbone, dino=preset.dino_backbone), file=sys.stderr)
            _offline_demo_model(staging, seed, steps, progress)
    if mode == "offline-demo":
        model, processor = load_model(os.path.join(output, "demo-model"))
    examples = load_anomaly_dataset(os.path.join(output, "images"), split="test")
    paths = [os.path.join(output, "images", path) for path in examples["image_path"]]
    notice = None
    if mode == "offline-demo":
        limits = OFFLINE_LIMITS.format(model_dir=os.path.join(output, "demo-model"))
        notice = "OFFLINE DEMO on SMALL RANDOM backbones.\n" + limits
        print(limits, file=sys.stderr)
    predictions = os.path.join(output, "predictions")
    report = predict_images(model, processor, paths, predictions, progress=progress, report_html=True, notice=notice)
    labels = dict(zip(paths, examples["label"]))
    return {
        "mode": mode,
        "output": output,
        "rows": report.rows,
        "labels": labels,
        "report": os.path.join(os.path.abspath(predictions), "report.html"),
    }


def _print_summary(result: dict[str, Any]) -> None:
    output = result["output"]
    print(f"\n{'image':<36} {'score':>7}  decision  truth")
    for row in result["rows"]:
        name = os.path.relpath(row["path"], os.path.join(output, "images"))
        truth = {0: "normal", 1: "defect"}[result["labels"][row["path"]]]
        decision = "ANOMALY" if row["is_anomalous"] else "ok"
        print(f"{name:<36} {row['score']:>7.4f}  {decision:<8}  {truth}")
    print(
        f"\nWrote {len(result['rows'])} predictions to {output}/predictions/ "
        "(predictions.csv, predictions.json, overlays/*.png: image | heatmap | decision)."
    )
    print(f"Open the report in a browser: {result['report']}")
    if result["mode"] == "offline-demo":
        from ..hub_availability import download_commands, local_dir_name
        from ..presets import load_preset

        preset = load_preset(DEFAULT_PRESET)
        backbones = [preset.clip_backbone, preset.dino_backbone]
        clip, dino = (local_dir_name(backbone) for backbone in backbones)
        downloads = "".join(f"  {command}\n" for command in download_commands(backbones))
        print(
            f"This was the OFFLINE DEMO model (small random backbones), saved in {output}/demo-model.\n"
            "To run the real Crane+ model, on a machine that reaches the Hugging Face Hub:\n"
            f"  crane-hf predict IMAGES --model {DEFAULT_PRESET}\n"
            f"or download the backbones into folders where the Hub is reachable, copy them here and point at them:\n"
            f"{downloads}"
            f"  crane-hf predict IMAGES --model {DEFAULT_PRESET} --clip {clip} --dino {dino}"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", default="crane-hf-demo", type=local_path, help="folder to write (default: %(default)s)"
    )
    parser.add_argument(
        "--model", type=local_path, default=DEFAULT_PRESET, help="preset, model folder or Hub id (online mode)"
    )
    parser.add_argument("--offline", action="store_true", help="skip the Hub: run the small offline demo model")
    parser.add_argument("--steps", type=int, default=40, help="training steps of the offline demo prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example images and the offline demo model")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    try:
        require_positive("--steps", args.steps)
        result = run_demo(args.output, args.model, args.offline, args.steps, args.seed, args.overwrite, not args.quiet)
    except (OSError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    _print_summary(result)
    return 0
