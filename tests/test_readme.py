"""Every command and snippet of the README runs, in order, as a new user would run them.

The Hub is replaced by a Hugging Face cache holding small stand-ins for the two paper backbones (with the CLIP
token embeddings the official prompts were trained with, so the presets' fingerprint check passes), and
HF_HUB_OFFLINE=1; the `pip install` prefixes are left to CI, which runs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from transformers import Dinov2WithRegistersModel

from .tiny_models import (
    fingerprint_compatible_clip,
    populate_hub_cache,
    randomize_,
    tiny_dino_config,
    write_test_images,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.DOTALL)


DEVELOPMENT = "\n## Development\n"


def readme_sections() -> tuple[str, str]:
    """The README up to its Development section (a user's commands) and that section (run from the repository)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as stream:
        readme = stream.read()
    assert DEVELOPMENT in readme
    user, development = readme.split(DEVELOPMENT, 1)
    return user, development.split("\n## ", 1)[0]


def readme_script() -> str:
    """The README's user code blocks as one bash script (python blocks as here-documents), in document order."""
    lines = ["set -euo pipefail"]
    for language, code in BLOCK.findall(readme_sections()[0]):
        if language == "python":
            lines.append(f"python - <<'PYTHON'\n{code}PYTHON")
            continue
        for command in code.replace("\\\n", " ").splitlines():
            command = re.sub(r"^pip install [^&]*&&\s*", "", command.split("  #")[0].strip())
            if command and "pytest" not in command:
                lines.append(command)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    # as on the Hub: the paper CLIP's config carries OpenAI's special ids (eos 2); 14 x 14 patches at 518 pixels
    clip = fingerprint_compatible_clip("crane+/mvtec", patch_size=37, openai_hub_ids=True)
    dino = randomize_(Dinov2WithRegistersModel(tiny_dino_config()), seed=4)
    populate_hub_cache(work / "hf-home", "openai/clip-vit-large-patch14-336", clip)
    populate_hub_cache(work / "hf-home", "facebook/dinov2-with-registers-base", dino)
    clip.save_pretrained(work / "clip-vit-large-patch14-336")
    dino.save_pretrained(work / "dinov2-with-registers-base")
    paths = write_test_images(work / "images", count=2, size=(90, 120))
    shutil.move(paths[0], work / "images" / "part.png")
    shutil.move(paths[1], work / "images" / "other.png")
    write_test_images(work / "normal-images", count=6, size=(90, 120), seed=9)
    return work


def test_readme_runs_end_to_end(workspace):
    script = readme_script()
    assert "crane-hf demo" in script and "crane-hf predict" in script and "crane-hf calibrate" in script
    env = {
        **os.environ,
        "HF_HOME": str(workspace / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(workspace / "modules"),
        "TQDM_DISABLE": "1",
    }
    result = subprocess.run(
        ["bash", "-c", script], cwd=workspace, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "OFFLINE DEMO" not in result.stderr  # the backbones were found in the cache: the real workflow ran
    for folder in ("crane-hf-demo/predictions", "results", "results-local"):
        with open(workspace / folder / "predictions.json") as stream:
            assert json.load(stream)["predictions"], folder
    assert (workspace / "part-heatmap.png").is_file()
    assert json.loads((workspace / "crane-plus-mvtec" / "config.json").read_text())["backbones_in_checkpoint"] is False
    assert (workspace / "crane-plus-mvtec" / "calibration.json").is_file()
    assert {"README.md", "model.safetensors", "config.json"} <= set(os.listdir(workspace / "hub-folder"))


def test_readme_development_commands_run_from_the_repository():
    """The Development section's benchmark command runs, narrowed to one configuration pair at batch 1."""
    commands = [
        command.split("  #")[0].strip()
        for language, code in BLOCK.findall(readme_sections()[1])
        for command in code.splitlines()
        if language == "bash" and command.strip()
    ]
    assert commands and all(command.startswith("python benchmarks/") for command in commands), commands
    narrowing = ["--batch-sizes", "1", "--rows", "floor-clip", "crane", "--interleave", "0"]
    for command in commands:
        argv = command.split()
        assert argv[1] == "benchmarks/inference.py", command  # the narrowing flags are the inference benchmark's
        result = subprocess.run(
            [sys.executable, *argv[1:], *narrowing], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        table = [line for line in result.stdout.splitlines() if line.startswith("| Crane |")]
        assert len(table) == 1, result.stdout[-3000:]
        ratio = float(table[0].split("|")[8])  # "x floor": Crane's time over the CLIP floor's (not asserted)
        assert ratio > 0, table[0]
