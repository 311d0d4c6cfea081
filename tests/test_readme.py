"""Every command and snippet of the README, docs/*.md and the examples runs, as a new user would run them.

- The README's user part runs end to end, in order. The Hub is replaced by a Hugging Face cache holding small
  stand-ins for the two paper backbones (with the CLIP token embeddings the official prompts were trained with, so the
  presets' fingerprint check passes), and HF_HUB_OFFLINE=1; the `pip install` prefixes are left to CI, which runs
  them; each `hf download` is parsed by the installed `hf` CLI (it needs the Hub) and the folder it names is given the
  stand-in of its repository, so the next snippet, which points at the folders, runs.
- The Development section's benchmark command runs, narrowed.
- Every shell command of docs/*.md and of the examples' docstrings runs in a fresh folder, in order, where it can run
  here; a command that needs what a test machine lacks (a dataset under /data, the paper's backbones at full size,
  several GPUs, minutes of benchmark timing) runs up to its argument parsing, by the program's own parser (and
  accelerate's for `accelerate launch`), so that a stale option, choice or value fails.
- Every command quoted in the prose of the README and the docs (`crane-hf evaluate --strict`) that runs one of the
  project's programs is accepted by their parsers (required arguments it leaves out aside).
- The docs' python snippets run: docs/data.md against stand-in datasets at the paths it names, docs/metrics.md with
  small arrays and a tiny model for the names it uses.
- `--help` of every benchmark and example script; every `hf download` in the README, the docs, the error messages and
  the demo parses with huggingface_hub's `hf download` (one repository, into a --local-dir folder).
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import click
import pytest
from transformers import Dinov2WithRegistersModel

from crane_hf.presets import list_presets

from .image_files import write_image, write_mask
from .tiny_models import (
    fingerprint_compatible_clip,
    populate_hub_cache,
    randomize_,
    tiny_dino_config,
    write_test_images,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.DOTALL)
ANY_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))
BENCHMARKS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
PROGRAMS = ("python ", "accelerate ", "crane-hf ", "hf ", "... ")
BACKBONES = ("openai/clip-vit-large-patch14-336", "facebook/dinov2-with-registers-base")


DEVELOPMENT = "\n## Development\n"


def readme_sections() -> tuple[str, str]:
    """The README up to its Development section (a user's commands) and that section (run from the repository)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as stream:
        readme = stream.read()
    assert DEVELOPMENT in readme
    user, development = readme.split(DEVELOPMENT, 1)
    return user, development.split("\n## ", 1)[0]


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped; a line starting with "..." is the
    command before it with more arguments."""
    commands: list[str] = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()
        if not line or line.startswith("#"):
            continue
        commands.append(f"{commands[-1]} {line[4:]}" if line.startswith("... ") and commands else line)
    return commands


def hf_download(command: str) -> dict:
    """`hf download ...` parsed by the installed huggingface_hub's own CLI, without running it (it needs the Hub).

    Raises:
        click.UsageError: a command `hf download` would refuse (unknown option, missing repository id).
    """
    from huggingface_hub.cli.hf import app

    argv = shlex.split(command)
    assert argv[:2] == ["hf", "download"], command
    context = click.Context(app, info_name="hf")
    download = app.get_command(context, "download")
    download = download.materialize() if hasattr(download, "materialize") else download  # hf imports it lazily
    return download.make_context("download", argv[2:], parent=context).params


def readme_script() -> tuple[str, list[str]]:
    """The README's user code blocks as one bash script (python blocks as here-documents), in document order, and
    its `hf download` commands (left out of the script: they need the Hub)."""
    lines = ["set -euo pipefail"]
    downloads = []
    for language, code in BLOCK.findall(readme_sections()[0]):
        if language == "python":
            lines.append(f"python - <<'PYTHON'\n{code}PYTHON")
            continue
        for command in shell_commands(code):
            command = re.sub(r"^pip install [^&]*&&\s*", "", command)
            if command.startswith("hf download "):
                downloads.append(command)
            elif "pytest" not in command:
                lines.append(command)
    return "\n".join(lines) + "\n", downloads


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    # as on the Hub: the paper CLIP's config carries OpenAI's special ids (eos 2); 14 x 14 patches at 518 pixels
    clip = fingerprint_compatible_clip("crane+/mvtec", patch_size=37, openai_hub_ids=True)
    dino = randomize_(Dinov2WithRegistersModel(tiny_dino_config()), seed=4)
    stand_ins = dict(zip(BACKBONES, (clip, dino)))
    for repo_id, model in stand_ins.items():
        populate_hub_cache(work / "hf-home", repo_id, model)
    _, downloads = readme_script()
    assert sorted(hf_download(command)["repo_id"] for command in downloads) == sorted(BACKBONES)
    for command in downloads:  # what `hf download ID --local-dir DIR` writes: the repository's files in DIR
        params = hf_download(command)
        stand_ins[params["repo_id"]].save_pretrained(work / params["local_dir"])
    paths = write_test_images(work / "images", count=2, size=(90, 120))
    shutil.move(paths[0], work / "images" / "part.png")
    shutil.move(paths[1], work / "images" / "other.png")
    write_test_images(work / "normal-images", count=6, size=(90, 120), seed=9)
    return work


def test_readme_runs_end_to_end(workspace):
    script, _ = readme_script()
    assert "crane-hf demo" in script and "crane-hf predict" in script and "crane-hf calibrate" in script
    env = {
        **os.environ,
        "HF_HOME": str(workspace / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(workspace / "modules"),
        "TQDM_DISABLE": "1",
    }
    result = subprocess.run(
        ["bash", "-c", script], cwd=workspace, env=env, capture_output=True, text=True, timeout=2400
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "OFFLINE DEMO" not in result.stderr  # the backbones were found in the cache: the real workflow ran
    for folder in ("crane-hf-demo/predictions", "results", "results-local"):
        with open(workspace / folder / "predictions.json") as stream:
            assert json.load(stream)["predictions"], folder
    assert (workspace / "part-heatmap.png").is_file()
    saved = json.loads((workspace / "crane-plus-mvtec" / "config.json").read_text())
    assert saved["backbones_in_checkpoint"] is False and "zero-shot-anomaly-detection" in saved["custom_pipelines"]
    assert (workspace / "crane-plus-mvtec" / "preprocessor_config.json").is_file()
    assert (workspace / "crane-plus-mvtec" / "calibration.json").is_file()
    assert {"README.md", "model.safetensors", "config.json"} <= set(os.listdir(workspace / "hub-folder"))
    # both training commands: the real one (backbones from the cache) and the offline trial on random backbones
    for run, clip in (("my-prompts", BACKBONES[0]), ("random-prompts", str(workspace / "small-backbones" / "clip"))):
        assert json.loads((workspace / run / "config.json").read_text())["clip_backbone"] == clip, run
    assert "MEANINGLESS" in (workspace / "small-backbones" / "clip" / "README.md").read_text()


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


def readme_shown_commands() -> list[str]:
    """The commands of the README's user blocks that are shown rather than run (```shell: `crane-hf app` starts a
    server that runs until stopped), `pip install ... &&` prefixes removed."""
    commands = []
    for language, code in ANY_BLOCK.findall(readme_sections()[0]):
        if language in ("python", "bash"):
            continue
        for command in shell_commands(code):
            command = re.sub(r"^pip install [^&]*&&\s*", "", command)
            assert language == "shell" and command.startswith(PROGRAMS), f"README ```{language}: {command}"
            commands.append(command)
    return commands


def test_readme_commands_shown_but_not_run_parse():
    """The README's ```shell commands (not run by `test_readme_runs_end_to_end`) are accepted by their programs'
    parsers: the app's command line cannot go stale."""
    commands = readme_shown_commands()
    assert any(command.startswith("crane-hf app ") for command in commands), commands
    for command in commands:
        parse_only(command, ROOT)


def docstring_commands(path: str) -> list[str]:
    """The commands shown in a script's docstring: indented lines that start with a program, continuations joined."""
    with open(path, encoding="utf-8") as stream:
        docstring = ast.get_docstring(ast.parse(stream.read())) or ""
    lines = [line.strip() for line in docstring.replace("\\\n", " ").splitlines() if line.startswith("    ")]
    return [line.split("  #")[0].strip() for line in lines if line.startswith(PROGRAMS)]


def documented_commands() -> dict[str, list[str]]:
    """The shell commands of docs/*.md (bash blocks) and of the examples' docstrings, per file, in order."""
    commands = {}
    for path in DOCS:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
        for language, code in ANY_BLOCK.findall(text):
            first = code.strip().splitlines()[0] if code.strip() else ""
            assert language == "bash" or not first.startswith(PROGRAMS), f"{path}: label the block ```bash: {first}"
        commands[path] = [
            command for code in re.findall(r"```bash\n(.*?)```", text, re.DOTALL) for command in shell_commands(code)
        ]
    for path in EXAMPLES:
        commands[path] = docstring_commands(path)
    return {path: found for path, found in commands.items() if found}


def needs_elsewhere(command: str) -> str | None:
    """Why a documented command cannot run on a test machine (then it runs up to its argument parsing), or None."""
    if "/data/" in command:
        return "a dataset under /data"
    if "--shape paper" in command:
        return "the paper's backbones at full size"
    if "--multi_gpu" in command:
        return "several GPUs"
    if "my-model/" in shlex.split(command):
        return "the reader's own model folder"
    if "--help" not in command and set(shlex.split(command)) & set(list_presets()):
        return "a preset's backbones (CLIP ViT-L/14@336, DINOv2) from the Hub"
    if command.startswith("python benchmarks/") and "--help" not in command:
        return "minutes of benchmark timing (the README's Development test runs the inference benchmark narrowed)"
    return None


# Runs a program up to its argument parsing: argparse's parse_args parses with the program's own parser (unknown
# options, choices and types are refused as usual), then the program stops before any work.
PARSE_ONLY = textwrap.dedent(
    """
    import argparse, os, runpy, sys

    if os.environ.get("PARSE_FRAGMENT") == "1":  # a command quoted in prose may leave out required arguments
        parse_known_args = argparse.ArgumentParser.parse_known_args

        def parse_fragment(self, args=None, namespace=None):
            for action in self._actions:
                action.required = False
                if not action.option_strings and action.nargs in (None, "+"):
                    action.nargs = "?" if action.nargs is None else "*"
            return parse_known_args(self, args, namespace)

        argparse.ArgumentParser.parse_known_args = parse_fragment

    def parse_and_stop(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error("unrecognized arguments: " + " ".join(extras))
        print("ARGUMENTS PARSED")
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = parse_and_stop
    kind, target, *arguments = sys.argv[1:]
    sys.argv = [target, *arguments]
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python script.py` does
        runpy.run_path(target, run_name="__main__")
    raise SystemExit("the program did not parse its arguments")
    """
)


def python_program(argv: list[str]) -> tuple[str, str, list[str]]:
    """("module" | "script", target, arguments) of a python command line (`crane-hf` is the module crane_hf.cli)."""
    if argv[0] == "crane-hf":
        return "module", "crane_hf.cli", argv[1:]
    assert argv[0] == "python", argv
    return ("module", argv[2], argv[3:]) if argv[1] == "-m" else ("script", argv[1], argv[2:])


def parse_only(command: str, cwd, fragment: bool = False) -> None:
    """Check `command` with the parsers of the programs it runs (accelerate's and the launched program's); a
    `fragment` may leave out required arguments (its options and values are still checked)."""
    argv = shlex.split(command)
    if argv[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        try:
            launch = launch_command_parser().parse_args(argv[2:])
        except SystemExit:
            pytest.fail(f"accelerate launch refuses its options: {command}")
        target = launch.training_script
        argv = ["python", *(["-m"] if launch.module else []), target, *launch.training_script_args]
    kind, target, arguments = python_program(argv)
    result = subprocess.run(
        [sys.executable, "-c", PARSE_ONLY, kind, target, *arguments],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PARSE_FRAGMENT": "1" if fragment else "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    answered = "ARGUMENTS PARSED" in result.stdout or ("--help" in arguments and result.stdout.startswith("usage:"))
    assert result.returncode == 0 and answered, (command, result.stderr[-3000:])


def repository_workspace(tmp_path):
    """A fresh folder that sees the repository's examples/ and benchmarks/ (the commands name them relatively)."""
    for name in ("examples", "benchmarks"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("path", list(documented_commands()), ids=lambda path: os.path.relpath(path, ROOT))
def test_documented_commands_run(path, tmp_path):
    """Each shell command of a doc or an example's docstring, in order, in one fresh folder: run where it can run
    here, else parsed by its programs (see `needs_elsewhere`)."""
    work = repository_workspace(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "TQDM_DISABLE": "1"}
    for command in documented_commands()[path]:
        if needs_elsewhere(command):
            parse_only(command, work)
            continue
        result = subprocess.run(
            ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])


INLINE_COMMAND = re.compile(r"`((?:crane-hf|python|accelerate) [^`]*)`")
PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z_]+|.*[<\[].*)$")  # "...", MODEL, N, <dataset>, [--overwrite]


def inline_commands() -> dict[str, list[str]]:
    """The commands quoted in the prose of the README and docs/*.md (`crane-hf evaluate --strict`) that run one of
    the project's programs (crane-hf, python -m crane_hf..., python benchmarks/ or examples/ scripts, accelerate
    launch of either), without placeholders; per file."""
    found = {}
    for path in [os.path.join(ROOT, "README.md"), *DOCS]:
        with open(path, encoding="utf-8") as stream:
            prose = ANY_BLOCK.sub("", stream.read())
        commands = []
        for command in INLINE_COMMAND.findall(" ".join(prose.split())):
            argv = shlex.split(command)
            if any(PLACEHOLDER.match(word) for word in argv[1:]):
                continue
            if argv[0] == "accelerate":
                if argv[1] != "launch" or not any(word == "-m" or word.endswith(".py") for word in argv):
                    continue
            elif argv[0] == "python":
                ours = argv[1] == "-m" and argv[2].startswith("crane_hf")
                if not (ours or argv[1].startswith(("benchmarks/", "examples/"))):
                    continue  # python -X importtime, python -m pytest: not the project's programs
            commands.append(command)
        if commands:
            found[path] = list(dict.fromkeys(commands))
    return found


@pytest.mark.parametrize("path", list(inline_commands()), ids=lambda path: os.path.relpath(path, ROOT))
def test_commands_quoted_in_the_prose_parse(path):
    """Each command quoted in the prose is accepted by its programs' parsers (required arguments it leaves out
    aside): no stale option, choice or value; `--help` answers."""
    for command in inline_commands()[path]:
        parse_only(command, ROOT, fragment=True)


def test_the_prose_quotes_commands():
    quoted = [command for commands in inline_commands().values() for command in commands]
    assert "python benchmarks/calibrate_memory.py --images 20 200" in quoted
    assert "crane-hf evaluate --strict" in quoted and "crane-hf --help" in quoted
    assert not any(command.startswith("python -m pytest") for command in quoted)


def test_the_examples_train_offline_end_to_end(tmp_path):
    """examples/train_crane.py shows one training that runs offline (random backbones) and the real ones."""
    commands = docstring_commands(os.path.join(ROOT, "examples", "train_crane.py"))
    runnable = [command for command in commands if not needs_elsewhere(command)]
    assert any("--clip small-backbones/clip" in command for command in runnable), runnable
    assert any("/data/" in command and "--clip" not in command for command in commands), commands  # the real one
    with open(os.path.join(ROOT, "examples", "train_crane.py"), encoding="utf-8") as stream:
        assert "MEANINGLESS" in stream.read()


def stand_in_datasets(root) -> None:
    """Miniature datasets at the paths docs/data.md names: MVTec-AD (class bottle), VisA (split CSV), a generic
    layout (my_parts) and a meta.json dataset (btad)."""
    for dataset, name in (("mvtec", "bottle"), ("my_parts", "widget"), ("btad", "01")):
        folder = os.path.join(root, dataset, name)
        write_image(os.path.join(folder, "train", "good", "000.png"))
        write_image(os.path.join(folder, "test", "good", "000.png"))
        write_image(os.path.join(folder, "test", "broken", "000.png"), value=200)
        write_mask(os.path.join(folder, "ground_truth", "broken", "000_mask.png"))
    entries = [("train/good/000.png", "", "good", 0), ("test/good/000.png", "", "good", 0)]
    entries.append(("test/broken/000.png", "ground_truth/broken/000_mask.png", "broken", 1))
    meta = {split: {"01": []} for split in ("train", "test")}
    for image, mask, defect, anomaly in entries:
        meta[image.split("/")[0]]["01"].append(
            {
                "img_path": f"01/{image}",
                "mask_path": f"01/{mask}" if mask else "",
                "cls_name": "01",
                "specie_name": defect,
                "anomaly": anomaly,
            }
        )
    with open(os.path.join(root, "btad", "meta.json"), "w") as stream:
        json.dump(meta, stream)
    visa = os.path.join(root, "visa")
    write_image(os.path.join(visa, "candle/Data/Images/Normal/0000.JPG"))
    write_image(os.path.join(visa, "candle/Data/Images/Anomaly/000.JPG"), value=200)
    write_mask(os.path.join(visa, "candle/Data/Masks/Anomaly/000.png"))
    os.makedirs(os.path.join(visa, "split_csv"))
    with open(os.path.join(visa, "split_csv", "1cls.csv"), "w") as stream:
        stream.write(
            "object,split,label,image,mask\n"
            "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n"
            "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
        )


# The names docs/metrics.md's snippets use without defining them: four images' labels and scores, masks and maps,
# a tiny model with its processor and a loader of one batch, an accelerator.
METRICS_PRELUDE = textwrap.dedent(
    """
    import numpy as np
    import torch
    from accelerate import Accelerator

    from crane_hf import CraneImageProcessor
    from tests.tiny_models import tiny_model

    rng = np.random.default_rng(0)
    labels = [0, 1, 0, 1]
    scores = [0.1, 0.8, 0.4, 0.6]
    masks = np.zeros((4, 16, 16), dtype=np.uint8)
    masks[1, 4:8, 4:8] = masks[3, 2:9, 3:7] = 1
    maps = rng.random((4, 16, 16)).astype(np.float32)
    model = tiny_model("crane")
    processor = CraneImageProcessor.from_crane_config(model.config)
    inputs = processor([rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)], masks=[None, *masks[1:]])
    loader = [{"pixel_values": inputs["pixel_values"], "labels": torch.tensor(labels), "masks": inputs["masks"]}]
    accelerator = Accelerator(cpu=True)
    """
)


EXPORT_PRELUDE = """import os, sys
sys.path.insert(0, {root!r})
from tests.tiny_models import tiny_model, write_test_images
model = tiny_model("crane+")
os.rename(write_test_images(".", count=1)[0], "part.png")
"""


def test_docs_python_snippets_run(tmp_path):
    """docs/data.md against stand-in datasets at its paths; docs/metrics.md with the names it leaves to the reader."""
    python_blocks = {}
    for path in DOCS:
        with open(path, encoding="utf-8") as stream:
            python_blocks[os.path.basename(path)] = re.findall(r"```python\n(.*?)```", stream.read(), re.DOTALL)
    assert set(name for name, blocks in python_blocks.items() if blocks) == {
        "data.md",
        "metrics.md",
        "export.md",
    }, python_blocks
    stand_in_datasets(tmp_path / "data")
    (tmp_path / "export").mkdir()
    scripts = {
        "data.md": "\n".join(python_blocks["data.md"]).replace('"/data/', f'"{tmp_path / "data"}/'),
        # the prelude before each block: a block's own names (maps, ...) are not the next block's inputs
        "metrics.md": "\n".join(METRICS_PRELUDE + block for block in python_blocks["metrics.md"]),
        # `model` and part.png are the reader's: a tiny random Crane+ and a test image, in a fresh folder
        "export.md": EXPORT_PRELUDE.format(root=ROOT) + "\n".join(python_blocks["export.md"]),
    }
    for name, script in scripts.items():
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path / "export" if name == "export.md" else ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, (name, result.stderr[-4000:])


def test_every_benchmark_and_example_script_answers_help():
    sources = {}
    for path in BENCHMARKS + EXAMPLES:
        with open(path, encoding="utf-8") as stream:
            sources[path] = stream.read()
    scripts = [path for path, source in sources.items() if 'if __name__ == "__main__":' in source]
    for library in sorted(set(sources) - set(scripts)):  # the benchmarks' shared modules, imported by scripts
        name = os.path.splitext(os.path.basename(library))[0]
        assert any(f"from {name} import" in sources[script] for script in scripts), library
    for script in scripts:
        result = subprocess.run(
            [sys.executable, script, "--help"],
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0 and result.stdout.startswith("usage:"), (script, result.stderr[-2000:])
        assert "spec section" not in result.stdout, script


def messages_with_download_commands() -> dict[str, str]:
    """The texts that tell a user to download: the README, docs, the presets' and training's
    BackboneUnavailableError, and the offline demo's summary."""
    import argparse
    import contextlib
    import io

    from crane_hf.commands.demo import _print_summary
    from crane_hf.presets import _unavailable_message, list_presets, load_preset
    from crane_hf.training.options import add_arguments
    from crane_hf.training.train import check_backbones_available

    texts = {}
    for path in [os.path.join(ROOT, "README.md"), *DOCS]:
        with open(path, encoding="utf-8") as stream:
            texts[os.path.relpath(path, ROOT)] = stream.read()
    for name in list_presets():
        preset = load_preset(name)
        texts[f"preset {name}"] = _unavailable_message(preset, preset.clip_backbone, "offline")
    parser = add_arguments(argparse.ArgumentParser())
    for variant in ("crane", "crane+"):
        args = parser.parse_args(["--data", "x", "--output-dir", "y", "--variant", variant])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("crane_hf.training.train.unavailable_reason", lambda source: "offline")
            with pytest.raises(OSError) as error:
                check_backbones_available(args)
        texts[f"training {variant}"] = str(error.value)
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        _print_summary(
            {"output": "demo", "rows": [], "labels": {}, "mode": "offline-demo", "report": "demo/report.html"}
        )
    texts["demo"] = summary.getvalue()
    return texts


def test_download_commands_are_what_hf_download_accepts():
    """Each `hf download` parses with the installed CLI as one repository written to a --local-dir folder (`hf
    download A B` would read B as a file of A)."""
    help_text = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "hf"), "download", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_text.returncode == 0 and "REPO_ID [FILENAMES]..." in help_text.stdout, help_text.stderr[-2000:]
    assert "--local-dir" in help_text.stdout
    found = 0
    for where, text in messages_with_download_commands().items():
        commands = re.findall(r"hf download [^\n`)]*", text)
        assert len(commands) == text.count("hf download"), where  # none broken over two lines
        for command in commands:
            params = hf_download(command.strip())
            assert params["repo_id"] in BACKBONES and not params["filenames"], (where, command)
            assert params["local_dir"] == params["repo_id"].split("/")[-1], (where, command)
            found += 1
    assert found >= 10, found
    with pytest.raises(click.UsageError):
        hf_download("hf download openai/clip-vit-large-patch14-336 --local-dirr x")  # the parser does refuse
