"""crane-hf app (Gradio) in headless Chromium, saving thresholds safely, and the Space folder of push --space."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from crane_hf.commands.app import save_thresholds_to_folder
from crane_hf.commands.cli import main
from crane_hf.io.output_names import MARKER_NAME
from crane_hf.reporting.gradio_app import render_state

from .browser import require, require_chromium
from .test_reporting import keep_screenshot
from .tiny_models import subprocess_environment, write_test_images

try:
    import gradio  # noqa: F401

    GRADIO_MISSING = ""
except ImportError:
    GRADIO_MISSING = "gradio is not installed (pip install -e '.[test]')"


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def loaded_model(folder):
    from crane_hf.model_loading import load_model

    return load_model(str(folder), device="cpu")[0]


def test_save_thresholds_writes_config_and_record(model_copy):
    message = save_thresholds_to_folder(str(model_copy), 0.61, 0.42, loaded_model(model_copy))
    config = json.loads((model_copy / "config.json").read_text())
    record = json.loads((model_copy / "calibration.json").read_text())
    assert config["image_threshold"] == 0.61 and config["pixel_threshold"] == 0.42 and "0.6100" in message
    assert record["previous"]["image_threshold"] == 0.5 and record["previous"]["pixel_threshold"] == 0.5
    assert record["image"]["threshold"] == 0.61 and record["method"] == "set by hand in crane-hf app"
    assert record["image"]["target_fpr"] is None and record["normal_images"] is None  # no calibration images
    save_thresholds_to_folder(str(model_copy), 0.7, 0.4, loaded_model(model_copy))  # its own record is replaced
    assert json.loads((model_copy / "calibration.json").read_text())["previous"]["image_threshold"] == 0.61


def test_app_saves_the_record_calibrate_saves_and_the_thresholds_load_as_calibrated(tiny_model_dir, tmp_path):
    from crane_hf.commands.calibrate import calibrate_folder
    from crane_hf.model_loading import load_detector

    calibrated, saved = tmp_path / "calibrated", tmp_path / "saved"
    for folder in (calibrated, saved):
        shutil.copytree(tiny_model_dir, folder)
    normal = write_test_images(tmp_path / "normal", count=3)
    calibrate_folder(str(calibrated), normal, device="cpu", progress=False)
    save_thresholds_to_folder(str(saved), 0.61, 0.42, loaded_model(saved))
    records = [json.loads((folder / "calibration.json").read_text()) for folder in (calibrated, saved)]
    configs = [json.loads((folder / "config.json").read_text()) for folder in (calibrated, saved)]
    assert set(records[1]) == set(records[0])  # the same record: the same fields, the same meaning
    for key in ("image", "pixel", "previous"):
        assert set(records[1][key]) == set(records[0][key]), key
    for key in ("computation", "computation_changed", "overrides", "reference_memory", "previous"):
        if key != "previous":
            assert records[1][key] == records[0][key], key
    assert records[1]["previous"]["computation"] == records[0]["previous"]["computation"]
    # what the thresholds hold for is recorded as calibrate records it: the model's computation, zero-shot, float32
    assert configs[1]["threshold_computation"] == configs[0]["threshold_computation"]
    assert configs[1]["threshold_computation"]["few_shot_memory"] is None
    assert configs[1]["threshold_computation"]["dtype"] == "float32"
    # the saved folder decides with them, and a model loaded with another computation refuses them
    detector = load_detector(str(saved), device="cpu")
    assert detector.model.config.threshold_computation == configs[1]["threshold_computation"]
    result = detector(normal[1])
    assert result["is_anomalous"] == (result["score"] >= 0.61)
    other = load_detector(str(saved), device="cpu", soft_mean=not detector.model.config.soft_mean)
    with pytest.raises(ValueError, match="calibrated for another computation"):
        other(normal[1])


def test_app_saves_thresholds_with_its_reference_memory_as_calibrate_does(model_copy, tmp_path):
    from crane_hf.model_loading import load_detector

    references = write_test_images(tmp_path / "references", count=2, seed=5)
    model = loaded_model(model_copy)
    memory = load_detector(str(model_copy), device="cpu").build_reference_memory(references)
    message = save_thresholds_to_folder(str(model_copy), 0.55, 0.45, model, memory=memory)
    assert "reference memory" in message
    record = json.loads((model_copy / "calibration.json").read_text())
    config = json.loads((model_copy / "config.json").read_text())
    assert record["reference_memory"] == memory.describe()
    assert config["threshold_computation"]["few_shot_memory"] == memory.identity
    assert (model_copy / "reference_memory.safetensors").is_file()  # the memory the thresholds hold for
    detector = load_detector(str(model_copy), device="cpu")
    assert detector.model.reference_memory.identity == memory.identity
    (test_image,) = write_test_images(tmp_path / "test", count=1, seed=9)
    result = detector(test_image)  # fused with the folder's memory, decided with the saved thresholds
    assert "few_shot_score" in result and result["is_anomalous"] == (result["score"] >= 0.55)


def test_save_thresholds_never_writes_over_foreign_files(model_copy, tmp_path):
    model = loaded_model(model_copy)
    config_before = (model_copy / "config.json").read_bytes()
    (model_copy / "calibration.json").write_text('{"notes": "mine"}')
    with pytest.raises(ValueError, match="not written by crane-hf"):
        save_thresholds_to_folder(str(model_copy), 0.6, 0.4, model)
    assert (model_copy / "config.json").read_bytes() == config_before
    assert (model_copy / "calibration.json").read_text() == '{"notes": "mine"}'
    with pytest.raises(ValueError, match=r"no config\.json"):
        save_thresholds_to_folder(str(tmp_path / "nothing"), 0.6, 0.4, model)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="not the config of a crane model"):
        save_thresholds_to_folder(str(other), 0.6, 0.4, model)
    assert (other / "config.json").read_text() == '{"model_type": "bert"}'
    (model_copy / "calibration.json").unlink()
    for bad in (1.5, float("nan"), -0.1):
        with pytest.raises(ValueError, match="threshold"):
            save_thresholds_to_folder(str(model_copy), bad, 0.4, model)
    changed = loaded_model(model_copy)
    changed.config = changed.config.with_overrides(soft_mean=not changed.config.soft_mean)
    with pytest.raises(ValueError, match="soft_mean"):  # the folder computes otherwise than the model in the app
        save_thresholds_to_folder(str(model_copy), 0.6, 0.4, changed)
    assert (model_copy / "config.json").read_bytes() == config_before and not (
        model_copy / "calibration.json"
    ).exists()


def test_thresholds_redraw_from_state_without_the_model():
    anomaly_map = np.zeros((30, 40), np.float32)
    anomaly_map[:10] = 0.8
    state = {
        "model": "m",
        "items": [{"name": "a.png", "image": np.zeros((30, 40, 3), np.uint8), "score": 0.6, "map": anomaly_map}],
    }
    text, figure, table = render_state(state, 0.55, 0.5, "absolute", None)
    assert text.startswith("### ANOMALOUS: score 0.6000") and "33.3% of the pixels" in text
    assert table == [["a.png", 0.6, "ANOMALOUS"]] and figure.width > 600
    text, _, table = render_state(state, 0.65, 0.9, "image", "a.png")
    assert text.startswith("### OK") and "0.0% of the pixels" in text and table[0][2] == "OK"
    with pytest.raises(ValueError, match="image threshold"):
        render_state(state, 1.2, 0.5, "absolute", None)


@contextlib.contextmanager
def app_in_chromium(folder, height: int):
    """`crane-hf app --model folder` served on a free port and opened in headless Chromium once its model is loaded:
    yields (driver, a 90 s WebDriverWait); the browser and the server are closed after."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from crane_hf.commands import app as app_command

    from .browser import headless_chromium, start_app

    app = app_command.build(argparse.Namespace(model=str(folder), clip=None, dino=None, device="cpu"))
    port = start_app(app)
    driver = headless_chromium(1400, height)
    try:
        wait = WebDriverWait(driver, 90)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: "default thresholds" in d.find_element(By.ID, "model-status").text)
        yield driver, wait
    finally:
        driver.quit()
        app.close()


def test_app_answers_an_upload_and_threshold_changes_in_chromium(model_copy, tmp_path):
    require(GRADIO_MISSING)
    require_chromium()
    from selenium.webdriver.common.by import By

    (image_path,) = write_test_images(tmp_path / "images", count=1)
    expected = pipeline("zero-shot-anomaly-detection", model=str(model_copy))(image_path)["score"]
    with app_in_chromium(model_copy, 1000) as (driver, wait):
        driver.find_element(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(image_path)
        wait.until(lambda d: d.find_element(By.ID, "result").text.startswith(("ANOMALOUS:", "OK:")))
        result = driver.find_element(By.ID, "result").text
        assert f"score {expected:.4f}" in result
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#figure img"))

        def set_threshold(element_id: str, value: float) -> str:
            box = driver.find_element(By.CSS_SELECTOR, f"#{element_id} input[type=number]")
            box.clear()
            box.send_keys(f"{value:.3f}\n")
            label = "image" if element_id == "image-threshold" else "pixel"
            wait.until(lambda d: f"{label} threshold {value:.3f}" in d.find_element(By.ID, "result").text)
            return driver.find_element(By.ID, "result").text

        below, above = round(expected - 0.005, 3), round(expected + 0.005, 3)
        assert set_threshold("image-threshold", below).startswith("ANOMALOUS:")
        assert set_threshold("image-threshold", above).startswith("OK:")
        assert "0.0% of the pixels" in set_threshold("pixel-threshold", 1.0)
        keep_screenshot(driver, tmp_path, "app.png")
        driver.find_element(By.ID, "save-thresholds").click()
        wait.until(lambda d: "Saved" in d.find_element(By.ID, "save-message").text)
        config = json.loads((model_copy / "config.json").read_text())
        assert config["image_threshold"] == pytest.approx(above) and config["pixel_threshold"] == 1.0


def app_callback(app, name: str):
    """The function of the app's event handler `name` (the Blocks' registered callbacks)."""
    (function,) = {block.fn for block in app.fns.values() if getattr(block.fn, "__name__", "") == name}
    return function


def test_app_few_shot_with_reference_images_or_a_memory_refuses_a_reference_image(model_copy, tmp_path):
    require(GRADIO_MISSING)
    from crane_hf.commands import app as app_command
    from crane_hf.reporting.gradio_app import _rgb

    references = write_test_images(tmp_path / "references", count=2, seed=5)
    (test_image,) = write_test_images(tmp_path / "test", count=1, seed=9)
    detector = pipeline("zero-shot-anomaly-detection", model=str(model_copy))
    expected = detector(test_image, reference_images=references)  # the pipeline's few-shot path, from the files
    model = app_command.model_opener(device="cpu")(str(model_copy))
    reference = model.reference(references)
    assert reference["memory"].num_images == 2 and reference["label"] == "2 reference images"
    for path in (test_image, None):  # a file, and the pixels of an image dropped into the image box
        score, anomaly_map = model.score(_rgb(test_image), path, reference)
        assert score == pytest.approx(expected["score"], abs=1e-6) and score != pytest.approx(
            expected["zero_shot_score"]
        )
        np.testing.assert_allclose(anomaly_map, expected["anomaly_map"], atol=1e-6)
    copy = tmp_path / "copy-of-a-reference.png"
    shutil.copyfile(references[0], copy)
    for path in (references[0], str(copy), None):  # the same file, the same bytes, the same pixels
        with pytest.raises(ValueError, match="one of the few-shot memory's reference images"):
            model.score(_rgb(references[0]), path, reference)
    memory_file = tmp_path / "memory.safetensors"  # a memory saved before (crane-hf predict --reference ... / save)
    detector.build_reference_memory(references).save(memory_file)
    saved = model.reference([str(memory_file)])
    assert saved["label"] == "reference memory memory.safetensors (2 images)"
    assert model.score(_rgb(test_image), test_image, saved)[0] == pytest.approx(expected["score"], abs=1e-6)
    with pytest.raises(ValueError, match="one of the few-shot memory's reference images"):
        model.score(_rgb(references[1]), references[1], saved)  # a file memory knows its images by their bytes
    with pytest.raises(ValueError, match="not both"):
        model.reference([str(memory_file), references[0]])

    # through the app's event handlers: references set, a reference image refused by name, the others scored
    app = app_command.build(argparse.Namespace(model=str(model_copy), clip=None, dino=None, device="cpu"))
    state = {"model": str(model_copy), "items": []}
    state, status, *_ = app_callback(app, "on_references")(references, state, 0.5, 0.5, "absolute")
    assert status.startswith("Few-shot with 2 reference images")
    state, text, _, table, _ = app_callback(app, "on_files")([references[1], test_image], state, 0.5, 0.5, "absolute")
    assert "**Not scored:** part_1.png: " in text and "reference images" in text
    assert [row[0] for row in table] == ["part_0.png"] and table[0][1] == round(expected["score"], 4)
    state, text, *_ = app_callback(app, "on_image")(_rgb(references[0]), state, 0.5, 0.5, "absolute")
    assert text.startswith("**Not scored:** upload-2: ") and len(state["items"]) == 1
    message = app_callback(app, "on_save")(state, 0.6, 0.4)
    assert message.startswith("Saved") and "reference memory" in message
    saved_config = json.loads((model_copy / "config.json").read_text())
    assert saved_config["threshold_computation"]["few_shot_memory"] == state["reference"]["memory"].identity
    state, status, *_ = app_callback(app, "on_references")(None, state, 0.5, 0.5, "absolute")  # cleared
    assert state["reference"] is None and status.startswith("No reference images")


def test_app_few_shot_in_chromium_refuses_a_reference_image(model_copy, tmp_path):
    require(GRADIO_MISSING)
    require_chromium()
    from selenium.webdriver.common.by import By

    references = write_test_images(tmp_path / "references", count=2, seed=5)
    (test_image,) = write_test_images(tmp_path / "test", count=1, seed=9)
    detector = pipeline("zero-shot-anomaly-detection", model=str(model_copy))
    expected = detector(test_image, reference_images=references)["score"]
    with app_in_chromium(model_copy, 1200) as (driver, wait):
        upload = driver.find_element(By.CSS_SELECTOR, "#references-input input[type=file]")
        upload.send_keys("\n".join(references))
        wait.until(lambda d: "Few-shot with 2 reference images" in d.find_element(By.ID, "reference-status").text)
        driver.find_element(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(references[0])
        wait.until(lambda d: "Not scored" in d.find_element(By.ID, "result").text)
        assert "one of the few-shot memory's reference images" in driver.find_element(By.ID, "result").text
        driver.find_element(By.CSS_SELECTOR, "#files-input input[type=file]").send_keys(test_image)
        wait.until(lambda d: d.find_element(By.ID, "result").text.startswith(("ANOMALOUS:", "OK:")))
        assert f"score {expected:.4f}" in driver.find_element(By.ID, "result").text
        keep_screenshot(driver, tmp_path, "app-few-shot.png")


SPACE_RUN = textwrap.dedent(
    """
    import sys
    sys.modules["crane_hf"] = None  # the Space has no crane_hf
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import app
    model = app.open_model(app.MODEL_ID)
    score, anomaly_map = model.score(np.load(sys.argv[2]))
    print(repr(score), anomaly_map.shape)
    """
)


def test_push_space_writes_an_app_that_runs_without_crane_hf(tiny_model_dir, tmp_path):
    require(GRADIO_MISSING)
    repo, space = tmp_path / "repo", tmp_path / "space"
    argv = ["push", tiny_model_dir, "--repo-id", "acme/crane-tiny", "--dry-run", str(repo), "--space", str(space)]
    assert main(argv) == 0
    # the Space's files, and crane-hf's manifest, which marks every folder it writes (io/output_safety.py)
    assert sorted(os.listdir(space)) == [MARKER_NAME, "README.md", "app.py", "crane_app", "requirements.txt"]
    shipped = [name for name in os.listdir(repo) if name.endswith(".py")]  # the model's remote code
    assert "visualization.py" in shipped and not {"decision_figure.py", "gradio_app.py"} & set(shipped)
    for name in shipped:
        code = (repo / name).read_text()
        assert not re.search(r"^\s*(import|from) (matplotlib|gradio|jinja2)", code, re.MULTILINE), name
    front = (space / "README.md").read_text().split("---")[1]
    for line in ("sdk: gradio", "app_file: app.py", "- acme/crane-tiny", "sdk_version: "):
        assert line in front
    assert "gradio>=" in (space / "requirements.txt").read_text()
    assert "crane" not in (space / "requirements.txt").read_text()
    picture = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    np.save(tmp_path / "picture.npy", picture)
    (tmp_path / "run_space.py").write_text(SPACE_RUN)
    env = {**subprocess_environment(), "CRANE_MODEL": str(repo), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env["PYTHONPATH"] = ""
    result = subprocess.run(
        [sys.executable, str(tmp_path / "run_space.py"), str(space), str(tmp_path / "picture.npy")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir)(Image.fromarray(picture))["score"]
    score, shape = result.stdout.strip().split(" ", 1)
    assert float(score) == pytest.approx(expected, abs=1e-6) and shape == "(40, 50)"
    assert main(argv) == 2  # both folders exist: nothing is overwritten without --overwrite


def test_push_space_folder_is_refused_where_it_meets_the_dry_run_folder(tiny_model_dir, tmp_path, capsys):
    repo = tmp_path / "repo"
    for space in (repo, repo / "space", tmp_path):  # the same folder, inside it, around it
        argv = ["push", tiny_model_dir, "--repo-id", "acme/crane-tiny", "--dry-run", str(repo), "--space", str(space)]
        assert main(argv) == 2
        assert "must be separate folders, neither inside the other" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == []  # refused before anything is written


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("crane+/mvtc", "did you mean crane+/mvtec"),  # a typo of a preset
        ("/no/such/folder", "no such model folder: /no/such/folder"),
        ("crane+/mvtec", "needs the backbone openai/clip-vit-large-patch14-336"),  # offline: backbones not here
    ],
)
def test_app_refuses_a_model_it_cannot_load_before_starting(model, problem, monkeypatch, capsys):
    from crane_hf.commands import app as app_command

    def never(*args, **kwargs):
        raise AssertionError("the app was built although --model cannot be loaded")

    monkeypatch.setattr(app_command, "build", never)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["app", "--model", model, "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --model {model}: ")
    assert problem in lines[0].lower() and "Traceback" not in captured.err
    assert "Running on" not in captured.out and "crane-hf app on" not in captured.out


@pytest.mark.slow
def test_app_stops_cleanly_on_sigint_and_sigterm(tiny_model_dir, tmp_path):
    require(GRADIO_MISSING)
    import signal
    import time

    from .tiny_models import free_port

    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        port = free_port()
        command = [sys.executable, "-m", "crane_hf.commands.cli", "app", "--model", tiny_model_dir]
        process = subprocess.Popen(
            [*command, "--device", "cpu", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**subprocess_environment(), "GRADIO_ANALYTICS_ENABLED": "False"},
            cwd=tmp_path,
        )
        try:
            deadline = time.monotonic() + 180
            lines = []
            while time.monotonic() < deadline:  # serving once Gradio prints its URL
                line = process.stdout.readline()
                lines.append(line)
                if not line or "Running on" in line:
                    break
            assert any("Running on" in line for line in lines), "".join(lines) + process.stderr.read()
            process.send_signal(signum)
            _, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == code, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert signal.Signals(signum).name in err


def test_app_shows_a_file_as_the_pipeline_reads_it(tmp_path):
    """An uploaded 16-bit image is scaled to 8 bits for the figure (not clipped to white), a photo is upright."""
    from crane_hf.reporting.gradio_app import _rgb

    from .test_reporting import _sixteen_bit_and_rotated

    sixteen, rotated, expected = _sixteen_bit_and_rotated(str(tmp_path))
    shown = _rgb(sixteen)
    assert shown.dtype == np.uint8 and shown.shape == (48, 64, 3)
    assert np.abs(shown[:, :, 0].astype(np.float64) - expected).max() <= 1
    assert _rgb(rotated).shape == (64, 48, 3)


def test_app_scores_every_readable_file_and_names_the_unreadable_ones(tiny_model_dir, tmp_path):
    """One unreadable file among several dropped ones: the others are scored, the bad one is named, none is lost."""
    require(GRADIO_MISSING)
    from crane_hf.commands import app as app_command

    write_test_images(tmp_path, count=2)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    app = app_command.build(argparse.Namespace(model=tiny_model_dir, clip=None, dino=None, device="cpu"))
    handlers = {function.fn.__name__: function.fn for function in app.fns.values() if function.fn}
    state = handlers["load"](tiny_model_dir, {})[0]
    files = [str(tmp_path / name) for name in ("part_0.png", "empty.png", "part_1.png", "corrupt.png")]
    state, text, _, table, _ = handlers["on_files"](files, state, 0.5, 0.5, "absolute")
    assert [row[0] for row in table] == ["part_0.png", "part_1.png"]
    assert [item["name"] for item in state["items"]] == ["part_0.png", "part_1.png"]
    assert "Not scored" in text and "empty.png" in text and "corrupt.png" in text
    state, text, *_ = handlers["on_files"]([str(tmp_path / "empty.png")], state, 0.5, 0.5, "absolute")
    assert "empty.png" in text and len(state["items"]) == 2  # the images already scored stay


def test_app_uploads_past_the_session_limit_keep_the_newest_under_their_own_names(tiny_model_dir, monkeypatch):
    """Past MAX_IMAGES the oldest image leaves; a new upload never takes the name of (and replaces) a newer one."""
    require(GRADIO_MISSING)
    from crane_hf.commands import app as app_command
    from crane_hf.reporting import gradio_app

    monkeypatch.setattr(gradio_app, "MAX_IMAGES", 2)
    app = app_command.build(argparse.Namespace(model=tiny_model_dir, clip=None, dino=None, device="cpu"))
    handlers = {function.fn.__name__: function.fn for function in app.fns.values() if function.fn}
    state = handlers["load"](tiny_model_dir, {})[0]
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    for image in images:
        state = handlers["on_image"](image, state, 0.5, 0.5, "absolute")[0]
    kept = state["items"]
    assert [item["name"] for item in kept] == ["upload-3", "upload-4"]
    assert all(np.array_equal(item["image"], image) for item, image in zip(kept, images[2:]))
