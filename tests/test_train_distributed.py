"""Training under `accelerate launch` with 2 processes (gloo on a machine without a GPU): one set of outputs,
written by the main process only."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import crane_hf
from crane_hf import CraneForAnomalyDetection

from .tiny_models import free_port, run_process_group
from .training_fixtures import backbones, synthetic

__all__ = ["backbones", "synthetic"]  # fixtures used by name


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not installed")
def test_two_processes_write_one_checkpoint(backbones, synthetic, tmp_path):
    output = tmp_path / "ddp"
    source_root = os.path.dirname(os.path.dirname(os.path.abspath(crane_hf.__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([source_root, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "crane_hf.train",
        "--data",
        f"{synthetic}:test",
        "--clip",
        backbones["clip"],
        "--output-dir",
        str(output),
        "--image-size",
        "56",
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--num-workers",
        "0",
    ]
    result = run_process_group(command, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Prompts saved in") == 1  # by the main process only
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["settings"]["num_processes"] == 2
    # 14 images, 2 per process and step: 4 steps (accelerate completes the last global batch from the start).
    assert state["history"][0]["steps"] == 4
    written = sorted(name for name in os.listdir(output) if name.startswith(("checkpoint-", ".")))
    assert written == ["checkpoint-epoch-1"]  # no leftover temporary folders
    # Only the main process wrote: its random state, not one per process.
    assert sorted(os.listdir(output / "checkpoint-epoch-1/training_state")) == ["optimizer.bin", "random_states_0.pkl"]
    log = (output / "training_log.jsonl").read_text().splitlines()
    assert len(log) == 4  # one line per optimizer step, not one per process
    CraneForAnomalyDetection.from_pretrained(str(output))
