"""crane-hf demo without the Hub: says so plainly, trains a small model for a moment, writes real outputs."""

from __future__ import annotations

import json
import os

from crane_hf.commands.cli import main


def test_offline_demo_runs_end_to_end(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--offline", "--steps", "3", "--output", str(output), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "OFFLINE DEMO" in captured.err and "SMALL RANDOM backbones" in captured.err
    assert "crane-hf predict IMAGES --model crane+/mvtec" in captured.out
    # one download per backbone, into the folders the next command points at
    assert "  hf download openai/clip-vit-large-patch14-336 --local-dir clip-vit-large-patch14-336\n" in captured.out
    assert "  hf download facebook/dinov2-with-registers-base --local-dir dinov2-with-registers-base\n" in captured.out
    assert "--clip clip-vit-large-patch14-336 --dino dinov2-with-registers-base" in captured.out
    assert "What it CANNOT show: how well Crane finds defects" in captured.err  # says plainly what it cannot show
    report = output / "predictions" / "report.html"
    assert f"Open the report in a browser: {report}" in captured.out
    html = report.read_text(encoding="utf-8")
    assert html.count('<li class="card') == 10 and "OFFLINE DEMO on SMALL RANDOM backbones" in html
    summary = json.loads((output / "predictions" / "predictions.json").read_text())
    assert len(summary["predictions"]) == 10  # 2 held-out classes x (2 normal + 3 defective)
    assert all(0.0 <= row["score"] <= 1.0 for row in summary["predictions"])
    assert len(os.listdir(output / "predictions" / "overlays")) == 10
    calibration = json.loads((output / "demo-model" / "calibration.json").read_text())
    assert summary["image_threshold"] == calibration["image"]["threshold"]
    assert main(["demo", "--offline", "--steps", "3", "--output", str(output), "--quiet"]) == 2  # never overwrites
