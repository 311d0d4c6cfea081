"""Tiny random CLIP / DINOv2 configurations (as transformers' own tests use) and models built from them."""

from __future__ import annotations

import os

import torch
from transformers import CLIPConfig, Dinov2WithRegistersConfig

from crane_hf import CraneConfig, CraneForAnomalyDetection
from crane_hf.small_backbones import small_clip_config, small_dino_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
OFFICIAL_DIR = os.path.join(FIXTURES, "crane_official")
OFFICIAL_FILES = sorted(f for f in os.listdir(OFFICIAL_DIR) if f.endswith(".pth"))
TINY_SIZE = 56  # 4 x 4 patches of 14 pixels


def tiny_clip_config(vision_layers: int = 6, width: int = 32) -> CLIPConfig:
    """A CLIP with the real 49408-token vocabulary (prompt ids are real CLIP BPE ids) and tiny towers."""
    return small_clip_config(width=width, vision_layers=vision_layers, image_size=TINY_SIZE)


def tiny_dino_config() -> Dinov2WithRegistersConfig:
    return small_dino_config(width=24, image_size=TINY_SIZE)


def tiny_config(variant: str = "crane", **overrides) -> CraneConfig:
    """Crane: E-Attn in the last 5 of 6 layers, maps from layers 2, 4, 6. Crane+: layer 6, D-Attn + E-Attn."""
    overrides.setdefault("image_size", TINY_SIZE)
    overrides.setdefault("num_deep_prompts", 2)
    overrides.setdefault("eattn_layers", 5)
    if variant == "crane":
        overrides.setdefault("feature_layers", [2, 4, 6])
    dino = tiny_dino_config() if variant == "crane+" else None
    return CraneConfig.for_variant(variant, tiny_clip_config(), dino, **overrides)


def randomize_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight so that LayerNorm scales, biases and registers are not at their symmetric inits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def fill_deterministically_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with values drawn in the order of the sorted parameter names (LayerNorm-style
    1-D weights near 1, everything else small), so that the weights do not depend on transformers' initialization
    (used for expected outputs stored as fixtures)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            values = torch.randn(parameter.shape, generator=generator)
            is_norm_weight = parameter.dim() == 1 and "norm" in name and name.endswith("weight")
            parameter.copy_(1.0 + 0.1 * values if is_norm_weight else 0.05 * values)
    return model


def tiny_model(variant: str = "crane", seed: int = 0, **overrides) -> CraneForAnomalyDetection:
    torch.manual_seed(seed)
    return randomize_(CraneForAnomalyDetection(tiny_config(variant, **overrides)), seed=seed).eval()


def save_tiny_model_folder(folder, variant: str = "crane+", **overrides) -> str:
    """A complete model folder (weights, config, image processor, code) of a tiny random model: `save_pretrained`
    writes all of it."""
    tiny_model(variant, **overrides).save_pretrained(folder)
    return str(folder)


def write_test_images(folder, count: int = 4, size: tuple[int, int] = (48, 64), seed: int = 0) -> list[str]:
    """Small RGB PNGs with a bright square on some of them."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        pixels = rng.integers(60, 120, (*size, 3), dtype=np.uint8)
        if index % 2:
            pixels[10:20, 20:34] = (250, 30, 30)
        path = os.path.join(folder, f"part_{index}.png")
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


# The special ids of OpenAI's own CLIP configs on the Hub (openai/clip-vit-large-patch14-336 among them).
OPENAI_HUB_SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def fingerprint_compatible_clip(
    preset_name: str = "crane+/mvtec", vision_layers: int = 24, patch_size: int = 14, openai_hub_ids: bool = False
):
    """A small CLIP with the paper's text width and depth and the preset's fixed-token embeddings, so that the
    preset's fingerprint check accepts it (the vision tower is tiny; `patch_size=37` makes 518-pixel inputs cheap).
    `openai_hub_ids`: the special ids of OpenAI's Hub configs (eos_token_id 2) instead of the tokenizer's."""
    from transformers import CLIPModel

    from crane_hf.presets import load_preset

    config = CLIPConfig(
        projection_dim=768,
        text_config={
            "hidden_size": 768,
            "intermediate_size": 64,
            "num_hidden_layers": 9,
            "num_attention_heads": 12,
            "vocab_size": 49408,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            **(OPENAI_HUB_SPECIAL_IDS if openai_hub_ids else {}),
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
            "image_size": TINY_SIZE if patch_size == 14 else 2 * patch_size,
            "patch_size": patch_size,
            "projection_dim": 768,
        },
    )
    torch.manual_seed(0)
    clip = CLIPModel(config)
    preset = load_preset(preset_name)
    with torch.no_grad():
        clip.text_model.embeddings.token_embedding.weight[preset.fingerprint_token_ids] = preset.fingerprint_embeddings
    return clip


def populate_hub_cache(hf_home, repo_id: str, model, **save_kwargs) -> str:
    """Store `model` in a Hugging Face cache at `hf_home` as if `repo_id` had been downloaded from the Hub
    (`save_kwargs` go to its `save_pretrained`, e.g. `include_backbones=False`)."""
    commit = "0" * 40
    repo_dir = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    model.save_pretrained(snapshot, **save_kwargs)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as stream:
        stream.write(commit)
    return snapshot


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for the rendezvous of multi-process tests)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_environment() -> dict[str, str]:
    """Environment of a child Python process: this checkout's crane_hf first, one thread, no Hub."""
    import crane_hf

    source_root = os.path.dirname(os.path.dirname(os.path.abspath(crane_hf.__file__)))
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([source_root, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


def launch_two_processes(module: str) -> list[str]:
    """`accelerate launch` of `python -m module` on 2 processes (gloo on a machine without a GPU), free port."""
    from crane_hf.commands.process_launch import accelerate_launch_command

    return accelerate_launch_command(module, 2)


def run_process_group(command: list[str], env: dict, timeout: float, cwd=None):
    """Run a command (e.g. `accelerate launch` and its workers) in its own process group; on timeout, kill the whole
    group so no worker outlives the test, then raise `subprocess.TimeoutExpired`."""
    import signal
    import subprocess

    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
