"""Outputs never lose a user's files (docs/robustness.md, "Outputs: never lose a user's files"): crane-hf replaces
only what it wrote, refuses outputs that are or contain what a run reads, one run per output, never reads its own
outputs as inputs, and every file name built from data stays inside the output folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import crane_hf.prediction.sharded_prediction as sharded_prediction
from crane_hf.commands.cli import main
from crane_hf.data import generate_synthetic_dataset
from crane_hf.io.output_names import (
    MARKER_NAME,
    MAX_NAME_BYTES,
    UnsafeOutputPathError,
    path_inside,
    safe_file_name,
    source_file_name,
)
from crane_hf.io.output_safety import (
    UnsafeOutputError,
    clean_stale_temporaries,
    output_lock,
    read_marker,
    unowned_entries,
)

from .tiny_models import subprocess_environment, write_test_images


def _snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), to show that nothing was lost or changed."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as stream:
                found[os.path.relpath(path, folder)] = stream.read()
    return found


def _predict(model: str, inputs: list[str], output, *extra: str) -> int:
    return main(["predict", *inputs, "--model", model, "--output", str(output), "--quiet", *extra])


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_dir):
    """A project folder (the working folder) holding images, a copy of the model and a home folder."""
    root = tmp_path / "project"
    write_test_images(root / "photos", count=3)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize(
    ("output", "named"),
    [
        (".", "it is the current working folder"),
        ("photos", "it is an input"),
        ("..", "it contains the current working folder"),
        ("MODEL", "it is the model folder"),
        ("HOME", "it is the home folder"),
        ("/", "it is /"),
    ],
)
def test_outputs_that_are_or_contain_what_the_run_reads_are_refused(
    project, tiny_model_dir, tmp_path, output, named, capsys
):
    output = {"MODEL": tiny_model_dir, "HOME": str(tmp_path / "home")}.get(output, output)
    before = _snapshot(tmp_path)
    assert _predict(tiny_model_dir, ["photos"], output, "--overwrite") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith(f"error: refusing to write {output}: {named}")
    assert _snapshot(tmp_path) == before  # nothing deleted, changed or created


def test_a_quoted_tilde_output_is_checked_and_written_at_the_same_place(project, tiny_model_dir, tmp_path, capsys):
    assert _predict(tiny_model_dir, ["photos"], "~", "--overwrite") == 2  # the shell left "~" alone: still home
    assert "it is the home folder" in capsys.readouterr().err
    assert _predict(tiny_model_dir, ["photos"], "~/results") == 0
    assert read_marker(str(tmp_path / "home" / "results"))["command"] == "predict"
    assert not os.path.exists("~")  # not written to ./~ after checking ~


def test_an_output_containing_an_input_file_is_refused(project, tiny_model_dir, capsys):
    assert _predict(tiny_model_dir, ["photos/part_0.png"], "photos", "--overwrite") == 2
    assert "it contains an input (photos/part_0.png)" in capsys.readouterr().err
    assert sorted(os.listdir("photos")) == ["part_0.png", "part_1.png", "part_2.png"]


def test_evaluate_refuses_the_dataset_root_and_train_the_dataset(tiny_model_dir, tmp_path, capsys):
    data = generate_synthetic_dataset(str(tmp_path / "data"), ["brick"], image_size=32, train_good=0, test_good=1)
    before = _snapshot(data)
    for output in (data, str(tmp_path)):
        argv = ["evaluate", "--model", tiny_model_dir, "--data", data, "--output", output, "--overwrite", "--quiet"]
        assert main(argv) == 2
        assert f"refusing to write {output}: it " in capsys.readouterr().err
        argv = ["train", "--data", data, "--clip", tiny_model_dir, "--output-dir", output, "--overwrite"]
        assert main(argv) == 2
        assert "the dataset root" in capsys.readouterr().err
    assert _snapshot(data) == before


def test_other_writing_commands_refuse_protected_outputs(project, tiny_model_dir, tmp_path, capsys):
    cases = [
        ["push", tiny_model_dir, "--repo-id", "a/b", "--dry-run", tiny_model_dir, "--overwrite"],
        ["demo", "--output", ".", "--offline", "--overwrite"],
        ["convert", "--clip", "c", "--checkpoint", "photos/part_0.png", "--variant", "crane", "--output", "photos"],
    ]
    before = _snapshot(tmp_path)
    for argv in cases:
        assert main(argv) == 2, argv
        assert "refusing to write" in capsys.readouterr().err, argv
    from crane_hf.data.synthetic import main as synthetic_main

    assert synthetic_main(["--output", ".", "--overwrite"]) == 2
    assert "it is the current working folder" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_only_what_crane_hf_wrote(project, tiny_model_dir, capsys):
    assert _predict(tiny_model_dir, ["photos"], "results") == 0
    marker = read_marker("results")
    assert marker["command"] == "predict" and "predictions.csv" in marker["files"]
    assert sorted(marker["files"]) == sorted(
        os.path.relpath(os.path.join(root, name), "results").replace(os.sep, "/")
        for root, _, files in os.walk("results")
        for name in files
        if name != MARKER_NAME
    )
    with open("results/overlays/my notes.txt", "w") as stream:
        stream.write("precious")
    os.symlink(os.path.abspath("photos"), "results/link")
    assert _predict(tiny_model_dir, ["photos"], "results", "--overwrite") == 2
    error = capsys.readouterr().err
    assert "holds files crane-hf did not write" in error and "my notes.txt" in error and "link" in error
    assert Path("results/overlays/my notes.txt").read_text() == "precious"
    os.remove("results/overlays/my notes.txt")
    os.remove("results/link")
    assert _predict(tiny_model_dir, ["photos"], "results", "--overwrite") == 0
    assert sorted(os.listdir("photos")) == ["part_0.png", "part_1.png", "part_2.png"]


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_the_manifest_records_the_size_and_sha256_of_every_file_written(project, tiny_model_dir):
    assert _predict(tiny_model_dir, ["photos"], "results", "--save-maps") == 0
    files = read_marker("results")["files"]
    on_disk = {
        os.path.relpath(os.path.join(root, name), "results").replace(os.sep, "/"): os.path.join(root, name)
        for root, _, names in os.walk("results")
        for name in names
        if name != MARKER_NAME
    }
    assert len(on_disk) == 3 + 3 + 2 and set(files) == set(on_disk)  # figures, maps, two tables
    assert files == {name: {"size": os.path.getsize(path), "sha256": _sha256(path)} for name, path in on_disk.items()}


def _forge(folder: str, change) -> None:
    marker = read_marker(folder)
    change(marker["files"])
    Path(folder, MARKER_NAME).write_text(json.dumps(marker))


@pytest.mark.parametrize(
    "forgery",
    [
        lambda files: files.update({"photo.png": {"size": 5, "sha256": "0" * 64}}),  # a made-up record
        lambda files: files.update({"photo.png": files["predictions.csv"]}),  # another file's record
        lambda files: files.update({"photo.png": {"size": 5}}),  # no hash
        lambda files: files.update({"photo.png": "ours"}),
    ],
)
def test_a_manifest_edited_to_list_a_users_file_does_not_make_it_deletable(project, tiny_model_dir, forgery, capsys):
    assert _predict(tiny_model_dir, ["photos"], "results") == 0
    Path("results/photo.png").write_bytes(b"mine!")
    _forge("results", forgery)
    before = _snapshot("results")
    assert unowned_entries("results") == ["results/photo.png"]
    capsys.readouterr()
    assert _predict(tiny_model_dir, ["photos"], "results", "--overwrite") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "did not write, or changed since it wrote them (results/photo.png)" in error
    assert _snapshot("results") == before
    os.remove("results/photo.png")
    assert _predict(tiny_model_dir, ["photos"], "results", "--overwrite") == 0  # crane-hf's own files: replaced


def test_a_users_file_under_the_name_of_one_of_ours_is_never_deleted(project, tiny_model_dir, capsys):
    assert _predict(tiny_model_dir, ["photos"], "results") == 0
    (figure,) = [name for name in sorted(os.listdir("results/overlays")) if "part_1" in name]
    Path("results/overlays", figure).write_bytes(b"the user's own picture, saved under that name")
    Path("results/predictions.csv").write_text("my edited table\n")
    before = _snapshot("results")
    capsys.readouterr()
    assert _predict(tiny_model_dir, ["photos"], "results", "--overwrite") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"results/overlays/{figure}" in error and "results/predictions.csv" in error
    assert _snapshot("results") == before
    shutil.move("results/predictions.csv", "my_table.csv")
    shutil.move(f"results/overlays/{figure}", "my_picture.png")
    assert _predict(tiny_model_dir, ["photos"], "results", "--overwrite") == 0


def test_a_manifest_of_names_only_is_not_proof_of_ownership(project, tiny_model_dir, capsys):
    """A manifest listing names without content (crane-hf before content hashes wrote such; or a forged one)."""
    assert _predict(tiny_model_dir, ["photos"], "results") == 0
    marker = read_marker("results")
    marker["files"] = sorted(marker["files"])
    Path("results", MARKER_NAME).write_text(json.dumps(marker))
    before = _snapshot("results")
    capsys.readouterr()
    assert _predict(tiny_model_dir, ["photos"], "results", "--overwrite") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "lists file names without their content" in error
    assert "delete it yourself, or choose another output" in error
    assert _snapshot("results") == before


def test_an_unmarked_folder_is_never_replaced_by_any_command(project, tiny_model_dir, tmp_path, capsys):
    os.makedirs("theirs")
    with open("theirs/data.bin", "wb") as stream:
        stream.write(b"x")
    from crane_hf.data.synthetic import main as synthetic_main

    assert synthetic_main(["--output", "theirs", "--classes", "brick", "--overwrite"]) == 2
    assert main(["push", tiny_model_dir, "--repo-id", "a/b", "--dry-run", "theirs", "--overwrite"]) == 2
    assert main(["train", "--data", "photos", "--clip", "c", "--output-dir", "theirs", "--overwrite"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all("theirs" in line and "not written by crane-hf" in line for line in errors)
    assert Path("theirs/data.bin").read_bytes() == b"x"


def test_a_second_run_on_a_locked_output_is_refused(project, tiny_model_dir, capsys):
    with output_lock(os.path.abspath("results")):  # another run holds the output
        assert _predict(tiny_model_dir, ["photos"], "results") == 2
    assert "is being written by another crane-hf run" in capsys.readouterr().err
    assert not os.path.exists("results")
    assert [name for name in os.listdir(".") if name.startswith(".")] == []  # the lock file went with its holder


def test_two_concurrent_runs_on_one_output_cannot_both_succeed(project, tiny_model_dir, tmp_path):
    write_test_images(tmp_path / "other", count=3, seed=5)
    command = [
        sys.executable,
        "-m",
        "crane_hf.commands.cli",
        "predict",
        "--model",
        tiny_model_dir,
        "--output",
        "shared",
    ]
    runs = [
        subprocess.Popen(
            [*command, inputs, "--quiet"], env=subprocess_environment(), stderr=subprocess.PIPE, text=True
        )
        for inputs in ("photos", str(tmp_path / "other"))
    ]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(error for code, error in results if code == 2)
    assert "being written by another crane-hf run" in loser or "already exists" in loser
    summary = json.loads(Path("shared/predictions.json").read_text())
    assert len(summary["predictions"]) == 3


def test_an_output_that_appears_during_the_run_is_not_replaced(project, tiny_model_dir, monkeypatch, capsys):
    real_write_tables = sharded_prediction.write_tables

    def someone_else_writes_the_output(folder, *args):
        os.makedirs(os.path.join(project, "results"))
        with open(os.path.join(project, "results", "theirs.txt"), "w") as stream:
            stream.write("theirs")
        return real_write_tables(folder, *args)

    monkeypatch.setattr(sharded_prediction, "write_tables", someone_else_writes_the_output)
    assert _predict(tiny_model_dir, ["photos"], "results") == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir("results") == ["theirs.txt"] and Path("results/theirs.txt").read_text() == "theirs"
    assert [name for name in os.listdir(".") if name.startswith(".")] == []  # no staging left


def test_inputs_never_include_crane_hf_outputs(project, tiny_model_dir, tmp_path, capsys):
    for _ in range(2):  # the second run would score the first run's overlays
        assert _predict(tiny_model_dir, ["photos"], "photos/results", "--overwrite") == 0
        summary = json.loads(Path("photos/results/predictions.json").read_text())
        assert sorted(os.path.basename(row["path"]) for row in summary["predictions"]) == [
            "part_0.png",
            "part_1.png",
            "part_2.png",
        ]
    assert _predict(tiny_model_dir, ["photos/**/*.png"], "photos/second") == 0  # other outputs are left out too
    assert len(json.loads(Path("photos/second/predictions.json").read_text())["predictions"]) == 3
    assert "note: left out photos/results (a crane-hf output folder" in capsys.readouterr().err
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    assert main(["calibrate", str(model), "photos", "--quiet"]) == 0
    record = json.loads((model / "calibration.json").read_text())
    assert record["normal_images"] == 3
    assert sorted(record["left_out"]) == ["photos/results", "photos/second"]


def test_output_names_are_unique_per_input_and_short(project, tiny_model_dir):
    Image.new("RGB", (20, 12), (10, 20, 30)).save("photos/000.png")
    Image.new("RGB", (20, 12), (30, 20, 10)).save("photos/000.jpg")
    long_name = "é" * 120 + ".png"  # 244 bytes; its overlay name would exceed 255 bytes
    assert len(("00000_photos_" + long_name + ".png").encode()) > 255
    Image.new("RGB", (20, 12), (1, 2, 3)).save(os.path.join("photos", long_name))
    assert _predict(tiny_model_dir, ["photos"], "results", "--save-maps") == 0
    rows = json.loads(Path("results/predictions.json").read_text())["predictions"]
    overlays = [row["overlay"] for row in rows]
    assert len(rows) == 6 and len(set(overlays)) == 6
    assert any(name.endswith("000.png.png") for name in overlays) and any(
        name.endswith("000.jpg.png") for name in overlays
    )
    for folder in ("results/overlays", "results/maps"):
        names = os.listdir(folder)
        assert len(names) == 6 and all(len(name.encode()) <= MAX_NAME_BYTES for name in names)


def test_safe_names_and_paths_inside_the_output(tmp_path):
    assert safe_file_name("../../etc/passwd") == ".._.._etc_passwd"
    assert safe_file_name("..") == "___" and safe_file_name("") == "_" and safe_file_name("a\x00b\nc") == "a_b_c"
    assert source_file_name("good/000.png", ".png") != source_file_name("good/000.jpg", ".png")
    long_a, long_b = "é" * 300 + "a.png", "é" * 300 + "b.png"
    short_a, short_b = safe_file_name(long_a, ".png"), safe_file_name(long_b, ".png")
    assert short_a != short_b and max(len(short_a.encode()), len(short_b.encode())) <= MAX_NAME_BYTES
    short_a.encode("utf-8").decode("utf-8")  # cut on character boundaries
    folder = tmp_path / "out"
    folder.mkdir()
    assert path_inside(str(folder), "a/b.png") == os.path.join(str(folder), "a", "b.png")
    (folder / "escape").symlink_to(tmp_path, target_is_directory=True)
    for bad in ("../x.png", "/etc/passwd", "a/../../x", "", "C:\\x", "a\x00b", "escape/x.png"):
        with pytest.raises(UnsafeOutputPathError, match="must stay inside"):
            path_inside(str(folder), bad)


def test_evaluate_overlays_stay_inside_the_output_whatever_the_class_names(tiny_model_dir, tmp_path):
    data = generate_synthetic_dataset(
        str(tmp_path / "data"), ["brick"], ["spot"], image_size=32, train_good=0, test_good=2, test_defective=1
    )
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    entries = meta["test"].pop("brick")
    absolute = str(tmp_path / "absolute")  # a class named by an absolute path
    Image.new("RGB", (32, 32)).save(tmp_path / "data" / "brick" / "test" / "good" / "000.jpg")  # same stem
    entries.append({**entries[0], "img_path": "brick/test/good/000.jpg"})
    evil = {"../../escaped": entries[:1], absolute: entries[1:2], ".": entries[2:]}
    for name, items in evil.items():
        for entry in items:
            entry["cls_name"] = name
    meta["test"] = evil
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    before = set(_snapshot(tmp_path))
    output = tmp_path / "out" / "report"
    argv = ["evaluate", "--model", tiny_model_dir, "--data", data, "--output", str(output), "--save-overlays"]
    assert main([*argv, "--quiet"]) == 0
    written = set(_snapshot(tmp_path)) - before
    assert written and all(path.startswith(os.path.join("out", "report") + os.sep) for path in written)
    overlays = sorted(path for path in written if path.endswith(".png"))
    assert len(overlays) == 4  # one per image: 000.png and 000.jpg of one class are two overlays
    assert not os.path.exists(absolute)


def test_leftovers_of_killed_runs_are_recognised_by_name_and_marker(project, tiny_model_dir):
    output = os.path.abspath("results")
    stale = f"{os.path.dirname(output)}/.results.crane-hf-tmp-killed"
    os.makedirs(f"{stale}/overlays")
    with open(f"{stale}/{MARKER_NAME}", "w") as stream:
        json.dump({"written_by": "crane-hf", "state": "staging", "files": []}, stream)
    foreign = f"{os.path.dirname(output)}/.results.crane-hf-tmp-but-not-ours"
    os.makedirs(foreign)  # the name alone is not enough: no marker and a file, never deleted
    Path(foreign, "mine.txt").write_text("a user's file")
    # killed between creating the folder and putting its marker in place: empty, or the marker's temporary file
    empty = f"{os.path.dirname(output)}/.results.crane-hf-tmp-killed-at-once"
    os.makedirs(empty)
    half_marked = f"{os.path.dirname(output)}/.results.crane-hf-tmp-killed-while-marking"
    os.makedirs(half_marked)
    Path(half_marked, f"{MARKER_NAME}.crane-hf-tmp-x1y2_abc").write_text('{"written_by": "cra')
    retired = f"{os.path.dirname(output)}/.results.crane-hf-old-killed"
    os.makedirs(f"{retired}/previous")
    with open(f"{retired}/{MARKER_NAME}", "w") as stream:
        json.dump({"written_by": "crane-hf", "state": "retired", "files": []}, stream)
    with open(f"{retired}/previous/kept.txt", "w") as stream:
        stream.write("the previous output, moved aside just before the kill")
    with output_lock(output):
        removed = clean_stale_temporaries(output)
    assert sorted(removed) == sorted([stale, retired, empty, half_marked])
    assert os.path.isdir(foreign) and not os.path.exists(stale) and not os.path.exists(retired)
    assert Path(foreign, "mine.txt").read_text() == "a user's file"
    assert Path("results/kept.txt").read_text().startswith("the previous output")  # put back, not deleted


def test_a_sigkilled_run_leaves_temporaries_that_the_next_run_cleans(project, tiny_model_dir, tmp_path):
    write_test_images(tmp_path / "many", count=200)
    command = [
        sys.executable,
        "-m",
        "crane_hf.commands.cli",
        "predict",
        str(tmp_path / "many"),
        "--model",
        tiny_model_dir,
    ]
    process = subprocess.Popen(
        [*command, "--output", "results", "--quiet"], env=subprocess_environment(), stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_staging(".results.crane-hf-partial", process)
    finally:
        process.kill()
        process.wait(timeout=60)
    left = [name for name in os.listdir(".") if name.startswith(".results.")]
    assert ".results.crane-hf-partial" in left  # kept for --resume (tests/test_predict_at_scale.py)
    assert _predict(tiny_model_dir, ["photos"], "results") == 0  # without --resume: discarded, started over
    assert [name for name in os.listdir(".") if name.startswith(".")] == []
    assert unowned_entries("results") == []


def _wait_for_staging(prefix: str, process: subprocess.Popen, seconds: float = 240) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if any(name.startswith(prefix) for name in os.listdir(".")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no {prefix}* folder appeared (exit code {process.poll()})")


def test_a_normal_run_writes_one_overlay_per_image(project, tiny_model_dir):
    """Control for the tests above: a normal run writes one overlay per image, inside the output."""
    assert _predict(tiny_model_dir, ["photos"], "results") == 0
    overlays = sorted(os.listdir("results/overlays"))
    assert len(overlays) == 3
    figure = Image.open(os.path.join("results/overlays", overlays[0]))  # the decision figure of a 64 x 48 image
    assert figure.text["Image size"] == "64x48" and os.path.basename(figure.text["Source"]) + ".png" in overlays[0]


def test_evaluate_overlays_of_rows_with_one_safe_name_are_both_kept(tmp_path):
    from crane_hf.evaluation.evaluate import _save_overlays

    write_test_images(tmp_path / "images", count=2)
    rows = [
        {"image": {"path": str(tmp_path / "images" / f"part_{i}.png"), "bytes": None}, "class_name": "a/b"}
        for i in range(2)
    ]
    rows[0]["image_path"], rows[1]["image_path"] = "x/y.png", "x__y.png"  # both become x__y.png.png
    rows[1]["class_name"] = "a_b"  # and both classes become a_b
    thresholds = SimpleNamespace(image_threshold=0.5, pixel_threshold=0.5)
    maps, scores = np.zeros((2, 8, 8), np.float32), np.array([0.2, 0.7], np.float32)
    written = _save_overlays(rows, [0, 1], maps, scores, thresholds, str(tmp_path / "overlays"))
    assert written == ["a_b/x__y.png.png", "a_b/x__y.png~1.png"]
    assert sorted(os.listdir(tmp_path / "overlays" / "a_b")) == ["x__y.png.png", "x__y.png~1.png"]


@pytest.mark.parametrize("claimed", ["docs", "docs/", "docs/sub"])
def test_a_manifest_owns_only_the_files_it_lists_never_a_folder_name(project, tiny_model_dir, claimed, capsys):
    os.makedirs("forged/docs/sub")
    Path("forged/docs/thesis.tex").write_text("mine")
    Path("forged/docs/sub/figure.txt").write_text("mine too")
    record = {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    Path(f"forged/{MARKER_NAME}").write_text(json.dumps({"written_by": "crane-hf", "files": {claimed: record}}))
    before = _snapshot("forged")
    assert sorted(unowned_entries("forged")) == ["forged/docs/sub/figure.txt", "forged/docs/thesis.tex"]
    assert _predict(tiny_model_dir, ["photos"], "forged", "--overwrite") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "holds files crane-hf did not write" in error and "thesis.tex" in error
    assert _snapshot("forged") == before


def test_an_earlier_output_moved_inside_another_is_not_replaced_with_it(project, tiny_model_dir, capsys):
    assert _predict(tiny_model_dir, ["photos"], "results") == 0
    assert _predict(tiny_model_dir, ["photos/part_0.png"], "archive_2024") == 0
    os.rename("archive_2024", "results/archive_2024")  # the user keeps last year's results in this year's folder
    archived = _snapshot("results/archive_2024")
    assert _predict(tiny_model_dir, ["photos"], "results", "--overwrite") == 2
    error = capsys.readouterr().err
    assert "holds files crane-hf did not write" in error and "results/archive_2024/" in error
    assert _snapshot("results/archive_2024") == archived
    shutil.move("results/archive_2024", "archive_2024")
    assert _predict(tiny_model_dir, ["photos"], "results", "--overwrite") == 0  # its own files alone: replaced


WINDOWS_REFUSED = set('<>:"|?*\\/') | {chr(code) for code in range(32)}
RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


@pytest.mark.parametrize("suffix", ["", ".png"])
def test_safe_file_names_are_portable(suffix):
    texts = ["A:scratch", "C:\\x", 'a?b*<c>|"d', "con", "CON.png", "Lpt1", "nul .txt", "end.", "space ", "..", "."]
    names = [safe_file_name(text, suffix) for text in texts]
    for text, name in zip(texts, names):
        assert not WINDOWS_REFUSED & set(name), (text, name)
        assert not name.endswith((".", " ")) and not re.match(r"^[A-Za-z]:", name), (text, name)
        assert name.split(".")[0].strip().upper() not in RESERVED, (text, name)
    assert len(set(names)) == len(names)
    assert safe_file_name("console") == "console" and safe_file_name("scratch 2.png") == "scratch 2.png"


def test_evaluate_overlays_of_a_drive_like_class_name_are_written(tiny_model_dir, tmp_path):
    data = generate_synthetic_dataset(
        str(tmp_path / "data"), ["brick"], ["spot"], image_size=32, train_good=0, test_good=2, test_defective=1
    )
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    entries = meta["test"].pop("brick")
    classes = {"A:scratch": entries[:1], "CON": entries[1:2], "dents.": entries[2:]}
    for name, items in classes.items():
        for entry in items:
            entry["cls_name"] = name
    meta["test"] = classes
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    output = tmp_path / "report"
    argv = ["evaluate", "--model", tiny_model_dir, "--data", data, "--output", str(output), "--save-overlays"]
    assert main([*argv, "--quiet"]) == 0
    assert sorted(os.listdir(output / "overlays")) == ["A_scratch", "_CON", "dents_"]
    assert sum(len(files) for _, _, files in os.walk(output / "overlays")) == 3


@pytest.mark.parametrize(
    "planted",
    [
        ".notes.crane-hf-tmp-mine",  # a file named like a temporary, but not in the form crane-hf gives them
        ".backup.crane-hf-lock",  # named like a lock, holding a user's text
        ".x.crane-hf-tmp-1/data.txt",  # a folder named like a temporary, with a marker that is not crane-hf's
        ".x.crane-hf-partial/data.txt",
        ".x.crane-hf-old-abcdefgh/previous/data.txt",
    ],
)
def test_a_users_file_named_like_a_temporary_inside_an_output_is_not_deleted(project, tiny_model_dir, planted, capsys):
    """Inside an output, only crane-hf's own leftovers are skipped: temporary files in the form `tempfile` names
    them, locks holding a process id, and folders holding a valid crane-hf marker of a temporary state."""
    assert _predict(tiny_model_dir, ["photos"], "results") == 0
    path = Path("results", planted)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a user's only copy")
    if path.parent != Path("results"):
        Path(path.parts[0], path.parts[1], MARKER_NAME).write_text("{}")  # not a crane-hf marker
    before = _snapshot("results")
    capsys.readouterr()
    assert _predict(tiny_model_dir, ["photos"], "results", "--overwrite") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "holds files crane-hf did not write" in error
    assert _snapshot("results") == before


def test_a_users_file_named_like_a_temporary_beside_an_output_is_not_deleted(project):
    output = os.path.abspath("results")
    kept = {
        ".results.crane-hf-tmp-my-notes.txt": "a user's file",  # not the form of a temporary file of crane-hf's
        ".results.crane-hf-tmp-mine/data.txt": "a user's folder, with a marker that is not crane-hf's",
        ".results.crane-hf-old-mine/previous/data.txt": "a user's folder, with a marker that is not crane-hf's",
    }
    for name, text in kept.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(text)
        if "/" in name:
            Path(name.split("/")[0], MARKER_NAME).write_text('{"state": "staging"}')
    with output_lock(output):
        assert clean_stale_temporaries(output) == []
    assert all(Path(name).read_text() == text for name, text in kept.items())
    assert not os.path.exists("results")


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_lock_file_that_is_a_link_to_a_users_file_is_refused_not_written_through(project, kind):
    """`.<output>.crane-hf-lock` planted as a link to a user's file: the lock never truncates or writes it."""
    Path("precious.txt").write_text("a user's only copy")
    if kind == "symlink":
        os.symlink("precious.txt", ".results.crane-hf-lock")
    else:
        os.link("precious.txt", ".results.crane-hf-lock")
    refused = pytest.raises(UnsafeOutputError, match=r"\.results\.crane-hf-lock.*not a lock crane-hf made")
    with refused, output_lock(os.path.abspath("results")):
        pass
    assert Path("precious.txt").read_text() == "a user's only copy"
    assert os.path.lexists(".results.crane-hf-lock")  # not crane-hf's: left for the user to look at


def test_an_output_under_a_link_to_nothing_is_named_as_such(project, tiny_model_dir, capsys):
    os.symlink("/nonexistent-crane-hf-target", "gone")
    assert _predict(tiny_model_dir, ["photos"], "gone/results") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "gone is a symbolic link to nothing" in error, error
    assert os.path.islink("gone") and not os.path.exists("/nonexistent-crane-hf-target")
