"""pipeline("zero-shot-anomaly-detection"): every input type, batching, outputs, and loading from folders."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from crane_hf import CraneImageProcessor, ZeroShotAnomalyDetectionPipeline

from .tiny_models import TINY_SIZE

TASK = "zero-shot-anomaly-detection"


@pytest.fixture(scope="module")
def detector(tiny_model_dir):
    return pipeline(TASK, model=tiny_model_dir)


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    pixels = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    pixels[5:15, 30:45] = 255
    return pixels


def _reference(detector, pixels: np.ndarray) -> tuple[float, np.ndarray]:
    """The model and processor applied by hand: score and smoothed map at the image's size."""
    processor = detector.image_processor
    inputs = processor(pixels)
    with torch.no_grad():
        out = detector.model(inputs["pixel_values"])
    maps = processor.post_process_anomaly_maps(out.anomaly_maps, sigma=4.0, target_sizes=inputs["original_sizes"])
    return float(out.anomaly_scores[0]), maps[0].numpy()


def test_pipeline_is_registered_and_loads_from_a_folder(detector):
    assert isinstance(detector, ZeroShotAnomalyDetectionPipeline)
    assert isinstance(detector.image_processor, CraneImageProcessor)


def test_single_image_output(detector, picture):
    result = detector(Image.fromarray(picture), return_overlay=True)
    score, expected_map = _reference(detector, picture)
    assert set(result) == {"score", "is_anomalous", "anomaly_map", "overlay"}
    assert isinstance(result["score"], float) and 0.0 <= result["score"] <= 1.0
    assert result["score"] == pytest.approx(score, abs=1e-6)
    assert result["is_anomalous"] == (result["score"] >= detector.model.config.image_threshold)
    assert result["anomaly_map"].dtype == np.float32 and result["anomaly_map"].shape == (40, 70)
    assert np.allclose(result["anomaly_map"], expected_map, atol=1e-6)
    assert isinstance(result["overlay"], Image.Image) and result["overlay"].size == (70, 40)
    assert "overlay" not in detector(picture)


def test_threshold_parameter_decides(detector, picture):
    score = detector(picture)["score"]
    assert detector(picture, threshold=max(score - 1e-3, 0.0))["is_anomalous"] is True
    assert detector(picture, threshold=min(score + 1e-3, 1.0))["is_anomalous"] is False
    with pytest.raises(ValueError, match="threshold"):
        detector(picture, threshold=1.5)


def test_every_input_type_gives_the_same_result(detector, picture, tmp_path):
    path = str(tmp_path / "picture.png")
    Image.fromarray(picture).save(path)
    expected = detector(Image.fromarray(picture))
    for variant in (path, picture, picture.transpose(2, 0, 1), torch.from_numpy(picture.transpose(2, 0, 1))):
        result = detector(variant)
        assert result["score"] == pytest.approx(expected["score"], abs=1e-6)
        assert np.allclose(result["anomaly_map"], expected["anomaly_map"], atol=1e-6)


def test_url_input(detector, picture, tmp_path):
    Image.fromarray(picture).save(tmp_path / "remote.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = detector(f"http://127.0.0.1:{server.server_address[1]}/remote.png", timeout=10)
    finally:
        server.shutdown()
    assert result["score"] == pytest.approx(detector(picture)["score"], abs=1e-6)


def test_lists_and_batches(detector, picture):
    images = [picture, picture[:30], Image.fromarray(picture[:, :50])]
    one_by_one = [detector(image) for image in images]
    for batch_size in (1, 2, 3):
        batched = detector(images, batch_size=batch_size, return_overlay=True)
        assert len(batched) == 3
        for single, result in zip(one_by_one, batched):
            assert result["score"] == pytest.approx(single["score"], abs=1e-5)
            assert result["anomaly_map"].shape == single["anomaly_map"].shape
            assert result["overlay"].size == result["anomaly_map"].shape[::-1]
    assert len(detector(tuple(images))) == 3
    assert detector([]) == []


def test_datasets_columns_stream(detector, picture):
    dataset = datasets.Dataset.from_dict({"image": [Image.fromarray(picture), Image.fromarray(picture[:30])]})
    dataset = dataset.cast_column("image", datasets.Image())
    expected = [detector(picture)["score"], detector(picture[:30])["score"]]
    for source in (dataset["image"], dataset):
        outputs = detector(source, batch_size=2)
        assert not isinstance(outputs, list)  # lazy, like transformers' KeyDataset
        scores = [output["score"] for output in outputs]
        assert scores == pytest.approx(expected, abs=1e-5)
    undecoded = dataset.cast_column("image", datasets.Image(decode=False))
    assert [o["score"] for o in detector(undecoded["image"])] == pytest.approx(expected, abs=1e-5)


def test_device_and_dtype(tiny_model_dir, picture):
    bf16 = pipeline(TASK, model=tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16
    result = bf16(picture)
    reference = pipeline(TASK, model=tiny_model_dir, device="cpu")(picture)
    assert abs(result["score"] - reference["score"]) < 0.05
    assert result["anomaly_map"].dtype == np.float32


def test_smoothing_sigma_parameter(detector, picture):
    raw = detector(picture, smoothing_sigma=0)["anomaly_map"]
    smooth = detector(picture)["anomaly_map"]
    assert raw.std() > smooth.std()


def test_published_folder_loads_without_trust_remote_code_when_crane_hf_is_installed(detector, tmp_path, picture):
    detector.save_pretrained(tmp_path / "published")
    import json

    config = json.loads((tmp_path / "published" / "config.json").read_text())
    assert config["custom_pipelines"][TASK]["impl"] == (
        "pipeline_zero_shot_anomaly_detection.ZeroShotAnomalyDetectionPipeline"
    )
    again = pipeline(TASK, model=str(tmp_path / "published"))
    assert type(again) is ZeroShotAnomalyDetectionPipeline
    assert again(picture)["score"] == pytest.approx(detector(picture)["score"], abs=1e-6)


REMOTE_PIPELINE = textwrap.dedent(
    """
    import sys
    sys.modules["crane_hf"] = None  # crane_hf is not installed here
    import numpy as np
    from transformers import pipeline
    detector = pipeline("zero-shot-anomaly-detection", model=sys.argv[1], trust_remote_code=True)
    assert "crane_hf" not in type(detector).__module__, type(detector).__module__
    pixels = np.load(sys.argv[2])
    result = detector(pixels, return_overlay=True)
    np.save(sys.argv[3], result["anomaly_map"])
    print(repr(result["score"]), result["is_anomalous"], result["overlay"].size)
    """
)


def test_trust_remote_code_pipeline_without_crane_hf(detector, picture, tmp_path):
    folder = tmp_path / "published"
    detector.save_pretrained(folder)
    np.save(tmp_path / "pixels.npy", picture)
    (tmp_path / "remote.py").write_text(REMOTE_PIPELINE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "remote.py"),
            str(folder),
            str(tmp_path / "pixels.npy"),
            str(tmp_path / "map.npy"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    score, _decision, size = result.stdout.strip().split(" ", 2)
    local = detector(picture)
    assert float(score) == pytest.approx(local["score"], abs=1e-6)
    assert np.allclose(np.load(tmp_path / "map.npy"), local["anomaly_map"], atol=1e-6)
    assert size == "(70, 40)"


def test_missing_processor_folder_is_an_error(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-processor"
    shutil.copytree(tiny_model_dir, folder)
    os.remove(folder / "preprocessor_config.json")
    with pytest.raises(Exception, match=r"(?i)image processor|preprocessor"):
        pipeline(TASK, model=str(folder))


def test_model_size_matches_processor(detector):
    assert detector.image_processor.image_size == TINY_SIZE == detector.model.config.image_size


# Unit roundoff of the reduced-precision dtypes (8 and 11 significant bits).
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_folders_and_presets_give_float32_results_near_float32(tiny_model_dir, tmp_path, dtype):
    """`dtype=` for full and prompts-only folders and presets, in Python and on the command line: every weight in
    that dtype, scores and maps returned in float32, near the float32 run. Tolerances in units of the dtype's
    roundoff u (2^-8 bfloat16, 2^-11 float16): the features reach the heads L2-normalized with a relative error of
    a few u; a logit divides a cosine by tau = 0.07 (x 14.3) and a probability moves at most 1/4 per logit unit,
    so an image score (pooled over all patches) moves by about 3.6 u per u of feature error: 8 u allowed; the maps'
    mean difference likewise (4 u). A single map pixel is the sigmoid of a difference of two such logits (x 7 per u)
    and D-Attn's mask (A_ij < 0) switches discontinuously, so one pixel may move by several times more: 32 u.
    Measured on these models: scores <= 1.3 u, map means <= 1.8 u, map maxima <= 10.7 u (bfloat16)."""
    import json

    from transformers import CLIPModel, Dinov2WithRegistersModel

    import crane_hf
    from crane_hf import CraneForAnomalyDetection
    from crane_hf.commands.cli import main

    from .tiny_models import (
        fingerprint_compatible_clip,
        randomize_,
        tiny_clip_config,
        tiny_dino_config,
        write_test_images,
    )

    images = write_test_images(tmp_path / "images", count=3, seed=9)
    clip = randomize_(CLIPModel(tiny_clip_config()), seed=7)
    dino = randomize_(Dinov2WithRegistersModel(tiny_dino_config()), seed=8)
    clip.save_pretrained(tmp_path / "clip")
    dino.save_pretrained(tmp_path / "dino")
    prompts_only = CraneForAnomalyDetection.from_backbones(
        str(tmp_path / "clip"), str(tmp_path / "dino"), image_size=TINY_SIZE
    )
    randomize_(prompts_only.prompt_learner, scale=0.5, seed=3)
    prompts_only.save_pretrained(tmp_path / "prompts", include_backbones=False)
    fingerprint_compatible_clip("crane/mvtec").save_pretrained(tmp_path / "clip768")
    sources = {
        "full folder": (tiny_model_dir, {}),
        "prompts-only folder": (str(tmp_path / "prompts"), {}),
        "preset": ("crane/mvtec", {"clip": str(tmp_path / "clip768"), "image_size": TINY_SIZE}),
    }
    u = UNIT_ROUNDOFF[dtype]
    for name, (source, options) in sources.items():
        reference = crane_hf.load_detector(source, device="cpu", **options)(images)
        detector = crane_hf.load_detector(source, device="cpu", dtype=dtype, **options)
        assert {parameter.dtype for parameter in detector.model.parameters()} == {getattr(torch, dtype)}, name
        results = detector(images)
        for low, full in zip(results, reference):
            assert low["anomaly_map"].dtype == np.float32, name
            difference = np.abs(low["anomaly_map"] - full["anomaly_map"])
            assert abs(low["score"] - full["score"]) <= 8 * u, name
            assert difference.mean() <= 4 * u and difference.max() <= 32 * u, name

    outputs = {}
    for run_dtype in ("float32", dtype):
        out = tmp_path / f"predict-{run_dtype}"
        argv = ["predict", *images, "--model", tiny_model_dir, "--output", str(out), "--quiet", "--save-maps"]
        assert main([*argv, "--dtype", run_dtype, "--device", "cpu"]) == 0
        rows = json.loads((out / "predictions.json").read_text())["predictions"]
        assert len(rows) == len(images)
        outputs[run_dtype] = (rows, [np.load(path) for path in sorted((out / "maps").iterdir())])
    for low, full in zip(outputs[dtype][0], outputs["float32"][0]):
        assert abs(low["score"] - full["score"]) <= 8 * u
    for low, full in zip(outputs[dtype][1], outputs["float32"][1]):
        assert low.dtype == np.float32 and np.abs(low - full).mean() <= 4 * u and np.abs(low - full).max() <= 32 * u
