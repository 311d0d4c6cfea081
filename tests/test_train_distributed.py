"""Training under `accelerate launch` with 2 processes (gloo on a machine without a GPU): one set of outputs,
written by the main process only."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from crane_hf import CraneForAnomalyDetection

from .tiny_models import launch_two_processes, run_process_group, subprocess_environment
from .training_fixtures import backbones, synthetic, tiny_training_args

__all__ = ["backbones", "synthetic"]  # fixtures used by name


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not installed")
def test_two_processes_write_one_checkpoint(backbones, synthetic, tmp_path):
    output = tmp_path / "ddp"
    command = [
        *launch_two_processes("crane_hf.train"),
        *tiny_training_args(backbones, synthetic, output),
    ]
    result = run_process_group(command, env=subprocess_environment(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Prompts saved in") == 1  # by the main process only
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["settings"]["num_processes"] == 2
    # 14 images, 2 per process and step: 4 steps (accelerate completes the last global batch from the start).
    assert state["history"][0]["steps"] == 4
    written = sorted(name for name in os.listdir(output) if name.startswith(("checkpoint-", ".")))
    assert written == [".crane-hf-output.json", "checkpoint-epoch-1"]  # the manifest; no leftover temporary folders
    # Only the main process wrote: its random state, not one per process.
    assert sorted(os.listdir(output / "checkpoint-epoch-1/training_state")) == ["optimizer.bin", "random_states_0.pkl"]
    log = (output / "training_log.jsonl").read_text().splitlines()
    assert len(log) == 4  # one line per optimizer step, not one per process
    CraneForAnomalyDetection.from_pretrained(str(output))
