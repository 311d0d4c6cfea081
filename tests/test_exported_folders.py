"""Exported folders as models: every `--model` (predict, calibrate, evaluate, load_detector) takes one through
`model_loading`, gives the eager folder's results, refuses what the graph cannot honour with one line, and a
stranger's exported folder is checked before a runtime opens it."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from crane_hf import load_detector
from crane_hf.commands.cli import main
from crane_hf.data import generate_synthetic_dataset
from crane_hf.export import EXPORT_FILE, ExportedCraneModel
from crane_hf.model_loading import load_model, model_kind

from .export_packages import export_tests_mark
from .interruptions import raise_on_call
from .tiny_models import save_tiny_model_folder, write_test_images

TOLERANCE = 1e-4
pytestmark = export_tests_mark()  # an error, not a skip, where the test extra's export packages are missing


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved tiny Crane+ folder (thresholds not the defaults) and its exports by `crane-hf export` (lazily)."""
    work = tmp_path_factory.mktemp("exported-folders")
    model_dir = save_tiny_model_folder(work / "model", "crane+")
    _edit_json(os.path.join(model_dir, "config.json"), image_threshold=0.41, pixel_threshold=0.58)
    cache = {"model": model_dir}

    def get(name: str) -> str:
        if name not in cache:
            output = str(work / name)
            assert main(["export", model_dir, "--format", name, "--output", output]) == 0
            cache[name] = output
        return cache[name]

    return get


def _edit_json(path, **fields) -> None:
    path = pathlib.Path(path)
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **fields}), encoding="utf-8")


def _rows(folder) -> list[dict]:
    return json.loads((folder / "predictions.json").read_text())["predictions"]


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_predict_on_an_exported_folder_gives_the_eager_folders_rows(folders, fmt, tmp_path):
    exported = folders(fmt)
    assert model_kind(exported) == "exported" and model_kind(folders("model")) == "folder"
    images = write_test_images(tmp_path / "images", count=5, size=(48, 64))
    images += write_test_images(tmp_path / "other", count=1, size=(70, 30), seed=1)
    common = ["predict", str(tmp_path / "images"), str(tmp_path / "other"), "--batch-size", "2", "--quiet"]
    assert main([*common, "--model", folders("model"), "--output", str(tmp_path / "eager")]) == 0
    assert main([*common, "--model", exported, "--output", str(tmp_path / "exported")]) == 0
    eager, rows = _rows(tmp_path / "eager"), _rows(tmp_path / "exported")
    assert [row["path"] for row in rows] == [row["path"] for row in eager] and len(rows) == 6
    for row, reference in zip(rows, eager):
        assert abs(row["score"] - reference["score"]) <= TOLERANCE
        assert row["is_anomalous"] == reference["is_anomalous"] == (row["score"] >= 0.41)  # the folder's threshold
        assert abs(row["max_pixel_score"] - reference["max_pixel_score"]) <= TOLERANCE
        # maps within 1e-4 may put a pixel within 1e-4 of the pixel threshold on its other side: a few pixels of
        # the 2100 - 3072 of these images, never a different map
        assert abs(row["anomalous_pixel_fraction"] - reference["anomalous_pixel_fraction"]) <= 5 / 2100
        assert row["overlay"] == reference["overlay"]
    summary = json.loads((tmp_path / "exported" / "predictions.json").read_text())
    assert (summary["model"], summary["image_threshold"], summary["pixel_threshold"]) == (exported, 0.41, 0.58)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])  # openvino: Crane+'s two graphs
def test_load_detector_and_calibrate_take_an_exported_folder(folders, tmp_path, fmt):
    exported = tmp_path / "exported"
    shutil.copytree(folders(fmt), exported)
    eager_dir = tmp_path / "model"
    shutil.copytree(folders("model"), eager_dir)
    normal = write_test_images(tmp_path / "normal", count=8, seed=3)
    detector = load_detector(str(exported))
    assert isinstance(detector.model, ExportedCraneModel)
    reference = load_detector(str(eager_dir))
    for result, expected in zip(detector(normal), reference(normal)):
        assert abs(result["score"] - expected["score"]) <= TOLERANCE
        assert np.abs(result["anomaly_map"] - expected["anomaly_map"]).max() <= TOLERANCE

    for folder in (exported, eager_dir):
        argv = ["calibrate", str(folder), str(tmp_path / "normal"), "--fpr", "0.25", "--pixel-fpr", "0.05", "--quiet"]
        assert main(argv) == 0
    records = [json.loads((folder / "calibration.json").read_text()) for folder in (exported, eager_dir)]
    for kind in ("image", "pixel"):
        assert abs(records[0][kind]["threshold"] - records[1][kind]["threshold"]) <= TOLERANCE
        assert records[0][kind]["fpr_on_calibration_set"] == records[1][kind]["fpr_on_calibration_set"]
    runner = ExportedCraneModel(exported)  # the runner reads the thresholds calibrate wrote
    assert runner.config.image_threshold == records[0]["image"]["threshold"]
    assert runner.config.pixel_threshold == records[0]["pixel"]["threshold"]
    assert json.loads((exported / EXPORT_FILE).read_text())["format"] == fmt  # the export record is untouched


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_evaluate_on_an_exported_folder_gives_the_eager_metrics(folders, tmp_path, fmt):
    data = generate_synthetic_dataset(
        str(tmp_path / "data"), classes=["brick"], image_size=64, train_good=0, test_good=3, test_defective=2
    )
    reports = []
    for name in ("model", fmt):
        output = tmp_path / f"eval-{name}"
        assert main(["evaluate", "--model", folders(name), "--data", data, "--output", str(output), "--quiet"]) == 0
        reports.append(json.loads((output / "metrics.json").read_text())["metrics"])
    assert reports[0].keys() == reports[1].keys()
    for name, metrics in reports[0].items():
        for key, value in metrics.items():
            other = reports[1][name][key]
            assert (value is None and other is None) or abs(value - other) <= TOLERANCE, (name, key)


def test_what_an_exported_graph_cannot_honour_is_refused_with_one_line(folders, tmp_path, capsys):
    exported = folders("onnx")
    refusals = [
        (dict(clip="openai/clip"), r"--clip/--dino apply to presets only; .* holds its backbones"),
        (dict(dtype="float16"), r"exported float32 graph; dtype float16 is not available"),
        (dict(device="cuda"), r"runs on the CPU .*device 'cuda' is not available for an exported folder"),
        (dict(soft_mean=True), r"computed with soft_mean=False; soft_mean=True cannot be applied"),
        (dict(allow_exported=False), r"cannot be saved, published or exported again"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ValueError, match=message):
            load_model(exported, **kwargs)
    model, processor = load_model(exported, device="cpu", dtype="float32", image_threshold=0.9, soft_mean=False)
    assert model.config.image_threshold == 0.9 and processor.image_size == model.image_size

    images = write_test_images(tmp_path / "images", count=1)
    capsys.readouterr()  # the fixture's export, when this test is the first to ask for it
    argvs = [
        ["predict", *images, "--model", exported, "--output", str(tmp_path / "p"), "--dtype", "bfloat16"],
        ["predict", *images, "--model", exported, "--output", str(tmp_path / "p"), "--device", "cuda:1"],
        ["predict", *images, "--model", exported, "--output", str(tmp_path / "p"), "--dino", "x"],
        ["push", exported, "--repo-id", "acme/x", "--dry-run", str(tmp_path / "repo")],
        ["export", exported, "--format", "onnx", "--output", str(tmp_path / "again")],
    ]
    for argv in argvs:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and exported in err, err
    assert not any((tmp_path / name).exists() for name in ("p", "repo", "again"))

    # The computation options: the graph's computation was fixed at export; its own values pass, others are refused.
    config = json.loads(pathlib.Path(exported, "config.json").read_text())
    other = {"last_layer": "per_layer", "per_layer": "last_layer"}[config["eattn_map_source"]]
    before = pathlib.Path(exported, "config.json").read_bytes()
    for argv in (
        ["predict", *images, "--model", exported, "--output", str(tmp_path / "p"), "--eattn-maps", other],
        ["calibrate", exported, str(tmp_path / "images"), "--eattn-maps", other, "--quiet"],
        ["predict", *images, "--model", exported, "--output", str(tmp_path / "p"), "--soft-mean" if not
         config["soft_mean"] else "--no-soft-mean"],
    ):  # fmt: skip
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and exported in err, err
        assert "cannot be applied to it (export the model again with it)" in err, err
    assert pathlib.Path(exported, "config.json").read_bytes() == before  # calibrate wrote nothing
    same = ["--eattn-maps", config["eattn_map_source"], "--dattn-input", config["dattn_input"]]
    assert main(["predict", *images, "--model", exported, "--output", str(tmp_path / "p"), *same, "--quiet"]) == 0
    summary = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert summary["computation"]["eattn_map_source"] == config["eattn_map_source"]


# ---------------------------------------------------------------------------------- a stranger's exported folder


def _copy(folders, tmp_path, name: str = "copy", fmt: str = "onnx") -> str:
    target = tmp_path / name
    shutil.copytree(folders(fmt), target)
    return str(target)


def _edit_metadata(folder: str, **fields) -> None:
    _edit_json(os.path.join(folder, EXPORT_FILE), **fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"format": "tflite"}, r"field 'format' must be one of onnx, openvino"),
        ({"graph_file": "../model.onnx"}, r"field 'graph_file' must be 'model.onnx'"),
        ({"image_size": True}, r"field 'image_size' must be an integer"),
        ({"image_size": 42}, r"field 'input' must be"),  # the input shape says 56
        ({"outputs": []}, r"field 'outputs' must be \['anomaly_scores', 'anomaly_maps'\]"),
        ({"smoothing_sigma": 4.0}, r"field 'smoothing_sigma' must be null without the smoothed_anomaly_maps"),
        (
            {"outputs": ["anomaly_scores", "anomaly_maps", "smoothed_anomaly_maps"], "smoothing_sigma": float("nan")},
            r"field 'smoothing_sigma' must be a positive number",
        ),
        ({"weights": "int8"}, r"field 'weights' must be one of float32, float16"),
        ({"verification": [1]}, r"field 'verification' must be a dict"),
    ],
)
def test_a_bad_export_record_is_named_by_field(folders, tmp_path, fields, message):
    folder = _copy(folders, tmp_path)
    _edit_metadata(folder, **fields)
    with pytest.raises(ValueError, match=rf"crane_export\.json: {message}"):
        load_model(folder)


def test_a_stranger_folder_is_checked_before_a_runtime_opens_it(folders, tmp_path):
    import onnx
    from onnx.external_data_helper import uses_external_data

    folder = _copy(folders, tmp_path)
    graph = os.path.join(folder, "model.onnx")
    original = onnx.load(graph, load_external_data=False)
    external = [t for t in original.graph.initializer if uses_external_data(t)]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {
        "model.onnx.data"
    }
    secret = tmp_path / "secret.data"
    shutil.copy(os.path.join(folder, "model.onnx.data"), secret)
    for location, message in [
        ("../secret.data", r"external data of tensor .* resolves to .*secret\.data, outside"),
        (str(secret), r"external data of tensor .* must be a regular file inside .* \(it is a link or absolute"),
        ("missing.data", r"missing\.data is missing \(the external data of tensor"),
    ]:
        model = onnx.ModelProto()
        model.CopyFrom(original)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(model, graph)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            ExportedCraneModel(folder)

    folder = _copy(folders, tmp_path, "linked")
    os.remove(os.path.join(folder, "model.onnx.data"))
    os.symlink(secret, os.path.join(folder, "model.onnx.data"))
    with pytest.raises(ValueError, match=r"model\.onnx\.data: the external data of tensor .* is a link"):
        load_model(folder)
    folder = _copy(folders, tmp_path, "graph-linked")
    os.rename(os.path.join(folder, "model.onnx"), tmp_path / "elsewhere.onnx")
    os.symlink(tmp_path / "elsewhere.onnx", os.path.join(folder, "model.onnx"))
    with pytest.raises(ValueError, match=r"the graph file must be a regular file inside"):
        load_model(folder)
    folder = _copy(folders, tmp_path, "garbage")
    (tmp_path / "garbage" / "model.onnx").write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(ValueError, match=r"model\.onnx is not a readable ONNX file"):
        load_model(folder)


def test_an_inconsistent_folder_is_refused(folders, tmp_path):
    folder = _copy(folders, tmp_path, "config")
    _edit_json(os.path.join(folder, "config.json"), image_size=42)
    with pytest.raises(ValueError, match=r"config\.json: image_size 42 differs from the graph's 56"):
        load_model(folder)
    folder = _copy(folders, tmp_path, "processor")
    _edit_json(os.path.join(folder, "preprocessor_config.json"), image_size=70)
    with pytest.raises(ValueError, match=r"preprocessor_config\.json: image_size 70 differs from the graph's 56"):
        load_model(folder)
    folder = _copy(folders, tmp_path, "ports")
    _edit_metadata(
        folder, outputs=["anomaly_scores", "anomaly_maps", "smoothed_anomaly_maps"], smoothing_sigma=4.0
    )  # the graph has no smoothed output
    with pytest.raises(ValueError, match=r"the graph takes .* not \['pixel_values'\] -> .* as crane_export\.json"):
        load_model(folder)


def test_the_dinov2_graph_of_a_crane_plus_openvino_folder_is_checked_like_the_main_graph(folders, tmp_path):
    """A Crane+ OpenVINO folder is two graphs (D-Attn's weights computed between them, docs/export.md): the second
    graph's name, files and ports are checked as the first's, each refusal one line naming the file or field."""
    original = folders("openvino")
    assert json.loads(pathlib.Path(original, EXPORT_FILE).read_text())["dino_graph_file"] == "dino.xml"
    folder = _copy(folders, tmp_path, "renamed", "openvino")
    _edit_metadata(folder, dino_graph_file="../dino.xml")
    with pytest.raises(ValueError, match=r"field 'dino_graph_file' must be 'dino\.xml' for format 'openvino'"):
        load_model(folder)
    folder = _copy(folders, tmp_path, "no-weights", "openvino")
    os.remove(os.path.join(folder, "dino.bin"))
    with pytest.raises(FileNotFoundError, match=r"dino\.bin is missing \(the OpenVINO weights of dino\.xml"):
        load_model(folder)
    folder = _copy(folders, tmp_path, "linked", "openvino")
    os.rename(os.path.join(folder, "dino.xml"), tmp_path / "elsewhere.xml")
    os.symlink(tmp_path / "elsewhere.xml", os.path.join(folder, "dino.xml"))
    with pytest.raises(ValueError, match=r"the DINOv2 graph file must be a regular file inside"):
        load_model(folder)
    folder = _copy(folders, tmp_path, "swapped", "openvino")  # the main graph where the DINOv2 graph should be
    for extension in ("xml", "bin"):
        shutil.copy(os.path.join(folder, f"model.{extension}"), os.path.join(folder, f"dino.{extension}"))
    with pytest.raises(ValueError, match=r"dino\.xml: the graph takes .* not \['pixel_values'\] -> \['dino_tokens'\]"):
        load_model(folder)
    folder = _copy(folders, tmp_path, "one-graph", "openvino")  # the record no longer names the DINOv2 graph
    metadata = json.loads(pathlib.Path(folder, EXPORT_FILE).read_text())
    del metadata["dino_graph_file"]
    pathlib.Path(folder, EXPORT_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"model\.xml: the graph takes .* not \['pixel_values'\] -> "):
        load_model(folder)
    folder = _copy(folders, tmp_path, "onnx-named", "onnx")  # a DINOv2 graph named where there is none
    _edit_metadata(folder, dino_graph_file="dino.onnx")
    with pytest.raises(FileNotFoundError, match=r"dino\.onnx is missing \(the DINOv2 graph file, named by"):
        load_model(folder)


def _save_dino_graph(folder: str, pixel_shape: list[int], tokens_shape: list[int]) -> None:
    """Replace a folder's dino.xml/.bin by a graph with DINOv2's port names but other shapes (-1: dynamic)."""
    import openvino
    from openvino import opset13 as ops

    pixels = ops.parameter(pixel_shape, openvino.Type.f32, name="pixel_values")
    tokens = ops.reshape(pixels, ops.constant(np.array(tokens_shape, dtype=np.int64)), special_zero=True)
    tokens.output(0).set_names({"dino_tokens"})
    model = openvino.Model([ops.result(tokens)], [pixels], "dino")
    openvino.save_model(model, os.path.join(folder, "dino.xml"))


def test_a_dinov2_graph_of_other_shapes_is_refused_with_one_line_not_image_by_image(folders, tmp_path, capsys):
    """A DINOv2 graph whose input or tokens are not the folder's (another image size, another model) is refused
    when the folder is loaded; one whose shapes are dynamic and wrong, when it returns them. Was: each image
    skipped with OpenVINO's many-line error (exit 3)."""
    images = write_test_images(tmp_path / "images", count=2)
    folder = _copy(folders, tmp_path, "other-size", "openvino")
    _save_dino_graph(folder, [-1, 3, 84, 84], [0, 36, -1])  # a DINOv2 graph exported at 84 pixels
    with pytest.raises(
        ValueError, match=r"dino\.xml: pixel_values has shape \['\?', 3, 84, 84\], not \['batch', 3, 56"
    ):
        load_model(folder)
    assert main(["predict", *images, "--model", folder, "--output", str(tmp_path / "out"), "--quiet"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "dino.xml: pixel_values has shape" in lines[0] and not (tmp_path / "out").exists()
    folder = _copy(folders, tmp_path, "other-width", "openvino")
    _save_dino_graph(folder, [-1, 3, 56, 56], [0, 16, -1])  # 16 tokens of 588 channels, not 24
    with pytest.raises(
        ValueError, match=r"dino\.xml: dino_tokens has shape \['\?', 16, 588\], not \['batch', 16, 24\]"
    ):
        load_model(folder)
    folder = _copy(folders, tmp_path, "dynamic", "openvino")
    _save_dino_graph(folder, [-1, 3, -1, -1], [0, -1, 24])  # loads, but returns 392 tokens at 56 pixels
    runner = ExportedCraneModel(folder)
    with pytest.raises(ValueError, match=r"dino\.xml returned dino_tokens of shape \[2, 392, 24\], not \[2, 16, 24\]"):
        runner.run(np.zeros((2, 3, 56, 56), np.float32))


def test_the_dattn_parameters_of_a_two_graph_folder_must_be_recorded(folders, tmp_path):
    """The runner computes D-Attn's weights with config.json's beta and gamma: a two-graph folder whose record does
    not hold them is refused, so that an edited config.json cannot change the computation unnoticed."""
    for name, computation in [("none", None), ("partial", {"dattn_gamma": 3.0}), ("text", {"dattn_beta": "1.2"})]:
        folder = _copy(folders, tmp_path, name, "openvino")
        metadata = json.loads(pathlib.Path(folder, EXPORT_FILE).read_text())
        computation = computation if computation is None else {**metadata["computation"], **computation}
        if computation is not None and name == "partial":
            del computation["dattn_beta"]
        _edit_metadata(folder, computation=computation)
        _edit_json(os.path.join(folder, "config.json"), dattn_beta=2.0)
        with pytest.raises(ValueError, match=r"field 'computation' must record dattn_beta and dattn_gamma"):
            load_model(folder)


@pytest.mark.parametrize("field, value", [("use_dattn", False), ("variant", "crane")])
def test_a_derived_field_in_config_json_is_refused_with_one_line(folders, tmp_path, capsys, field, value):
    """Was: AttributeError traceback (exit 1) from a property without a setter, exported or eager folder alike."""
    images = write_test_images(tmp_path / "images", count=1)
    for kind in ("openvino", "model"):
        folder = _copy(folders, tmp_path, f"{kind}-{field}", kind)
        _edit_json(os.path.join(folder, "config.json"), **{field: value})
        output = str(tmp_path / f"out-{kind}")
        assert main(["predict", *images, "--model", folder, "--output", output, "--quiet"]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(lines) == 1 and f"config.json: {field} is derived from the other fields" in lines[0]


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_an_exported_folder_runs_on_two_processes_and_resumes_only_with_its_own_graph(
    folders, tmp_path, monkeypatch, capsys, fmt
):
    import crane_hf.prediction.sharded_prediction as sharded_prediction

    from .tiny_models import subprocess_environment

    for name, value in subprocess_environment().items():  # the launched processes import this checkout
        monkeypatch.setenv(name, value)
    exported = _copy(folders, tmp_path, f"{fmt}-copy", fmt)
    write_test_images(tmp_path / "images", count=5, size=(48, 64))
    common = ["predict", str(tmp_path / "images"), "--model", exported, "--batch-size", "2", "--quiet"]
    common += ["--workers", "0"]
    assert main([*common, "--output", str(tmp_path / "one")]) == 0
    assert main([*common, "--output", str(tmp_path / "two"), "--num-processes", "2"]) == 0
    # An exported graph is not batch-invariant as the eager model is (docs/export.md): the same rows and decisions,
    # scores within float32 rounding of another batch composition.
    _assert_same_rows(_rows(tmp_path / "two"), _rows(tmp_path / "one"))

    real = raise_on_call(monkeypatch, sharded_prediction, "_score_batch", 2)  # after one batch
    assert main([*common, "--output", str(tmp_path / "resumed")]) == 130
    monkeypatch.setattr(sharded_prediction, "_score_batch", real)
    if fmt == "onnx":
        import onnx

        graph = os.path.join(exported, json.loads(pathlib.Path(exported, EXPORT_FILE).read_text())["graph_file"])
        original = pathlib.Path(graph).read_bytes()
        changed = onnx.load(graph)
        changed.doc_string = "another graph"  # other bytes, the same numbers: still not the graph that scored them
        onnx.save(changed, graph)
    else:  # the DINOv2 graph of the two counts too
        graph = os.path.join(exported, "dino.xml")
        original = pathlib.Path(graph).read_bytes()
        pathlib.Path(graph).write_bytes(original + b"\n")
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "resumed"), "--resume"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --resume: the partial results") and "computed with model" in last
    pathlib.Path(graph).write_bytes(original)
    assert main([*common, "--output", str(tmp_path / "resumed"), "--resume"]) == 0
    assert "(2 of them scored by the interrupted run" in capsys.readouterr().out
    _assert_same_rows(_rows(tmp_path / "resumed"), _rows(tmp_path / "one"))


def _assert_same_rows(rows: list[dict], reference: list[dict], tolerance: float = 1e-6) -> None:
    assert [(row["path"], row["overlay"]) for row in rows] == [(row["path"], row["overlay"]) for row in reference]
    for row, expected in zip(rows, reference):
        assert abs(row["score"] - expected["score"]) <= tolerance
        assert abs(row["max_pixel_score"] - expected["max_pixel_score"]) <= tolerance
        assert row["is_anomalous"] == expected["is_anomalous"]


def test_an_edited_computation_field_in_the_exported_config_is_refused(folders, tmp_path):
    """The graph's computation is fixed at export and recorded in crane_export.json: a config.json edited to claim
    another one (records, and overrides compared with it, would then describe what the graph does not compute) is
    refused naming the field; thresholds, applied after the graph, may still be edited."""
    exported = tmp_path / "exported"
    shutil.copytree(folders("onnx"), exported)
    recorded = json.loads((exported / EXPORT_FILE).read_text())["computation"]
    config = json.loads((exported / "config.json").read_text())
    assert recorded["soft_mean"] is config["soft_mean"] is False and recorded["feature_layers"] == [6]
    _edit_json(exported / "config.json", image_threshold=0.9)
    assert ExportedCraneModel(exported).config.image_threshold == 0.9
    _edit_json(exported / "config.json", soft_mean=True)
    with pytest.raises(ValueError, match=r"config\.json: soft_mean True differs from the graph's False"):
        ExportedCraneModel(exported)
    with pytest.raises(ValueError, match="soft_mean"):
        load_model(str(exported), soft_mean=True)  # an override equal to the edited value is no way around it


def test_float64_pixels_beyond_float32s_range_are_refused_as_infinite_without_a_warning(folders):
    """Was: numpy's overflow RuntimeWarning while casting, then the graph's non-finite outputs."""
    import warnings

    runner = ExportedCraneModel(folders("openvino"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"pixel_values contains NaN or infinite values \(in float32"):
            runner.run(np.full((1, 3, 56, 56), 1e40))


@pytest.mark.parametrize("name", [EXPORT_FILE, "config.json", "preprocessor_config.json"])
def test_the_json_files_of_an_exported_folder_must_be_regular_files_inside_it(folders, tmp_path, name):
    """Was: a link to a file elsewhere was read; the graph files were checked, these not."""
    folder = _copy(folders, tmp_path, "linked", "openvino")
    elsewhere = tmp_path / f"elsewhere-{name}"
    os.rename(os.path.join(folder, name), elsewhere)
    os.symlink(elsewhere, os.path.join(folder, name))
    with pytest.raises(ValueError, match=rf"{name}: .* must be a regular file inside .* \(it is a link"):
        load_model(folder)
    os.remove(os.path.join(folder, name))
    os.mkfifo(os.path.join(folder, name))
    with pytest.raises(ValueError, match=rf"{name}: .*not a regular file"):  # model_loading's check, or the runner's
        load_model(folder)


def test_a_crane_plus_onnx_graph_is_not_run_on_openvino(folders):
    """OpenVINO's CPU plugin would decide the graph's float64 D-Attn mask in float32 (what the two-graph OpenVINO
    export avoids); was: accepted, silently."""
    with pytest.raises(ValueError, match=r"Crane\+ ONNX graph deciding D-Attn's mask in float64.*onnxruntime"):
        ExportedCraneModel(folders("onnx"), backend="openvino")
    assert ExportedCraneModel(folders("onnx")).backend == "onnxruntime"
