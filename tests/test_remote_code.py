"""A saved folder carries its code: it loads with trust_remote_code=True where crane_hf cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from crane_hf import CraneImageProcessor

from .tiny_models import TINY_SIZE, tiny_model

REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["crane_hf"] = None  # as if crane_hf were not installed
    try:
        import crane_hf  # noqa: F401
        raise SystemExit("crane_hf should not be importable here")
    except ImportError:
        pass
    import torch
    from transformers import AutoImageProcessor, AutoModel
    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert "crane_hf" not in type(model).__module__, type(model).__module__
    pixels = torch.load(sys.argv[2])
    with torch.no_grad():
        out = model(pixels)
    torch.save({"scores": out.anomaly_scores, "maps": out.anomaly_maps, "size": processor.image_size}, sys.argv[3])
    """
)


def test_saved_folder_loads_with_remote_code_without_crane_hf(tmp_path, variant):
    model = tiny_model(variant)
    model.save_pretrained(tmp_path / "model")
    CraneImageProcessor(image_size=TINY_SIZE).save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_crane.CraneForAnomalyDetection"
    assert {"modeling_crane.py", "configuration_crane.py", "e_attention.py", "d_attention.py"} <= set(
        os.listdir(tmp_path / "model")
    )
    pixels = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    torch.save(pixels, tmp_path / "pixels.pt")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "remote.py"),
            str(tmp_path / "model"),
            str(tmp_path / "pixels.pt"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        local = model(pixels)
    assert torch.equal(remote["scores"], local.anomaly_scores)
    assert torch.equal(remote["maps"], local.anomaly_maps)
    assert remote["size"] == TINY_SIZE
