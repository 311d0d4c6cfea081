"""No data lost: a training run killed with SIGKILL at random moments leaves only complete, loadable checkpoints,
and `--resume-from-checkpoint latest` continues from the newest one to the prompts of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from crane_hf import CraneForAnomalyDetection
from crane_hf.io.output_names import MARKER_NAME
from crane_hf.training.checkpoints import CHECKPOINT_PREFIX, list_checkpoints, read_trainer_state

from .tiny_models import subprocess_environment
from .training_fixtures import backbones, synthetic, tiny_training_args

__all__ = ["backbones", "synthetic"]  # fixtures used by name


def _train_command(backbones, synthetic, output, epochs: int, resume: bool = False) -> list[str]:
    args = tiny_training_args(backbones, synthetic, output, "--cpu", epochs=epochs)
    if resume:
        args += ["--resume-from-checkpoint", "latest"]
    return [sys.executable, "-m", "crane_hf.train", *args]


def _assert_checkpoints_complete(output) -> int:
    """Every visible checkpoint loads; returns the newest epoch (0 if none)."""
    names = [name for name in os.listdir(output) if name.startswith(CHECKPOINT_PREFIX)]
    complete = list_checkpoints(str(output))
    assert sorted(os.path.basename(path) for _, path in complete) == sorted(names)  # no partial checkpoint visible
    for epoch, path in complete:
        assert read_trainer_state(path)["epoch"] == epoch
        CraneForAnomalyDetection.from_pretrained(path)
    return complete[-1][0] if complete else 0


def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(backbones, synthetic, tmp_path):
    rng = random.Random(7)
    output = tmp_path / "run"
    newest = 0
    for attempt in range(3):
        process = subprocess.Popen(
            _train_command(backbones, synthetic, output, epochs=8, resume=newest > 0),
            env=subprocess_environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Wait until the run has started writing (or a few seconds), then kill at a random moment.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if list_checkpoints(str(output)) and len(list_checkpoints(str(output))) > newest:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        newest = max(newest, _assert_checkpoints_complete(output))
        assert newest >= 1, f"attempt {attempt}: no checkpoint was written before the kill"
    finished = subprocess.run(
        _train_command(backbones, synthetic, output, epochs=8, resume=True),
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert _assert_checkpoints_complete(output) == 8
    leftovers = [name for name in os.listdir(output) if name.startswith(".") and name != MARKER_NAME]
    assert leftovers == []  # the resumed run removed the temporary folders and locks the kills left
    resumed = CraneForAnomalyDetection.from_pretrained(str(output))
    uninterrupted_output = tmp_path / "uninterrupted"
    uninterrupted_run = subprocess.run(
        _train_command(backbones, synthetic, uninterrupted_output, epochs=8),
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert uninterrupted_run.returncode == 0, uninterrupted_run.stderr[-3000:]
    uninterrupted = CraneForAnomalyDetection.from_pretrained(str(uninterrupted_output))
    for name, tensor in uninterrupted.prompt_learner.state_dict().items():  # killed 3 times, resumed: same prompts
        assert torch.equal(resumed.prompt_learner.state_dict()[name], tensor), name


class _Killed(BaseException):
    """Stands for a SIGKILL at a chosen point: none of the run's own cleanup runs after it."""


def test_a_run_killed_while_publishing_its_model_files_resumes(backbones, synthetic, tmp_path, monkeypatch):
    """Killed after copying a checkpoint's model files into --output-dir and before listing them in its manifest:
    the files are known by their content (the checkpoint's manifest lists it), so `--resume-from-checkpoint latest`
    resumes instead of refusing them as a user's."""
    import crane_hf.training.checkpoints as checkpoints
    from crane_hf.commands.cli import main

    output = tmp_path / "run"
    real_claim = checkpoints.claim_entries

    def killed_before_listing(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(checkpoints, "claim_entries", killed_before_listing)
    with pytest.raises(_Killed):
        main(["train", *tiny_training_args(backbones, synthetic, output, "--cpu", epochs=1)])
    monkeypatch.setattr(checkpoints, "claim_entries", real_claim)
    assert _assert_checkpoints_complete(output) == 1 and (output / "model.safetensors").is_file()
    argv = ["train", *tiny_training_args(backbones, synthetic, output, "--cpu", epochs=2)]
    assert main([*argv, "--resume-from-checkpoint", "latest"]) == 0
    assert _assert_checkpoints_complete(output) == 2
