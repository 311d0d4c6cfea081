"""The command-line options that override what a model computes (`--soft-mean`, `--eattn-maps`, `--dattn-input`,
`--deep-prompt-rounding`), shared by `crane-hf predict`, `calibrate`, `evaluate`, `train` and `convert`.

Imports nothing heavy, so that `--help` is fast: the choices repeat those of the `CraneConfig` fields
(`models/crane/configuration_crane.py`, which imports transformers; `tests/test_cli.py` checks they agree). The
values are validated where the model is built (`model_loading.load_model`, `CraneForAnomalyDetection.from_backbones`),
as any `CraneConfig` override is.
"""

from __future__ import annotations

import argparse
from typing import Any

# The choices of CraneConfig.eattn_map_source, .dattn_input and .deep_prompt_rounding_dtype ("none": None).
EATTN_MAP_SOURCES = ("last_layer", "per_layer")
DATTN_INPUTS = ("after_attention", "layer_input")
DEEP_PROMPT_ROUNDING_CHOICES = ("float16", "bfloat16", "none")
COMPUTATION_FIELDS = ("soft_mean", "eattn_map_source", "dattn_input", "deep_prompt_rounding_dtype")


def add_computation_arguments(
    parser: argparse.ArgumentParser,
    title: str = "computation (default: the model's config; presets and converted official checkpoints: the "
    "published code's)",
) -> None:
    """Options that override what the model computes (`computation_overrides` reads them back)."""
    group = parser.add_argument_group(title)
    group.add_argument(
        "--soft-mean",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average the maps' anomaly probabilities (--soft-mean) or softmax their averaged logits (--no-soft-mean)",
    )
    group.add_argument(
        "--eattn-maps",
        dest="eattn_map_source",
        choices=EATTN_MAP_SOURCES,
        default=None,
        help="E-Attn maps from the e stream after the last layer (last_layer, the published code) or after each "
        "feature layer (per_layer)",
    )
    group.add_argument(
        "--dattn-input",
        choices=DATTN_INPUTS,
        default=None,
        help="o stream point D-Attn reads: after the layer's attention (after_attention, the published code) or the "
        "layer input (layer_input)",
    )
    group.add_argument(
        "--deep-prompt-rounding",
        dest="deep_prompt_rounding_dtype",
        choices=DEEP_PROMPT_ROUNDING_CHOICES,
        default=None,
        help="dtype the deep prompts are rounded through (float16: the published code; none: no rounding)",
    )


def computation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `CraneConfig` overrides given with `add_computation_arguments`'s options (only those given)."""
    overrides = {
        name: getattr(args, name, None) for name in COMPUTATION_FIELDS if getattr(args, name, None) is not None
    }
    if overrides.get("deep_prompt_rounding_dtype") == "none":
        overrides["deep_prompt_rounding_dtype"] = None
    return overrides
