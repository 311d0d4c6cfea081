"""`crane-hf push`: publish a complete, self-contained Hub repository for a Crane model.

The repository holds config.json (with `auto_map` and `custom_pipelines`), model.safetensors (backbones and
prompts), preprocessor_config.json, the model and pipeline code, and a generated model card, so that
`pipeline("zero-shot-anomaly-detection", model=repo_id, trust_remote_code=True)` works without crane_hf installed.
`--dry-run OUT_DIR` writes exactly the folder that would be uploaded. `--space DIR` also writes a Hugging Face Space
folder running `crane-hf app` on the published model (`crane_hf.reporting.space`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from ..io.atomic import atomic_output_dir
from ..io.output_safety import check_output_dir, protected_paths
from .cli_support import local_path, one_line

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

PIPELINE_TAG = "image-segmentation"  # the Hub has no anomaly-detection task; maps are per-pixel segmentations
TAGS = ["anomaly-detection", "zero-shot-anomaly-detection", "crane", "clip", "industrial-inspection"]
METRIC_NAMES = {"image": ("AUROC", "AP", "F1-max"), "pixel": ("AUROC", "AUPRO", "F1-max")}


def known_results(model: Any) -> list[dict[str, Any]]:
    """Published results of the model's preset, plus any `evaluation_results` stored in its config."""
    results: list[dict[str, Any]] = []
    preset_name = getattr(model.config, "preset", None)
    if preset_name:
        from ..presets import load_preset

        for item in load_preset(preset_name).published_results:
            results.append(
                {**item, "source": "Crane paper, official prompts", "source_url": "https://arxiv.org/abs/2504.11055"}
            )
    results.extend(getattr(model.config, "evaluation_results", None) or [])
    return results


def build_model_card(model: Any, repo_id: str) -> ModelCard:
    """A model card with license, pipeline tag, tags, known metrics and a usage snippet."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = model.config
    eval_results = [
        EvalResult(
            task_type=PIPELINE_TAG,
            task_name="Zero-shot anomaly detection",
            dataset_type=item["dataset"].lower().replace("-", "_"),
            dataset_name=item["dataset"],
            metric_type=f"{level}-{metric.lower()}",
            metric_name=f"{level.capitalize()} {metric}",
            metric_value=value,
            source_name=item.get("source") if item.get("source_url") else None,
            source_url=item.get("source_url"),
        )
        for item in known_results(model)
        for level in ("image", "pixel")
        for metric, value in zip(METRIC_NAMES[level], item[level])
    ]
    backbones = [b for b in (config.clip_backbone, config.dino_backbone if config.use_dattn else None) if b]
    data = ModelCardData(
        license="mit",
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=[*TAGS, *(["dinov2"] if config.use_dattn else [])],
        base_model=[b for b in backbones if not os.path.isabs(b)] or None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    variant = "Crane+ (CLIP with E-Attn and DINOv2 D-Attn)" if config.use_dattn else "Crane (CLIP with E-Attn)"
    preset = getattr(config, "preset", None)
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{variant} for zero-shot anomaly detection: an anomaly score and a pixel heatmap for images of objects the "
        "model has never seen, without normal training images "
        "([Crane](https://arxiv.org/abs/2504.11055), packaged with crane_hf).",
        "",
        f"- Backbones: {', '.join(backbones) or 'see config.json'}",
        f"- Input size {config.image_size} x {config.image_size}; feature layers {config.feature_layers}; "
        f"soft_mean {config.soft_mean}; thresholds: image {config.image_threshold}, pixel {config.pixel_threshold}",
    ]
    published = "the published Crane code's" if config.computes_published_code else "differs from the published code's"
    lines.append(
        f"- Computation ({published}): E-Attn maps `{config.eattn_map_source}`, D-Attn input `{config.dattn_input}`, "
        f"deep prompts rounded to `{config.deep_prompt_rounding_dtype}`"
    )
    if preset:
        lines.append(f"- Prompts: the official Crane prompts, preset `{preset}`")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'detector = pipeline("zero-shot-anomaly-detection", model="{repo_id}", trust_remote_code=True)',
        'result = detector("part.png", return_overlay=True)',
        'print(result["score"], result["is_anomalous"])   # image score in [0, 1] and the decision',
        'heatmap = result["anomaly_map"]                    # float32 [H, W], smoothed',
        'result["overlay"].save("part-heatmap.png")',
        "```",
        "",
        "Images are resized with Pillow's bicubic filter, as the published Crane code does. Pillow 13 rounds about a "
        "quarter of the resized pixels one level differently from Pillow 12, which moves scores by about 1e-3; the "
        "numbers of this model were computed with `pillow<13`.",
        "",
        "The `crane-hf` command line comes with the crane_hf package, which no package index serves: install it from "
        "a clone of its source repository (`pip install -e .` in the clone). With it installed, `trust_remote_code` "
        "is not needed, and:",
        "",
        "```bash",
        f"crane-hf predict images/ --model {repo_id} --output results/",
        "```",
    ]
    results = known_results(model)
    if results:
        lines += [
            "",
            "## Results",
            "",
            "| dataset | image AUROC | AP | F1-max | pixel AUROC | AUPRO | F1-max | source |",
        ]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for item in results:
            values = " | ".join(f"{v}" for v in [*item["image"], *item["pixel"]])
            lines.append(f"| {item['dataset']} | {values} | {item.get('source', '')} |")
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return ModelCard(content)


def write_repository_folder(model: Any, processor: Any, folder: str, repo_id: str) -> None:
    """Write everything the Hub repository holds into `folder` (which must exist and be empty)."""
    from ..model_loading import make_pipeline

    make_pipeline(model, processor).save_pretrained(folder)
    build_model_card(model, repo_id).save(os.path.join(folder, "README.md"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=local_path, help="model folder, preset name or Hub id to publish")
    parser.add_argument("--repo-id", required=True, help="Hub repository, e.g. my-org/crane-plus-pcb")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument(
        "--dry-run",
        metavar="OUT_DIR",
        default=None,
        type=local_path,
        help="write the folder here instead of uploading",
    )
    parser.add_argument(
        "--space",
        metavar="SPACE_DIR",
        default=None,
        type=local_path,
        help="also write a Gradio Space folder running the app on the model",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dry-run or --space folder")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.add_argument("--clip", type=local_path, default=None, help="local CLIP folder for a preset")
    parser.add_argument("--dino", type=local_path, default=None, help="local DINOv2 folder for a preset")
    parser.add_argument(
        "--allow-backbone-mismatch", action="store_true", help="accept a --clip unlike the preset's fingerprint"
    )


def run(args: argparse.Namespace) -> int:
    from ..model_loading import load_model

    try:
        protected = [
            *protected_paths("the model folder", [args.model]),
            *protected_paths("a backbone", [args.clip, args.dino]),
        ]
        if args.dry_run:
            check_output_dir(args.dry_run, args.overwrite, protected)
        if args.space:
            _check_space_folder(args, protected)
        model, processor = load_model(
            args.model,
            clip=args.clip,
            dino=args.dino,
            allow_backbone_mismatch=args.allow_backbone_mismatch,
            device="cpu",
            allow_exported=False,
        )
        if args.dry_run:
            with atomic_output_dir(args.dry_run, args.overwrite, protected, command="push --dry-run") as staging:
                write_repository_folder(model, processor, staging, args.repo_id)
            size = sum(os.path.getsize(os.path.join(args.dry_run, name)) for name in os.listdir(args.dry_run))
            print(f"Wrote the repository folder for {args.repo_id} to {args.dry_run} ({size / 2**20:.1f} MiB)")
            return _write_space(args, protected)
        from huggingface_hub import HfApi

        api = HfApi(token=args.token)
        with tempfile.TemporaryDirectory() as staging:
            write_repository_folder(model, processor, staging, args.repo_id)
            api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
            api.upload_folder(
                folder_path=staging, repo_id=args.repo_id, commit_message="Upload Crane model with crane-hf"
            )
    except (OSError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"Published https://huggingface.co/{args.repo_id}")
    return _write_space(args, protected)


def _check_space_folder(args: argparse.Namespace, protected: list[tuple[str, str]]) -> None:
    """Refuse, before the model is loaded, a --space folder that is, holds or lies in the --dry-run folder, or that
    `check_output_dir` refuses."""
    if args.dry_run:
        space, dry_run = os.path.realpath(args.space), os.path.realpath(args.dry_run)
        if os.path.commonpath([space, dry_run]) in (space, dry_run):
            raise ValueError(
                f"--space {args.space} and --dry-run {args.dry_run} must be separate folders, neither inside the "
                "other."
            )
    check_output_dir(args.space, args.overwrite, protected)


def _write_space(args: argparse.Namespace, protected: list[tuple[str, str]]) -> int:
    """With --space: the Space folder of the app on `args.repo_id` (`reporting/space.py`)."""
    if not args.space:
        return 0
    from ..reporting.space import write_space_folder

    try:
        with atomic_output_dir(args.space, args.overwrite, protected, command="push --space") as staging:
            write_space_folder(staging, args.repo_id)
    except (OSError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"Wrote the Space folder (app.py, requirements.txt, README.md) to {args.space}")
    return 0
