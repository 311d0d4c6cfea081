"""Refusals come before the work and create nothing; interruptions end cleanly (docs/robustness.md, "Fail before
work" and "Interrupted runs"): arguments, devices and the output's writability are checked before the model is
loaded; SIGINT / SIGTERM exit 130 / 143 with one line and no temporary files; an unwritable or full disk makes
`train` fail with one line and no half-published output."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import crane_hf.model_loading as model_loading
from crane_hf.commands.cli import main
from crane_hf.data import generate_synthetic_dataset
from crane_hf.io.output_safety import read_marker

from .tiny_models import subprocess_environment, write_test_images
from .training_fixtures import backbones, synthetic, tiny_training_args

__all__ = ["backbones", "synthetic"]  # fixtures used by name


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_model_dir):
    """Images, a dataset, a model copy; loading any model fails the test (every refusal comes before)."""
    write_test_images(tmp_path / "photos", count=2)
    generate_synthetic_dataset(str(tmp_path / "data"), ["brick"], ["spot"], image_size=32, train_good=0, test_good=1)
    shutil.copytree(tiny_model_dir, tmp_path / "model")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(model_loading, "load_model", no_loading)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _listing(folder) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
    )


PREDICT = ["predict", "photos", "--model", "model", "--output", "out"]
CALIBRATE = ["calibrate", "model", "photos"]
EVALUATE = ["evaluate", "--model", "model", "--data", "data", "--output", "out"]
GPU = torch.cuda.is_available()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*PREDICT, "--threshold", "2"], "--threshold 2: must be in [0, 1]"),
        ([*PREDICT, "--pixel-threshold", "-0.1"], "--pixel-threshold -0.1: must be in [0, 1]"),
        ([*PREDICT, "--threshold", "nan"], "--threshold nan: must be in [0, 1]"),
        ([*PREDICT, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        ([*CALIBRATE, "--fpr", "1.5"], "--fpr 1.5: must be in [0, 1)"),
        ([*CALIBRATE, "--pixel-fpr", "-1"], "--pixel-fpr -1: must be in [0, 1)"),
        ([*CALIBRATE, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        ([*EVALUATE, "--sigma", "-1"], "--sigma -1: must be in [0, 256]"),
        ([*EVALUATE, "--sigma", "1e9"], "--sigma 1e+09: must be in [0, 256]"),
        ([*EVALUATE, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["demo", "--output", "out", "--offline", "--steps", "0"], "--steps 0: must be at least 1"),
        ([*PREDICT, "--device", "foo"], "device 'foo' is unknown; use auto, cpu, cuda, cuda:N or mps."),
        ([*CALIBRATE, "--device", "foo"], "device 'foo' is unknown"),
        ([*EVALUATE, "--device", "foo"], "device 'foo' is unknown"),
        pytest.param(
            [*PREDICT, "--device", "cuda"], "has no cuda device", marks=pytest.mark.skipif(GPU, reason="GPU")
        ),
        pytest.param([*EVALUATE, "--device", "cuda:7"], "cuda:7", marks=pytest.mark.skipif(GPU, reason="GPU")),
        pytest.param(
            [*PREDICT, "--device", "mps"],
            "has no mps device",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS"),
        ),
        ([*PREDICT, "--output", "photos/part_0.png/out"], "photos/part_0.png is a file, not a folder"),
        ([*EVALUATE[:-1], "photos/part_0.png/out"], "photos/part_0.png is a file, not a folder"),
        (["demo", "--offline", "--output", "photos/part_0.png/out"], "photos/part_0.png is a file, not a folder"),
    ],
)
def test_refused_before_any_work_with_one_line_and_nothing_created(workspace, argv, message, capsys):
    before = _listing(workspace)
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert _listing(workspace) == before  # nothing created, the model folder untouched


def test_a_missing_model_folder_is_named_before_anything_is_written(tmp_path, capsys):
    write_test_images(tmp_path / "photos", count=1)
    (tmp_path / "model").mkdir()
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "photos"), "--model", str(tmp_path / "model"), "--output", str(out)]) == 2
    assert f"{tmp_path / 'model' / 'config.json'} is missing" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "photos"), "--model", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert f"no such model folder: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("spec", ["./model", "../model", "model", "models/crane", "~/nope-model"])
def test_a_missing_local_looking_model_is_named_not_sought_on_the_hub(tmp_path, monkeypatch, spec, capsys):
    write_test_images(tmp_path / "work" / "photos", count=1)
    (tmp_path / "work" / "models").mkdir()  # "models/crane": its first component is a local folder
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["predict", "photos", "--model", spec, "--output", "out", "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    named = os.path.expanduser(spec)  # "~" is the home folder, named as the path that was looked for
    assert error.startswith(f"error: no such model folder: {named}. Presets: crane/mvtec"), error  # one line
    assert "\n" not in error
    assert not os.path.exists("out")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "x", "--batch-size", "abc"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "crane-hf predict: error: argument --batch-size: invalid int value: 'abc' (see crane-hf predict --help)"
    ]


def test_exit_codes_are_documented_in_the_help():
    result = subprocess.run(["crane-hf", "--help"], capture_output=True, text=True, timeout=120)
    for line in ("0    success", "2    an argument", "3    finished, but some inputs were skipped", "130", "143"):
        assert line in result.stdout


def test_an_unwritable_model_folder_is_refused_before_calibrating(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import crane_hf.commands.calibrate as calibrate_module

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    write_test_images(tmp_path / "normal", count=2)
    real_mkstemp = __import__("tempfile").mkstemp

    def read_only(*args, dir=None, **kwargs):  # the folder refuses new files (a read-only mount, or permissions)
        if dir and os.path.realpath(dir) == os.path.realpath(model):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    monkeypatch.setattr(calibrate_module, "_calibrate", lambda *a: pytest.fail("scored before the refusal"))
    assert main(["calibrate", str(model), str(tmp_path / "normal"), "--quiet"]) == 2
    assert f"cannot write {model / 'config.json'}: {model} is not writable" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_scoring(tiny_model_dir, tmp_path, capsys):
    write_test_images(tmp_path / "photos", count=2)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        argv = ["predict", str(tmp_path / "photos"), "--model", tiny_model_dir, "--output", str(locked / "out")]
        assert main(argv) == 2
        assert "is not writable" in capsys.readouterr().err
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def _interruptible() -> None:
    """In the child before it starts: SIGINT back to its default. A test run started in the background by a shell
    without job control (`pytest ... &`, as CI harnesses do) inherits SIGINT ignored, and so would the command; a
    user's Ctrl-C reaches a command whose SIGINT is not ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(argv: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "crane_hf.commands.cli", *argv],
        cwd=cwd,
        env=subprocess_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_interruptible,
    )


def _wait_for(folder, prefix: str, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.isdir(folder) and any(name.startswith(prefix) for name in os.listdir(folder)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no {prefix}* appeared (exit code {process.poll()})")


@pytest.mark.parametrize(
    ("sent", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_sigint_and_sigterm_end_with_one_line_and_no_temporary_files(tiny_model_dir, tmp_path, sent, code, word):
    write_test_images(tmp_path / "many", count=200)
    process = _start(["predict", "many", "--model", tiny_model_dir, "--output", "out", "--quiet"], tmp_path)
    try:
        _wait_for(tmp_path / ".out.crane-hf-partial", "rows", process)
        process.send_signal(sent)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"crane-hf: {word} (") and "Traceback" not in stderr
    assert "rerun the same command with --resume" in stderr
    # No output, no temporary folder, no lock file: only the finished images, kept for --resume.
    assert sorted(os.listdir(tmp_path)) == [".out.crane-hf-partial", "many"]


def test_evaluate_interrupted_leaves_nothing(tiny_model_dir, tmp_path):
    data = generate_synthetic_dataset(str(tmp_path / "data"), ["brick", "coins"], image_size=64, test_good=30)
    process = _start(
        ["evaluate", "--model", tiny_model_dir, "--data", data, "--output", "out", "--save-overlays"], tmp_path
    )
    try:
        _wait_for(tmp_path, ".out.crane-hf-tmp-", process)
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_train_into_an_unwritable_place_is_one_line_and_creates_nothing(backbones, synthetic, tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    argv = ["train", *tiny_training_args(backbones, synthetic, tmp_path / "file" / "run"), "--cpu"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is a file, not a folder" in lines[0]
    assert os.listdir(tmp_path) == ["file"]


def test_train_on_a_full_disk_leaves_no_half_made_output(backbones, synthetic, tmp_path):
    import resource

    def small_disk():  # every file write past 20 kB fails as on a full disk (EFBIG instead of ENOSPC)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    output = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "crane_hf.train", *tiny_training_args(backbones, synthetic, output), "--cpu"],
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=small_disk,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "File too large" in errors[0] and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []  # the run created the folder and finished nothing: removed


def test_train_failing_while_publishing_keeps_the_previous_model_files(
    backbones, synthetic, tmp_path, monkeypatch, capsys
):
    import crane_hf.io.atomic as atomic_io

    output = tmp_path / "run"
    assert main(["train", *tiny_training_args(backbones, synthetic, output), "--cpu"]) == 0
    published = {name: (output / name).read_bytes() for name in os.listdir(output) if (output / name).is_file()}
    del published["training_log.jsonl"]  # appended to while training, not published
    del published[".crane-hf-output.json"]  # the manifest: it lists the complete checkpoint of epoch 2 too
    real_copy = atomic_io.shutil.copyfileobj

    def disk_full_at_the_weights(source, target, *args):  # the disk fills up while the weights are published
        if os.path.basename(source.name) == "model.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(source, target, *args)

    monkeypatch.setattr(atomic_io.shutil, "copyfileobj", disk_full_at_the_weights)
    argv = ["train", *tiny_training_args(backbones, synthetic, output, epochs=2), "--cpu", "--resume-from-checkpoint"]
    assert main([*argv, "latest"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == f"error: [Errno 28] No space left on device: '{output / 'model.safetensors'}'"
    monkeypatch.undo()
    now = {name: (output / name).read_bytes() for name in published}
    assert now == published  # every published file as it was: none of epoch 2's
    assert [name for name in os.listdir(output) if ".crane-hf-tmp-" in name] == []
    assert (output / "checkpoint-epoch-2").is_dir()  # the complete checkpoint stays, to resume or publish


def test_a_full_disk_while_predicting_names_the_output_and_keeps_only_the_marked_partial_results(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from PIL import Image

    write_test_images(tmp_path / "photos", count=2)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "photos"), "--model", tiny_model_dir, "--output", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err
    # The file that could not be written, in the partial folder a rerun with --resume takes up.
    last = error.strip().splitlines()[-1]
    partial = tmp_path / ".out.crane-hf-partial"
    assert last.startswith(f"error: [Errno 28] No space left on device: '{partial / 'overlays'}{os.sep}"), last
    assert last.endswith(".png'"), last
    # No output: only the marked partial folder, whose finished images a rerun with --resume keeps.
    assert "rerun the same command with --resume" in error
    assert sorted(os.listdir(tmp_path)) == [".out.crane-hf-partial", "photos"]
    assert read_marker(str(tmp_path / ".out.crane-hf-partial"))["state"] == "partial"


def test_a_full_disk_while_evaluating_names_the_file_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import crane_hf.io.atomic as atomic_io

    data = generate_synthetic_dataset(str(tmp_path / "data"), ["brick"], image_size=32, train_good=0, test_good=1)
    real_open = open

    def disk_full_at_the_metrics(path, *args, **kwargs):
        if os.path.basename(str(path)) == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(atomic_io, "open", disk_full_at_the_metrics, raising=False)
    out = tmp_path / "report"
    assert main(["evaluate", "--model", tiny_model_dir, "--data", data, "--output", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"error: [Errno 28] No space left on device: '{out / 'metrics.json'}'"
    assert sorted(os.listdir(tmp_path)) == ["data"]


@pytest.fixture
def calibrated(tiny_model_dir, tmp_path):
    """A copy of the tiny model calibrated once, and the normal images it was calibrated on."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    write_test_images(tmp_path / "normal", count=2)
    assert main(["calibrate", str(model), str(tmp_path / "normal"), "--quiet"]) == 0
    return model, tmp_path / "normal"


def _files(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


def test_a_full_disk_while_calibrating_names_the_file_and_changes_nothing(calibrated, monkeypatch, capsys):
    import crane_hf.io.atomic as atomic_io

    model, normal = calibrated
    before = _files(model)

    def disk_full(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_io.os, "fsync", disk_full)
    assert main(["calibrate", str(model), str(normal), "--fpr", "0.5", "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"error: [Errno 28] No space left on device: '{model / 'calibration.json'}'"
    assert _files(model) == before  # no temporary file left, no file changed


def test_calibrate_writes_config_and_record_together_or_neither(calibrated, monkeypatch, capsys):
    import crane_hf.io.atomic as atomic_io

    model, normal = calibrated
    before = _files(model)
    real_replace = os.replace

    def fail_at_the_config(source, target):
        if os.path.basename(target) == "config.json":
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(source, target)

    monkeypatch.setattr(atomic_io.os, "replace", fail_at_the_config)
    assert main(["calibrate", str(model), str(normal), "--fpr", "0.5", "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"error: [Errno 5] Input/output error: '{model / 'config.json'}'"
    assert _files(model) == before  # calibration.json, replaced first, has its previous content back


def test_calibrate_and_train_take_one_lock_per_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import crane_hf.commands.calibrate as calibrate_module
    import crane_hf.training.train as train_module
    from crane_hf.io.output_safety import output_lock

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    write_test_images(tmp_path / "normal", count=1)
    monkeypatch.setattr(calibrate_module, "_calibrate", lambda *a: pytest.fail("scored while the folder is locked"))
    with output_lock(str(model)):  # the lock a training run writing this folder holds (`_claim_output_dir`)
        assert main(["calibrate", str(model) + "/", str(tmp_path / "normal"), "--quiet"]) == 2
    assert "is being written by another crane-hf run" in capsys.readouterr().err
    args = argparse.Namespace(output_dir=str(model), overwrite=True, data=[], clip=None, dino=None, epochs=1)
    refused = pytest.raises(BlockingIOError, match="is being written by another crane-hf run")
    with calibrate_module.calibration_lock(str(model)), contextlib.ExitStack() as claim, refused:
        train_module._claim_output_dir(args, None, claim)  # a calibration of the folder: training it is refused
