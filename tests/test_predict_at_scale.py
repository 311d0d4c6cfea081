"""`crane-hf predict` at scale (docs/robustness.md, "Interrupted and resumed predictions"; docs/architecture.md):
several processes write the tables of one, a killed run resumed ends with the table of an uninterrupted run,
results are written as they are produced and never held, and datasets and lists of paths are inputs like folders."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import crane_hf.prediction.sharded_prediction as sharded_prediction
from crane_hf.commands.cli import main
from crane_hf.prediction.result_shards import read_records, shard_paths

from .interruptions import raise_on_call
from .test_output_safety import _snapshot
from .tiny_models import subprocess_environment, write_test_images


def _rows(folder) -> list[dict[str, str]]:
    with open(os.path.join(folder, "predictions.csv"), encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture
def images(tmp_path, monkeypatch):
    """Nine small images and an unreadable one, in the working folder; child processes see this checkout."""
    for name, value in subprocess_environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    write_test_images(tmp_path / "imgs", count=9)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    return tmp_path / "imgs"


def _cards(folder: str) -> list[dict[str, str]]:
    """The cards of a report.html (one per scored image): their data- attributes."""
    with open(os.path.join(folder, "report.html"), encoding="utf-8") as stream:
        html = stream.read()
    return [dict(re.findall(r'data-(\w+)="([^"]*)"', card)) for card in re.findall(r'<li class="card[^>]*>', html)]


def test_two_processes_write_the_tables_of_one(images, tiny_model_dir, capsys):
    common = ["--model", tiny_model_dir, "--quiet", "--batch-size", "2", "--save-maps", "--tables", "csv,json,jsonl"]
    common += ["--report", "--color-scale", "image"]
    assert main(["predict", "imgs", "--output", "one", "--workers", "0", *common]) == 3
    assert main(["predict", "imgs", "--output", "two", "--num-processes", "2", "--workers", "1", *common]) == 3
    one, two = _snapshot("one"), _snapshot("two")
    assert one == two  # tables, decision figures, maps, report.html, its thumbnails and manifest, byte for byte
    assert len(_cards("two")) == 9 and "report_files/thumbnails/000008.jpg" in one
    with Image.open("two/" + _rows("two")[4]["overlay"]) as figure:  # written by the second process
        assert figure.text["Source"].endswith(os.path.join("imgs", "part_4.png"))
        assert figure.text["Color scale"] == "image"
    rows = _rows("one")
    assert [os.path.basename(row["path"]) for row in rows] == [f"part_{i}.png" for i in range(9)]
    assert len({row["overlay"] for row in rows}) == 9 and all(row["sha256"] for row in rows)
    assert "broken.png" in one["skipped.txt"].decode()
    assert [json.loads(line)["path"] for line in one["predictions.jsonl"].decode().splitlines()] == [
        row["path"] for row in rows
    ]
    assert not [name for name in os.listdir(".") if name.startswith(".")]  # no partial folder, no lock left


def _damaged_copy(tiny_model_dir: str, damage: str) -> str:
    """A copy of the tiny model folder that the processes refuse once they load it (the parent's checks, which do
    not load the model, pass): a truncated weights file, or a threshold that is not a number."""
    folder = shutil.copytree(tiny_model_dir, f"model-{damage}")
    if damage == "weights":
        path = os.path.join(folder, "model.safetensors")
        with open(path, "r+b") as stream:
            stream.truncate(os.path.getsize(path) // 2)
    else:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as stream:
            config = json.load(stream)
        config["image_threshold"] = "high"
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as stream:
            json.dump(config, stream)
    return folder


@pytest.mark.parametrize(("damage", "named"), [("weights", "model.safetensors"), ("threshold", "image_threshold")])
def test_an_input_refused_in_the_processes_is_one_line_and_exit_2_as_on_one(
    images, tiny_model_dir, damage, named, capfd
):
    """--num-processes N reports what a process refuses as one process does: the same one line, exit code 2, no
    launcher traceback, nothing written."""
    model = _damaged_copy(tiny_model_dir, damage)
    argv = ["predict", "imgs", "--model", model, "--output", "out", "--quiet", "--workers", "0"]
    assert main(argv) == 2
    one = capfd.readouterr().err.strip().splitlines()[-1]
    assert one.startswith("error: ") and named in one, one
    assert main([*argv, "--num-processes", "2"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == one, err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [one]  # printed once
    assert not os.path.exists("out") and not [name for name in os.listdir(".") if name.startswith(".")]


def _wait_for_records(folder: str, count: int, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if sum(len(list(read_records(path))) for path in shard_paths(folder)) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {count} records appeared (exit code {process.poll()})")


def _kill_process_group(process: subprocess.Popen, seconds: float = 60) -> None:
    """SIGKILL the session `process` leads (it and its DataLoader workers: the kill of a whole run) and wait until
    none of them is left, so that nothing outlives the test."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=seconds)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _group_alive(process.pid):
        time.sleep(0.05)
    assert not _group_alive(process.pid), f"processes of group {process.pid} survived SIGKILL"


def _live_processes() -> dict[int, list[str]]:
    """pid -> the fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...), zombies that wait
    for their reaper left out; empty without procfs."""
    found = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as stream:
                    fields = stream.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                found[int(entry)] = fields
    return found


def _group_alive(group: int) -> bool:
    """Whether a process of `group` is still running (without procfs the kill of the group is all that can be
    checked)."""
    return any(int(fields[2]) == group for fields in _live_processes().values())


def test_a_killed_run_resumed_ends_with_the_table_of_an_uninterrupted_run(images, tiny_model_dir):
    write_test_images(images / "more", count=100, seed=3)
    command = [sys.executable, "-m", "crane_hf.commands.cli", "predict", "imgs", "--model", tiny_model_dir]
    command += ["--quiet", "--batch-size", "4", "--workers", "1"]
    process = subprocess.Popen(
        [*command, "--output", "out"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_for_records(".out.crane-hf-partial", 8, process)
    finally:
        _kill_process_group(process)
    (shard,) = shard_paths(".out.crane-hf-partial")
    records = list(read_records(shard))
    assert 8 <= len(records) < 110  # killed in the middle
    with open(shard, "a", encoding="utf-8") as stream:  # a kill while a line was written leaves it torn
        stream.write('{"index": 60, "path": "imgs/more/part_5')
    changed = next(record["path"] for record in records if "skipped" not in record)
    pixels = np.full((48, 64, 3), 200, np.uint8)
    Image.fromarray(pixels).save(changed)  # changed after it was scored: scored again on resume
    resumed = subprocess.run([*command, "--output", "out", "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 3, resumed.stderr
    kept = int(re.search(r"\((\d+) of them scored by the interrupted run", resumed.stdout).group(1))
    assert kept == sum("skipped" not in record for record in records) - 1
    fresh = subprocess.run([*command, "--output", "fresh"], capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 3, fresh.stderr
    assert _snapshot("out") == _snapshot("fresh")  # nothing lost, nothing twice, the changed image rescored
    rows = _rows("out")
    assert len(rows) == len({row["path"] for row in rows}) == 109
    assert not [name for name in os.listdir(".") if name.startswith(".")]


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    return [child for child, fields in _live_processes().items() if int(fields[1]) == pid]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_end_when_the_run_is_killed_alone(images, tiny_model_dir):
    """A SIGKILL of the run's process alone (a cron timeout, the OOM killer) leaves no DataLoader worker behind
    holding its shard and memory."""
    import signal

    write_test_images(images / "more", count=100, seed=3)
    command = [sys.executable, "-m", "crane_hf.commands.cli", "predict", "imgs", "--model", tiny_model_dir]
    command += ["--quiet", "--batch-size", "4", "--workers", "2", "--output", "out"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_records(".out.crane-hf-partial", 4, process)
        workers = _children(process.pid)
        assert workers, "the run started no DataLoader worker"
        os.kill(process.pid, signal.SIGKILL)  # the run alone, not its process group
        process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, os.WNOHANG)
            time.sleep(0.05)
        alive = sorted(set(workers) & set(_live_processes()))
        assert not alive, f"DataLoader workers {alive} outlived the killed run"
    finally:
        _kill_process_group(process)


def test_interrupted_then_resumed_in_process_with_other_settings_refused(images, tiny_model_dir, monkeypatch, capsys):
    argv = ["predict", "imgs", "--model", tiny_model_dir, "--output", "out", "--quiet", "--batch-size", "2"]
    real = raise_on_call(monkeypatch, sharded_prediction, "_score_batch", 3)  # after two batches
    assert main([*argv, "--workers", "0"]) == 130
    assert "rerun the same command with --resume" in capsys.readouterr().err
    (shard,) = shard_paths(".out.crane-hf-partial")
    assert len(list(read_records(shard))) == 4  # both finished batches were on disk before the interruption
    assert not os.path.exists("out")
    monkeypatch.setattr(sharded_prediction, "_score_batch", real)
    assert main([*argv, "--resume", "--threshold", "0.25"]) == 2  # checked once the model is loaded
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]
    assert last.startswith("error: --resume:") and "threshold None" in last and "Traceback" not in error
    assert main([*argv, "--resume", "--no-overlays"]) == 2
    assert "overlays True" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main([*argv, "--resume", "--report"]) == 3  # the report is no run setting: it is built at the end
    assert "(3 of them scored by the interrupted run" in capsys.readouterr().out  # the 4th record: broken.png
    cards, rows = _cards("out"), _rows("out")
    assert len(cards) == len(rows) == 9  # the interrupted run's images too
    assert sorted(float(card["score"]) for card in cards) == sorted(float(row["score"]) for row in rows)
    assert all(os.path.isfile(os.path.join("out", row["overlay"])) for row in rows)
    assert main([*argv, "--overwrite"]) == 3  # a plain run starts over
    assert len(_rows("out")) == 9


def test_a_plain_run_discards_partial_results_and_says_so(images, tiny_model_dir, monkeypatch, capsys):
    real = raise_on_call(monkeypatch, sharded_prediction, "_score_batch", 1)
    argv = ["predict", "imgs", "--model", tiny_model_dir, "--output", "out", "--quiet", "--workers", "0"]
    assert main(argv) == 130
    monkeypatch.setattr(sharded_prediction, "_score_batch", real)
    assert main(argv) == 3
    assert "note: discarded the partial results of an interrupted run on out" in capsys.readouterr().err


class _Killed(BaseException):
    """Stands for a SIGKILL at a chosen point: nothing of the run's own cleanup is run after it."""


@pytest.mark.parametrize("killed_at", ["marker", "settings"])
def test_a_run_killed_while_making_its_partial_folder_does_not_block_the_next(
    images, tiny_model_dir, monkeypatch, killed_at
):
    """Killed between making its partial folder and completing it: what is left is a temporary folder the next run
    removes, never an unmarked partial folder that the next run would refuse ("move it away")."""
    import crane_hf.io.output_safety as output_safety

    argv = ["predict", "imgs", "--model", tiny_model_dir, "--output", "out", "--quiet", "--workers", "0"]
    if killed_at == "marker":
        monkeypatch.setattr(output_safety, "write_marker", lambda *args, **kwargs: (_ for _ in ()).throw(_Killed))
    else:
        real_open = open

        def killed_writing_settings(file, mode="r", *args, **kwargs):
            if str(file).endswith(output_safety.PARTIAL_SETTINGS) and "w" in mode:
                raise _Killed
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", killed_writing_settings)
    with pytest.raises(_Killed):
        main(argv)
    monkeypatch.undo()  # (this also undoes the fixture's change of folder)
    monkeypatch.chdir(images.parent)
    left = sorted(name for name in os.listdir(".") if name.startswith(".out."))
    assert ".out.crane-hf-partial" not in left and left and all(".out.crane-hf-tmp-" in name for name in left)
    assert main(argv) == 3  # the next run cleans what was left and completes (one unreadable image: exit 3)
    assert len(_rows("out")) == 9
    assert sorted(name for name in os.listdir(".") if name.startswith(".out.")) == []


@pytest.mark.parametrize("killed_at", ["second figure", "second publication"])
def test_a_run_killed_between_a_figure_and_its_record_resumes_to_the_table_of_an_uninterrupted_run(
    images, tiny_model_dir, monkeypatch, killed_at
):
    """Killed in the middle of a batch: after a decision figure was written but before the batch's records were on
    disk, or after they were but before the figures got their names. `--resume` takes the partial folder up (never
    "a file crane-hf did not write": every figure there has its record) and ends with an uninterrupted run's output;
    a record whose figure is not there is scored again, so no row names a missing figure."""
    import crane_hf.reporting.decision_figure as decision_figure

    argv = ["predict", "imgs", "--model", tiny_model_dir, "--quiet", "--batch-size", "2", "--workers", "0"]
    # batch 1: broken.png and part_0.png (one figure); batch 2: part_1.png and part_2.png
    if killed_at == "second figure":  # the 3rd figure: batch 2's second, its first one complete
        raise_on_call(monkeypatch, decision_figure, "save_decision_figure", 3, _Killed)
    else:  # the 3rd figure given its name: batch 2's second

        def an_overlay(source, target, *args, **kwargs):
            return os.sep + "overlays" + os.sep in str(target)

        raise_on_call(monkeypatch, os, "replace", 3, _Killed, counts=an_overlay)
    with pytest.raises(_Killed):
        main([*argv, "--output", "out"])
    monkeypatch.undo()
    monkeypatch.chdir(images.parent)
    assert main([*argv, "--output", "out", "--resume"]) == 3, "the interrupted run was not taken up"
    assert main([*argv, "--output", "fresh"]) == 3
    assert _snapshot("out") == _snapshot("fresh")
    rows = _rows("out")
    assert len(rows) == 9 and all(os.path.isfile(os.path.join("out", row["overlay"])) for row in rows)
    assert sorted(os.listdir("out/overlays")) == sorted(os.path.basename(row["overlay"]) for row in rows)
    assert not [name for name in os.listdir(".") if name.startswith(".")]


@pytest.mark.parametrize("killed_at", ["thumbnail", "report page"])
def test_a_run_killed_while_building_its_report_resumes_without_scoring_again(
    images, tiny_model_dir, monkeypatch, killed_at, capsys
):
    """Killed while report.html and its thumbnails were written (every image scored, the tables written): the
    partial folder is taken up by --resume (its half-built report is crane-hf's), no image is scored again and the
    output is an uninterrupted run's."""
    import crane_hf.reporting.run_report as run_report

    argv = ["predict", "imgs", "--model", tiny_model_dir, "--quiet", "--batch-size", "4", "--workers", "0", "--report"]
    if killed_at == "thumbnail":
        raise_on_call(monkeypatch, run_report, "_thumbnail", 3, _Killed)
    else:
        real_open = open

        def killed_writing_the_page(file, mode="r", *args, **kwargs):
            if str(file).endswith("report.html") and "w" in mode:
                stream = real_open(file, mode, *args, **kwargs)
                stream.write("<html><body>half")
                stream.close()
                raise _Killed
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", killed_writing_the_page)
    with pytest.raises(_Killed):
        main([*argv, "--output", "out"])
    monkeypatch.undo()
    monkeypatch.chdir(images.parent)
    capsys.readouterr()
    assert main([*argv, "--output", "out", "--resume"]) == 3, capsys.readouterr().err
    assert "(9 of them scored by the interrupted run" in capsys.readouterr().out  # none scored again
    assert main([*argv, "--output", "fresh"]) == 3
    out, fresh = _snapshot("out"), _snapshot("fresh")
    assert sorted(out) == sorted(fresh)
    assert {name: out[name] for name in out if "report" not in name} == {
        name: fresh[name] for name in fresh if "report" not in name
    }
    assert len(_cards("out")) == 9 and b"</html>" in out["report.html"]
    assert not [name for name in os.listdir(".") if name.startswith(".")]


def test_an_empty_partial_folder_from_a_killed_run_is_taken_as_none(images, tiny_model_dir):
    """An earlier version made the partial folder before its marker: killed in between, it left an empty folder (or
    one holding only the marker's temporary file), which holds nothing of anyone's: the next run starts anew."""
    os.makedirs(".out.crane-hf-partial")
    (images.parent / ".out.crane-hf-partial" / ".crane-hf-output.json.crane-hf-tmp-k2x9_q0z").write_text('{"sta')
    argv = ["predict", "imgs", "--model", tiny_model_dir, "--output", "out", "--quiet"]
    assert main(argv) == 3
    assert len(_rows("out")) == 9 and not os.path.exists(".out.crane-hf-partial")


def test_partial_folders_crane_hf_did_not_write_are_never_used_or_removed(images, tiny_model_dir, capsys):
    os.makedirs(".out.crane-hf-partial")
    (images.parent / ".out.crane-hf-partial" / "mine.txt").write_text("mine")
    argv = ["predict", "imgs", "--model", tiny_model_dir, "--output", "out", "--quiet"]
    assert main(argv) == 2
    assert "is not the partial results of a crane-hf predict run" in capsys.readouterr().err
    assert (images.parent / ".out.crane-hf-partial" / "mine.txt").read_text() == "mine"


def test_a_user_file_in_a_marked_partial_folder_is_never_discarded_nor_published(
    images, tiny_model_dir, monkeypatch, capsys
):
    """The partial folder is crane-hf's, but a file a user put into it is not: neither a plain rerun (which would
    discard the folder) nor --resume (which would publish the file as the run's own) touches it."""
    real = raise_on_call(monkeypatch, sharded_prediction, "_score_batch", 1)
    argv = ["predict", "imgs", "--model", tiny_model_dir, "--output", "out", "--quiet", "--workers", "0"]
    assert main(argv) == 130
    monkeypatch.setattr(sharded_prediction, "_score_batch", real)
    partial = images.parent / ".out.crane-hf-partial"
    (partial / "notes.txt").write_text("mine")
    (partial / "overlays" / "mydir").mkdir(parents=True)
    (partial / "overlays" / "mydir" / "y.txt").write_text("mine too")
    capsys.readouterr()
    for extra in ([], ["--resume"]):
        assert main([*argv, *extra]) == 2
        error = capsys.readouterr().err
        assert "notes.txt, overlays/mydir/y.txt" in error and "did not write there" in error, error
        assert (partial / "notes.txt").read_text() == "mine" and (partial / "overlays" / "mydir" / "y.txt").exists()
        assert not os.path.exists("out")
    (partial / "notes.txt").unlink()
    shutil.rmtree(partial / "overlays" / "mydir")
    assert main([*argv, "--resume"]) == 3 and len(_rows("out")) == 9  # the run's own files alone: resumed


def _interrupted_after(batches: int, argv: list[str], monkeypatch) -> None:
    """Run `argv` in this process, interrupted (Ctrl-C) after `batches` batches; leaves the partial folder."""
    real = raise_on_call(monkeypatch, sharded_prediction, "_score_batch", batches + 1)
    assert main(argv) == 130
    monkeypatch.setattr(sharded_prediction, "_score_batch", real)


def test_resumed_with_fewer_images_leaves_no_figure_of_an_image_no_longer_listed(images, tiny_model_dir, monkeypatch):
    """Interrupted after 9 of 10 positions; two images are removed from the folder before --resume: the output has
    no figure or map of a position beyond the new list (each figure in overlays/ is named by a row), as a fresh run
    on the images left."""
    argv = ["predict", "imgs", "--model", tiny_model_dir, "--quiet", "--workers", "0", "--batch-size", "3"]
    argv += ["--save-maps"]
    _interrupted_after(3, [*argv, "--output", "out"], monkeypatch)
    os.remove("imgs/part_6.png")
    os.remove("imgs/part_7.png")
    assert main([*argv, "--output", "out", "--resume"]) == 3
    assert main([*argv, "--output", "fresh"]) == 3
    assert _snapshot("out") == _snapshot("fresh")
    rows = _rows("out")
    assert len(rows) == 7
    assert sorted(os.listdir("out/overlays")) == sorted(os.path.basename(row["overlay"]) for row in rows)
    assert len(os.listdir("out/maps")) == 7


@pytest.mark.parametrize("replaced", ["figure", "map", "shard", "settings", "marker lists a user file"])
def test_a_users_file_under_a_partial_files_name_is_never_discarded_nor_published(
    images, tiny_model_dir, monkeypatch, replaced, capsys
):
    """Files of a partial folder are crane-hf's only with the content it wrote (figures and maps: the records of
    the shards; shards: prediction records; settings and tables: the marker), not by their names."""
    argv = ["predict", "imgs", "--model", tiny_model_dir, "--output", "out", "--quiet", "--workers", "0"]
    argv += ["--batch-size", "2", "--save-maps"]
    _interrupted_after(2, argv, monkeypatch)
    partial = images.parent / ".out.crane-hf-partial"
    (shard,) = shard_paths(str(partial))
    name = {
        "figure": sorted(os.listdir(partial / "overlays"))[1],
        "map": sorted(os.listdir(partial / "maps"))[0],
        "shard": os.path.basename(shard),
        "settings": "run-settings.json",
        "marker lists a user file": "notes.txt",
    }[replaced]
    path = {"figure": partial / "overlays", "map": partial / "maps", "shard": partial / "rows"}.get(replaced, partial)
    path = path / name
    if replaced == "marker lists a user file":
        marker = json.loads((partial / ".crane-hf-output.json").read_text())
        marker["files"]["notes.txt"] = marker["files"]["run-settings.json"]
        (partial / ".crane-hf-output.json").write_text(json.dumps(marker))
    path.write_text('{"the user\'s": "own file"}\n')
    before = _snapshot(str(partial))
    capsys.readouterr()
    for extra in ([], ["--resume"]):
        assert main([*argv, *extra]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        named = "maps/" if replaced == "shard" else name  # a damaged shard proves none of the files it recorded
        assert last.startswith("error: refusing to use") and named in last and "did not write there" in last, last
        assert _snapshot(str(partial)) == before and not os.path.exists("out")
    os.remove(path)
    if replaced == "shard":  # the figures and maps it recorded have lost their proof with it
        assert main(argv) == 2 and "overlays/" in capsys.readouterr().err.strip().splitlines()[-1]
        return
    assert main(argv) == 3 and len(_rows("out")) == 9  # the rest is crane-hf's: discarded, and the run done


def test_report_links_open_the_images_from_the_report_folder(images, tiny_model_dir):
    """Inputs given relative to the working folder: the report's "image" and "figure" links, relative to the
    report's own folder, lead to the files."""
    argv = ["predict", "imgs", "--model", tiny_model_dir, "--output", "out", "--quiet", "--workers", "0", "--report"]
    assert main(argv) == 3
    with open(os.path.join("out", "report.html"), encoding="utf-8") as stream:
        links = re.findall(r'<a href="([^"]+)">(image|figure)</a>', stream.read())
    assert sorted(kind for _, kind in links) == ["figure"] * 9 + ["image"] * 9
    for link, _ in links:
        assert os.path.isfile(os.path.join("out", link)), link


def test_results_are_on_disk_as_they_are_produced_and_not_held(images, tiny_model_dir, monkeypatch):
    """Structural check of flat memory (benchmarks/predict_throughput.py measures it): after each batch the shard on
    disk holds every record so far, and the report holds counts, not rows."""
    real, seen = sharded_prediction._score_batch, []

    def checking(pipe, batch, *args):
        folder = args[3]  # (forward_params, postprocess_params, decision, folder, save_maps, figures)
        seen.append(sum(len(list(read_records(path))) for path in shard_paths(folder)))
        return real(pipe, batch, *args)

    monkeypatch.setattr(sharded_prediction, "_score_batch", checking)
    argv = ["predict", "imgs", "--model", tiny_model_dir, "--output", "out", "--quiet", "--batch-size", "3"]
    assert main([*argv, "--workers", "0", "--no-overlays"]) == 3
    assert seen == [0, 3, 6, 9]  # flushed after every batch
    report_fields = set(vars(sharded_prediction.PredictionReport()))
    assert "rows" not in report_fields and {"scored", "anomalous"} <= report_fields


def test_a_list_of_paths_and_a_parquet_dataset_give_the_rows_of_the_folder(images, tiny_model_dir):
    import datasets

    argv = ["--model", tiny_model_dir, "--quiet", "--no-overlays", "--tables", "csv,parquet"]
    assert main(["predict", "imgs", "--output", "folder", *argv]) == 3
    paths = sorted(str(path.relative_to(images.parent)) for path in images.glob("part_*.png"))
    (images.parent / "list.txt").write_text("\n".join(paths) + "\n\n")
    assert main(["predict", "--paths-from", "list.txt", "--output", "listed", *argv]) == 0
    table = datasets.Dataset.from_dict({"image": paths, "image_path": paths}).cast_column("image", datasets.Image())
    table.map(lambda row: row).to_parquet("images.parquet")  # the image bytes embedded in the file
    assert main(["predict", "--dataset", "images.parquet", "--output", "dataset", *argv]) == 0
    expected = [row for row in _rows("folder")]
    assert _rows("listed") == expected and _rows("dataset") == expected
    parquet = datasets.Dataset.from_parquet("dataset/predictions.parquet")
    assert parquet["score"] == [float(row["score"]) for row in expected]


def _parquet_of(paths: list[str], target: str, names: list | None = None) -> None:
    """A Parquet file holding the bytes of the images `paths` (and an `image_path` column `names`, if given)."""
    from pathlib import Path

    import datasets

    columns = {"image": [{"bytes": Path(path).read_bytes(), "path": None} for path in paths]}
    features = {"image": datasets.Image()}
    if names is not None:
        columns["image_path"], features["image_path"] = names, datasets.Value("string")
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(target)


def test_a_dataset_folder_laid_out_by_split_gives_the_rows_of_the_split_asked(images, tiny_model_dir, capsys):
    """Parquet files named by split (data/train-*.parquet, data/test-*.parquet, the Hub's layout): --split picks
    its files, never the rows of every split; a split that is not there, or --split other than train for Parquet
    files that make one split, is one line before the model is loaded."""
    parts = sorted(str(path) for path in images.glob("part_*.png"))
    os.makedirs("by_split/data")
    _parquet_of(parts[:2], "by_split/data/train-00000-of-00001.parquet")
    _parquet_of(parts[2:5], "by_split/data/test-00000-of-00001.parquet")
    argv = ["predict", "--model", tiny_model_dir, "--quiet", "--no-overlays", "--workers", "0"]
    assert main([*argv, "--dataset", "by_split", "--split", "test", "--output", "test"]) == 0
    assert main([*argv, *parts[2:5], "--output", "files"]) == 0
    scores = [row["score"] for row in _rows("files")]
    assert [row["score"] for row in _rows("test")] == scores
    assert main([*argv, "--dataset", "by_split", "--output", "train"]) == 0  # --split train by default
    assert len(_rows("train")) == 2
    capsys.readouterr()
    for dataset, split in (("by_split", "validation"), ("by_split/data/test-00000-of-00001.parquet", "test")):
        assert main([*argv, "--dataset", dataset, "--split", split, "--output", "refused"]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --split {split}:") and "Traceback" not in err, err
        assert not os.path.exists("refused")


def test_parquet_files_without_one_schema_or_not_parquet_are_one_line_naming_the_file(images, tiny_model_dir, capsys):
    """A folder of Parquet files whose columns differ, or a file that is not Parquet: one line naming the file, before
    the model is loaded (was: the traceback of `datasets`, exit 1)."""
    parts = sorted(str(path) for path in images.glob("part_*.png"))
    os.makedirs("mixed")
    _parquet_of(parts[:2], "mixed/a.parquet")
    _parquet_of(parts[2:4], "mixed/b.parquet", names=["x.png", "y.png"])
    os.makedirs("broken")
    (images.parent / "broken" / "a.parquet").write_bytes(b"not parquet at all")
    argv = ["predict", "--model", tiny_model_dir, "--quiet", "--no-overlays", "--workers", "0", "--output", "out"]
    capsys.readouterr()
    for dataset, named in (("mixed", "b.parquet"), ("broken", "a.parquet")):
        assert main([*argv, "--dataset", dataset]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --dataset {dataset}:") and named in lines[0], err
        assert not os.path.exists("out")


def test_dataset_rows_without_an_image_path_are_named_by_their_row(images, tiny_model_dir):
    """An `image_path` column with an empty cell: that row is named SPEC[row], never "None"."""
    parts = sorted(str(path) for path in images.glob("part_*.png"))
    _parquet_of(parts[:3], "named.parquet", names=["a.png", None, ""])
    argv = ["predict", "--model", tiny_model_dir, "--quiet", "--no-overlays", "--workers", "0", "--output", "out"]
    assert main([*argv, "--dataset", "named.parquet"]) == 0
    assert [row["path"] for row in _rows("out")] == ["a.png", "named.parquet[1]", "named.parquet[2]"]


def test_torn_last_lines_are_ignored_and_other_damage_refused(tmp_path):
    shard = tmp_path / "rows" / "run-0001-process-00000.jsonl"
    shard.parent.mkdir()
    good = json.dumps({"index": 0, "path": "a.png", "run": 1, "skipped": "x"})
    shard.write_text(good + "\n" + '{"index": 1, "pa')
    assert [record["path"] for record in read_records(str(shard))] == ["a.png"]
    shard.write_text(good + "\n" + "garbage\n" + good + "\n")
    with pytest.raises(ValueError, match=r"run-0001-process-00000.jsonl, line 2: not a prediction record"):
        list(read_records(str(shard)))


def test_bad_arguments_are_one_line_before_any_work(images, tiny_model_dir, capsys):
    base = ["predict", "--model", tiny_model_dir, "--output", "out", "--quiet"]
    cases = [
        ([*base, "imgs", "--tables", "csv,xlsx"], "--tables csv,xlsx: choose among"),
        ([*base, "imgs", "--num-processes", "0"], "--num-processes 0: must be at least 1"),
        ([*base, "imgs", "--workers", "-1"], "--workers -1: must be at least 0"),
        ([*base], "inputs: name image files"),
        ([*base, "--paths-from", "missing.txt"], "--paths-from missing.txt: cannot be read"),
        ([*base, "imgs", "--dataset", "x.parquet"], "--dataset: give either"),
        ([*base, "--dataset", "none/*.parquet"], "--dataset none/*.parquet: cannot be loaded"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and message in error, (argv, error)
    assert not os.path.exists("out") and not [name for name in os.listdir(".") if name.startswith(".")]


@pytest.mark.parametrize(("sent", "code", "word"), [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_signal_to_two_processes_ends_with_one_line_and_its_code(tiny_model_dir, tmp_path, sent, code, word):
    """`--num-processes 2` stopped by SIGTERM or Ctrl-C mid-run: the code of a one-process run, crane-hf's one line
    and no traceback (the launcher's own traceback on a signal is not a bug), the finished images kept."""
    import signal
    import textwrap

    write_test_images(tmp_path / "imgs", count=40)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # slow scoring, so that the signal comes mid-run
        textwrap.dedent(
            """
            import time
            import crane_hf.prediction.sharded_prediction as sharded

            original = sharded._score_batch

            def _score_batch(*args, **kwargs):
                time.sleep(0.5)
                return original(*args, **kwargs)

            sharded._score_batch = _score_batch
            """
        )
    )
    env = subprocess_environment()
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    command = [shutil.which("crane-hf"), "predict", str(tmp_path / "imgs"), "--model", tiny_model_dir]
    command += ["--output", str(tmp_path / "out"), "--quiet", "--no-overlays", "--batch-size", "1"]
    process = subprocess.Popen(
        [*command, "--num-processes", "2"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    rows = tmp_path / ".out.crane-hf-partial" / "rows"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not (rows.is_dir() and any(rows.iterdir())):
        time.sleep(0.1)
    time.sleep(1)
    process.send_signal(getattr(signal, sent))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == code, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert "Traceback" not in stderr, stderr
    assert lines[-1].startswith(f"crane-hf: {word} ({sent})"), lines
    assert not (tmp_path / "out").exists() and rows.is_dir()


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("launched_by", ["--num-processes", "accelerate launch"])
def test_a_two_process_run_killed_alone_leaves_no_process_scoring_on(images, tiny_model_dir, launched_by):
    """SIGKILL of `crane-hf predict --num-processes 2` or of `accelerate launch -m crane_hf.predict` alone (a cron
    timeout, the OOM killer, `kill -9` of the PID a scheduler knows): the processes it started end with it (they
    used to score on, holding the devices, and publish the output of a run that was killed); `--resume` then
    finishes the run."""
    import signal

    from crane_hf.commands.process_launch import accelerate_launch_command

    write_test_images(images / "more", count=30, seed=4)
    arguments = ["imgs", "--model", tiny_model_dir, "--quiet", "--no-overlays"]
    arguments += ["--workers", "1", "--batch-size", "1", "--output", "out"]
    command = [shutil.which("crane-hf"), "predict", *arguments]
    if launched_by == "--num-processes":
        started_command = [*command, "--num-processes", "2"]
    else:
        started_command = [*accelerate_launch_command("crane_hf.predict", 2), *arguments]
    process = subprocess.Popen(started_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: set[int] = set()
    try:
        _wait_for_records(".out.crane-hf-partial", 2, process)
        started = _descendants(process.pid)
        assert len(started) >= 3  # the launcher and its two processes, at least
        os.kill(process.pid, signal.SIGKILL)  # the run alone, not its process group
        process.wait(timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and set(_live_processes()) & started:
            time.sleep(0.1)
        alive = set(_live_processes()) & started
        assert not alive, f"processes {alive} of the killed run scored on"
    finally:
        for pid in _descendants(process.pid) | (set(_live_processes()) & started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not os.path.exists("out")
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 3, resumed.stderr
    assert len(_rows("out")) == 39


def test_the_sha256_of_a_row_is_that_of_the_bytes_scored_when_the_file_is_rewritten_meanwhile(
    images, tiny_model_dir, monkeypatch
):
    """A file rewritten while the run reads it (a camera still writing, a sync): the row's SHA-256 is that of the
    very bytes whose pixels were scored, never the SHA-256 of one version beside the score of another (which a
    resumed run would then keep as done)."""
    import hashlib

    os.makedirs("one")
    shutil.copy("imgs/part_0.png", "one/image.png")
    before = (images.parent / "one" / "image.png").read_bytes()
    after = (images / "part_5.png").read_bytes()
    argv = ["predict", "--model", tiny_model_dir, "--quiet", "--no-overlays", "--workers", "0"]
    assert main([*argv, "imgs/part_0.png", "imgs/part_5.png", "--output", "expected"]) == 0
    scores = {row["sha256"]: row["score"] for row in _rows("expected")}
    real_open, opened = Image.open, []

    def rewritten_meanwhile(source, *args, **kwargs):  # the writer acts just before the image is decoded
        opened.append(1)
        (images.parent / "one" / "image.png").write_bytes(after)
        return real_open(source, *args, **kwargs)

    monkeypatch.setattr(Image, "open", rewritten_meanwhile)
    assert main([*argv, "one", "--output", "out"]) == 0
    assert opened
    (row,) = _rows("out")
    assert row["sha256"] in (hashlib.sha256(before).hexdigest(), hashlib.sha256(after).hexdigest())
    assert row["score"] == scores[row["sha256"]]
