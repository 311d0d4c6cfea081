"""ONNX / OpenVINO export: parity with the eager model, the pipeline on an exported folder, the graph's contents,
the eager model unchanged by the export changes, and the errors users meet."""

from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest
import torch

from crane_hf import CraneImageProcessor
from crane_hf.commands.cli import main
from crane_hf.commands.predict import predict_images
from crane_hf.export import (
    EXPORT_FILE,
    CraneExportGraph,
    ExportedCraneModel,
    ExportParityError,
    export_model,
    load_exported_detector,
)
from crane_hf.export.exporting import verify_export
from crane_hf.io.output_names import MARKER_NAME
from crane_hf.model_loading import make_pipeline
from crane_hf.models.crane import modeling_crane
from crane_hf.models.crane.d_attention import (
    dino_similarity_attention,
    dino_similarity_attention_float64,
    float32_mask_flips,
    float64_dattn,
)
from crane_hf.models.crane.gaussian_smoothing import gaussian_smooth
from crane_hf.models.crane.reproducibility import per_sample

from .export_packages import SKIP_VARIABLE, export_tests_mark
from .tiny_models import TINY_SIZE, tiny_model, write_test_images

needs_export = export_tests_mark()  # an error, not a skip, where the test extra's export packages are missing
TOLERANCE = 1e-4
SMALL_SIZE = 42  # an export size other than the model's 56: a 3 x 3 patch grid


def _model(variant: str):
    model = tiny_model(variant)
    model.config.image_threshold = 0.37  # not the default, to see it travel with the export
    model.config.pixel_threshold = 0.61
    return model


@pytest.fixture(scope="module")
def models():
    return {variant: _model(variant) for variant in ("crane", "crane+")}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """Crane and Crane+ as ONNX files, and Crane+ as an OpenVINO IR at 42 px with smoothed maps (lazily)."""
    cache = {}

    def get(name: str) -> str:
        if name not in cache:
            folder = str(tmp_path_factory.mktemp("exported") / name)
            variant, fmt = name.split("-")
            if fmt == "openvino":
                export_model(models[variant], folder, format=fmt, image_size=SMALL_SIZE, smoothed_maps=True)
            else:
                export_model(models[variant], folder, format=fmt)
            cache[name] = folder
        return cache[name]

    return get


def _probe(size: int, batch: int) -> torch.Tensor:
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    pixels[-1] = 0.25  # a uniform image: every off-diagonal D-Attn weight is masked
    return pixels


@needs_export
@pytest.mark.parametrize(
    "name, backend",
    [
        ("crane-onnx", "onnxruntime"),
        ("crane-onnx", "openvino"),
        ("crane+-onnx", "onnxruntime"),
        ("crane+-openvino", "openvino"),
    ],
)
def test_exported_graph_matches_the_eager_model(models, exported, name, backend):
    variant = name.split("-")[0]
    runner = ExportedCraneModel(exported(name), backend=backend)
    model = models[variant]
    for batch in (1, 3):  # neither is the traced batch (2): the batch dimension is dynamic
        pixels = _probe(runner.image_size, batch)
        outputs = runner.run(pixels.numpy())
        with torch.inference_mode():
            eager = model(pixels)
        assert outputs["anomaly_scores"].shape == (batch,)
        assert outputs["anomaly_maps"].shape == (batch, runner.image_size, runner.image_size)
        assert np.abs(outputs["anomaly_scores"] - eager.anomaly_scores.numpy()).max() <= TOLERANCE
        assert np.abs(outputs["anomaly_maps"] - eager.anomaly_maps.numpy()).max() <= TOLERANCE
        if "smoothed_anomaly_maps" in runner.output_names:
            smoothed = gaussian_smooth(eager.anomaly_maps, model.config.smoothing_sigma).numpy()
            assert np.abs(outputs["smoothed_anomaly_maps"] - smoothed).max() <= TOLERANCE


@needs_export
def test_exported_folder_describes_itself(exported, models):
    folder = exported("crane+-openvino")
    with open(os.path.join(folder, EXPORT_FILE), encoding="utf-8") as stream:
        metadata = json.load(stream)
    assert metadata["format"] == "openvino" and metadata["graph_file"] == "model.xml"
    assert metadata["input"] == {
        "name": "pixel_values",
        "shape": ["batch", 3, SMALL_SIZE, SMALL_SIZE],
        "dtype": "float32",
    }
    assert metadata["outputs"] == ["anomaly_scores", "anomaly_maps", "smoothed_anomaly_maps"]
    assert metadata["smoothing_sigma"] == models["crane+"].config.smoothing_sigma
    check = metadata["verification"]
    assert check["max_abs_diff_maps"] <= TOLERANCE and check["max_abs_diff_smoothed_maps"] <= TOLERANCE
    assert check["tolerance"] == 1e-4 and check["backend"] == "openvino" and check["eager_float32_mask_flips"] == 0
    assert metadata["dino_graph_file"] == "dino.xml"  # Crane+ to OpenVINO: D-Attn's weights between two graphs
    written = {"model.xml", "model.bin", "dino.xml", "dino.bin", "config.json", "preprocessor_config.json"}
    written.add(EXPORT_FILE)
    assert set(os.listdir(folder)) == written | {MARKER_NAME}  # the marker lists what the export wrote
    with open(os.path.join(folder, MARKER_NAME), encoding="utf-8") as stream:
        marker = json.load(stream)
    assert marker["command"] == "export" and set(marker["files"]) == written, marker
    runner = ExportedCraneModel(folder)
    assert (runner.config.image_threshold, runner.config.pixel_threshold) == (0.37, 0.61)
    assert runner.config.image_size == SMALL_SIZE == runner.image_processor().image_size


@needs_export
def test_pipeline_on_an_exported_folder_gives_the_eager_pipeline_results(exported, models, tmp_path):
    paths = write_test_images(tmp_path / "images", count=3, size=(48, 64))
    paths += write_test_images(tmp_path / "other", count=1, size=(70, 30), seed=1)
    detector = load_exported_detector(exported("crane+-onnx"))
    model = models["crane+"]
    eager = make_pipeline(model, CraneImageProcessor.from_crane_config(model.config))
    results, expected = detector(paths, batch_size=2), eager(paths, batch_size=2)
    for result, reference in zip(results, expected):
        assert result["anomaly_map"].shape == reference["anomaly_map"].shape
        assert abs(result["score"] - reference["score"]) <= TOLERANCE
        assert np.abs(result["anomaly_map"] - reference["anomaly_map"]).max() <= TOLERANCE
        assert result["is_anomalous"] == (result["score"] >= 0.37)  # the threshold saved beside the graph


@needs_export
def test_predict_runs_an_exported_model(exported, models, tmp_path):
    """`crane-hf predict`'s code path takes the runner as its model (the wiring of --model exported/)."""
    paths = write_test_images(tmp_path / "images", count=3)
    runner = ExportedCraneModel(exported("crane-onnx"))
    report = predict_images(runner, runner.image_processor(), paths, str(tmp_path / "out"), progress=False)
    model = models["crane"]
    eager = predict_images(model, CraneImageProcessor.from_crane_config(model.config), paths, str(tmp_path / "ref"))
    assert len(report.rows) == 3 and not report.skipped
    for row, reference in zip(report.rows, eager.rows):
        assert abs(row["score"] - reference["score"]) <= TOLERANCE
        assert abs(row["max_pixel_score"] - reference["max_pixel_score"]) <= TOLERANCE
    with open(tmp_path / "out" / "predictions.csv", encoding="utf-8") as stream:
        assert [row["path"] for row in csv.DictReader(stream)] == paths
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert (summary["image_threshold"], summary["pixel_threshold"]) == (0.37, 0.61)


@needs_export
@pytest.mark.parametrize("variant", ["crane", "crane+"])
def test_graph_holds_text_features_as_constants_and_no_attention_matrix(exported, models, variant):
    """No text tower in the file, the text features as a constant, every attention one `Attention` operator, and
    no float tensor of attention-matrix shape except D-Attn's [B, M, M] weights, which the eager model builds too."""
    import onnx
    from onnx import numpy_helper

    model = models[variant]
    path = os.path.join(exported(f"{variant}-onnx"), "model.onnx")
    graph = onnx.shape_inference.infer_shapes(onnx.load(path)).graph
    constants = [numpy_helper.to_array(t) for t in graph.initializer]
    constants += [numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute]
    text = model.static_text_embeds().detach().numpy()
    assert any(np.array_equal(c, text) or np.array_equal(c, text.T) for c in constants)  # as is or transposed
    vocabulary = model.config.clip_config.text_config.vocab_size
    assert not any(vocabulary in c.shape for c in constants)  # no token embedding: no text tower

    vision = model.config.clip_config.vision_config
    pairs = {"qq+kk+vv": 3, "qq+kk": 2, "qq": 1, "kk": 1, "vv": 1, "(q+k+v)^2": 1}[model.config.eattn_type]
    expected = vision.num_hidden_layers - model.config.eattn_layers + model.config.eattn_layers * (1 + pairs)
    if model.config.use_dattn:
        expected += model.config.dino_config.num_hidden_layers
    assert sum(node.op_type == "Attention" for node in graph.node) == expected
    to_double = [
        node
        for node in graph.node
        if node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.DOUBLE for a in node.attribute)
    ]
    assert bool(to_double) == model.config.use_dattn  # D-Attn's mask is decided in float64 (docs/export.md)

    patches = (TINY_SIZE // vision.patch_size) ** 2
    token_counts = {patches + 1}
    if model.config.use_dattn:
        token_counts.add(patches + 1 + model.config.dino_config.num_register_tokens)
    for value in graph.value_info:
        if value.type.tensor_type.elem_type == onnx.TensorProto.BOOL:
            continue  # exported, transformers' DINOv2 gives its attention an all-true boolean [B, 1, T, T] mask
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        assert not (len(dims) >= 2 and dims[-1] == dims[-2] and dims[-1] in token_counts), value.name
        if len(dims) >= 2 and dims[-1] == dims[-2] == patches:
            assert model.config.use_dattn, value.name


@needs_export
def test_verification_refuses_a_graph_that_differs_from_the_model(exported, monkeypatch):
    other = tiny_model("crane", seed=1)
    with pytest.raises(ExportParityError, match=r"differs from the model on a probe batch of 2 images: scores"):
        verify_export(other, exported("crane-onnx"))
    accepted = verify_export(tiny_model("crane"), exported("crane-onnx"))
    assert accepted.max_abs_diff_maps <= TOLERANCE and accepted.eager_float32_mask_flips is None

    real_run = ExportedCraneModel.run

    def one_pixel_off(self, pixel_values):  # the graph's outputs with one map pixel moved by 2e-4
        outputs = real_run(self, pixel_values)
        outputs["anomaly_maps"][1, 7, 30] += 2e-4
        return outputs

    monkeypatch.setattr(ExportedCraneModel, "run", one_pixel_off)
    with pytest.raises(ExportParityError, match=r"images: maps, largest 0\.0002\d* > 0\.0001\. Nothing was written"):
        verify_export(tiny_model("crane"), exported("crane-onnx"))


@needs_export
def test_crane_plus_openvino_takes_dattn_weights_computed_in_float64_from_its_dinov2_graph(exported, models):
    """OpenVINO's CPU plugin has no float64, so a Crane+ OpenVINO folder is two graphs: DINOv2's patch tokens, and the
    rest taking D-Attn's weights as an input; the runner computes the weights between them in float64 (as the ONNX
    graph does inside itself). The main graph really computes with the weights it is given, as the eager model does
    with the same weights."""
    folder = exported("crane+-openvino")
    runner = ExportedCraneModel(folder)
    model = models["crane+"]
    config = model.config
    assert runner.dattn_weights_outside and ExportedCraneModel(exported("crane+-onnx")).dattn_weights_outside is False
    pixels = _probe(SMALL_SIZE, 3)
    fed = []
    main_graph = runner._session
    runner._session = lambda feed: fed.append(feed) or main_graph(feed)
    outputs = runner.run(pixels.numpy())
    with torch.inference_mode():
        tokens, grid = model._dino_patch_tokens(pixels)
        expected = dino_similarity_attention_float64(tokens, config.dattn_beta, config.dattn_gamma)
    cells = grid[0] * grid[1]
    weights = fed[0]["dattn_weights"]
    assert weights.dtype == np.float32 and weights.shape == (3, cells, cells) == (3, 9, 9)
    assert np.abs(weights - expected.numpy()).max() <= 1e-6
    assert np.array_equal(weights == 0, expected.numpy() == 0)  # the same mask decisions
    assert np.allclose(weights.sum(-1), 1.0, atol=1e-6)

    other = np.full_like(weights, 1.0 / cells)  # uniform D-Attn weights: other maps, in the graph and in eager
    uniform = main_graph({"pixel_values": pixels.numpy(), "dattn_weights": other})
    with torch.inference_mode():
        image_embeds, patch_features, grid = model.encode_image(pixels, dattn_weights=torch.from_numpy(other))
        eager = model.forward_from_features(image_embeds, patch_features, grid, (SMALL_SIZE, SMALL_SIZE))
    assert np.abs(uniform["anomaly_maps"] - eager.anomaly_maps.numpy()).max() <= TOLERANCE
    assert np.abs(uniform["anomaly_scores"] - eager.anomaly_scores.numpy()).max() <= TOLERANCE
    assert np.abs(uniform["anomaly_maps"] - outputs["anomaly_maps"]).max() > 1e-3


def test_encode_image_with_given_dattn_weights_is_bitwise_its_own_and_checks_them(images):
    crane_plus, crane = tiny_model("crane+"), tiny_model("crane")
    with torch.inference_mode():
        image_embeds, patch_features, grid, tokens = crane_plus.encode_image(images, return_dino_tokens=True)
        weights = dino_similarity_attention(tokens, crane_plus.config.dattn_beta, crane_plus.config.dattn_gamma)
        given = crane_plus.encode_image(images, return_dino_tokens=True, dattn_weights=weights)
        assert torch.equal(given[0], image_embeds) and torch.equal(given[1], patch_features) and given[2] == grid
        assert given[3] is None  # DINOv2 did not run
        with pytest.raises(ValueError, match=r"dattn_weights must have shape \[3, 16, 16\] \(\[B, M, M\], M = 16"):
            crane_plus.encode_image(images, dattn_weights=weights[:, :4, :4])
        with pytest.raises(ValueError, match="dattn_weights were given, but this crane model has no D-Attn"):
            crane.encode_image(images, dattn_weights=weights)


@needs_export
def test_runner_refuses_bad_inputs(exported):
    runner = ExportedCraneModel(exported("crane-onnx"))
    with pytest.raises(
        ValueError, match=r"shape \[batch, 3, 56, 56\] \(the exported image size\), got \[1, 3, 42, 42\]"
    ):
        runner.run(np.zeros((1, 3, 42, 42), dtype=np.float32))
    bad = np.zeros((1, 3, TINY_SIZE, TINY_SIZE), dtype=np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        runner.run(bad)
    with pytest.raises(ValueError, match="runs on the CPU"):
        runner.to("cuda")


def test_export_refuses_what_it_cannot_export(tmp_path):
    model = tiny_model("crane")
    with pytest.raises(ValueError, match="format must be one of onnx, openvino"):
        export_model(model, tmp_path / "a", format="tflite")
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        export_model(model, tmp_path / "b", image_size=50)
    with pytest.raises(ValueError, match="float16_weights applies to the openvino format only"):
        export_model(model, tmp_path / "c", float16_weights=True)
    with pytest.raises(ValueError, match="float32 model; this one has bfloat16"):
        CraneExportGraph(tiny_model("crane").to(torch.bfloat16))
    with pytest.raises(ValueError, match="eval mode"):
        CraneExportGraph(tiny_model("crane").train())
    assert not list(tmp_path.iterdir())


def test_a_missing_exporter_is_named_with_the_install_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ImportError, match=r"ONNX export needs onnxscript, which is not installed: pip install"):
        export_model(tiny_model("crane"), tmp_path / "out")
    folder = tmp_path / "model"
    tiny_model("crane").save_pretrained(folder)
    assert main(["export", str(folder), "--format", "onnx", "--output", str(tmp_path / "cli")]) == 2
    assert "onnxscript, which is not installed: pip install 'crane-hf[export]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


def test_missing_export_packages_fail_the_export_tests_unless_skipping_is_asked(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    monkeypatch.delenv(SKIP_VARIABLE, raising=False)
    with pytest.raises(ImportError, match=r"the export tests need openvino, which the test extra installs: pip"):
        export_tests_mark()
    monkeypatch.setenv(SKIP_VARIABLE, "1")
    mark = export_tests_mark()
    assert mark.name == "skip" and "need openvino" in mark.kwargs["reason"]


@needs_export
def test_export_command(tmp_path, capsys):
    from crane_hf.commands import export as command
    from crane_hf.export import exporting

    assert tuple(exporting.FORMATS) == command.FORMAT_CHOICES
    assert exporting.DEFAULT_TOLERANCE == command.DEFAULT_TOLERANCE
    folder = tmp_path / "model"
    model = tiny_model("crane")
    model.save_pretrained(folder)
    output = tmp_path / "exported"
    argv = ["export", str(folder), "--format", "onnx", "--output", str(output)]
    assert main(argv) == 0
    assert "Exported crane to" in capsys.readouterr().out
    assert ExportedCraneModel(output).run(np.zeros((2, 3, 56, 56), np.float32))["anomaly_maps"].shape == (2, 56, 56)
    assert main(argv) == 2  # never overwrites without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "x"), "--image-size", "50"]) == 2
    assert "multiple of the patch size 14" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _checkpoint_folder(path, variant: str = "crane") -> dict[str, bytes]:
    """A model folder as `crane-hf train` writes it (crane-hf's output marker inside); returns its files' bytes."""
    from crane_hf.io.atomic import atomic_output_dir

    model = tiny_model(variant)
    with atomic_output_dir(str(path), overwrite=False, command="train") as staging:
        model.save_pretrained(staging)
        CraneImageProcessor.from_crane_config(model.config).save_pretrained(staging)
    return {name: (path / name).read_bytes() for name in os.listdir(path)}


@needs_export
def test_export_never_replaces_the_model_folder_it_reads(tmp_path, capsys):
    """`--overwrite` replaces an earlier export, never the model being exported: a trained checkpoint (which carries
    crane-hf's output marker) given as its own --output, or inside the --output, stays as it was."""
    checkpoint = tmp_path / "runs" / "checkpoint"
    before = _checkpoint_folder(checkpoint)
    for output in (checkpoint, tmp_path / "runs"):
        if output == tmp_path / "runs":
            from crane_hf.io.output_names import MARKER_NAME as marker

            (output / marker).write_text((checkpoint / marker).read_text())  # an earlier crane-hf output holding it
        argv = ["export", str(checkpoint), "--format", "onnx", "--output", str(output), "--overwrite"]
        assert main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"refusing to write {output}: it" in errors[0] and "the model folder" in errors[0]
        assert {name: (checkpoint / name).read_bytes() for name in os.listdir(checkpoint)} == before
    model = modeling_crane.CraneForAnomalyDetection.from_pretrained(checkpoint).eval()
    with pytest.raises(ValueError, match="the model folder"):  # the Python function too
        export_model(model, checkpoint, overwrite=True)
    assert {name: (checkpoint / name).read_bytes() for name in os.listdir(checkpoint)} == before


@needs_export
def test_a_few_shot_model_is_refused_not_exported_zero_shot(tmp_path, capsys):
    """The graph holds the zero-shot branch only: a model with a reference memory (whose pipeline gives fused scores)
    is refused, naming the memory, rather than exported as a zero-shot graph that scores differently."""
    model = tiny_model("crane")
    size = model.config.image_size
    references = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    model.set_reference_memory(model.build_reference_memory(references, ["sha256:aa", "sha256:bb"]))
    with pytest.raises(ValueError, match="reference memory"):
        export_model(model, tmp_path / "api")
    folder = tmp_path / "few-shot"
    model.save_pretrained(folder)
    CraneImageProcessor.from_crane_config(model.config).save_pretrained(folder)
    assert main(["export", str(folder), "--format", "onnx", "--output", str(tmp_path / "cli")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "reference memory (few-shot)" in errors[0]
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()
    model.set_reference_memory(None)  # the zero-shot model, asked for explicitly, exports
    assert export_model(model, tmp_path / "zero-shot")["variant"] == "crane"


@needs_export
@pytest.mark.parametrize(("name", "damaged"), [("crane-onnx", "model.onnx.data"), ("crane+-openvino", "model.bin")])
def test_a_damaged_weights_file_is_one_line_naming_the_folder(exported, tmp_path, capsys, name, damaged):
    """A truncated weights file (an interrupted copy of a stranger's folder) fails where the runtime loads it, as a
    `ValueError` naming the folder and file (crane-hf predict: one line, exit 2), never a runtime's traceback."""
    import shutil

    folder = tmp_path / name
    shutil.copytree(exported(name), folder)
    data = (folder / damaged).read_bytes()
    (folder / damaged).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{re.escape(str(folder))}/.* could not be loaded"):
        ExportedCraneModel(folder)
    images = write_test_images(tmp_path / "images", count=1)
    assert main(["predict", *images, "--model", str(folder), "--output", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(folder) in err and "could not be loaded" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_image_size_above_the_supported_side_is_refused_before_tracing(tmp_path, monkeypatch):
    """--image-size is checked against the largest input side a config accepts (2048) before the probe batch is
    allocated and the graph traced: 100002 px (a multiple of 14) would otherwise allocate a 240 GB probe."""
    from crane_hf.export import exporting

    def traced(*args, **kwargs):
        raise AssertionError("the graph was traced")

    monkeypatch.setattr(exporting, "export_onnx", traced)
    for size in (2058, 100002):
        with pytest.raises(ValueError, match=f"image_size={size} exceeds the largest supported input side 2048"):
            export_model(tiny_model("crane"), tmp_path / "out", image_size=size)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- the eager model is unchanged by the export


def _reference_dattn_weights(dino_patches: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """D-Attn weights image by image with the diagonal unmasked by writing into it (the form before export)."""
    rows = []
    for patches in dino_patches:
        features = torch.nn.functional.normalize(patches.float(), dim=-1)
        similarity = features @ features.T
        logits = (similarity - similarity.mean() * beta) * gamma
        masked = logits < 0
        masked.fill_diagonal_(False)
        rows.append(torch.softmax(logits.masked_fill(masked, float("-inf")), dim=-1))
    return torch.stack(rows)


def test_dattn_mask_is_bitwise_the_diagonal_fill():
    patches = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(0))
    patches[2] = 1.0  # all similarities equal: every off-diagonal weight masked, the diagonal kept
    weights = dino_similarity_attention(patches, 1.2, 3.0)
    assert torch.equal(weights, _reference_dattn_weights(patches, 1.2, 3.0))
    assert torch.equal(weights[2], torch.eye(16))


def _float64_dattn_weights(dino_patches: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """The D-Attn weights computed in float64 image by image from the formula (spec section 3), then float32."""
    rows = []
    for patches in dino_patches.double():
        features = patches / patches.norm(dim=-1, keepdim=True)
        similarity = features @ features.T
        logits = (similarity - similarity.mean() * beta) * gamma
        masked = logits < 0
        masked.fill_diagonal_(False)
        rows.append(torch.softmax(logits.masked_fill(masked, float("-inf")), dim=-1))
    return torch.stack(rows).float()


def _patches_with_float32_mask_flips(count: int = 4) -> torch.Tensor:
    """DINOv2-like patch features [count, 24, 16] where float32 decides some D-Attn mask entries unlike float64:
    in each image, patch 1 is moved towards patch 0 (bisection on the float32 features, A in float64) until A_01
    changes sign between two neighbouring float32 inputs, and images are kept whose float32 decisions differ."""
    found = []
    for seed in range(200):
        patches = torch.randn(24, 16, generator=torch.Generator().manual_seed(seed)).double()

        def logit(t: float, patches=patches) -> tuple[float, torch.Tensor]:
            moved = patches.clone()
            moved[1] = patches[1] + t * patches[0]
            moved = moved.float().double()
            return float(_float64_logits(moved)[0, 1]), moved

        low, high = -3.0, 3.0
        if (logit(low)[0] < 0) == (logit(high)[0] < 0):
            continue
        for _ in range(80):
            middle = (low + high) / 2
            if (logit(middle)[0] < 0) == (logit(low)[0] < 0):
                low = middle
            else:
                high = middle
        value, moved = logit(low)
        candidate = moved.float()[None]
        if abs(value) < 1e-6 and int(float32_mask_flips(candidate, 1.2, 3.0)) > 0:
            found.append(candidate)
        if len(found) == count:
            return torch.cat(found)
    raise AssertionError(f"only {len(found)} images with a float32 mask flip among 200 seeds")


def _float64_logits(patches: torch.Tensor) -> torch.Tensor:
    features = patches / patches.norm(dim=-1, keepdim=True)
    similarity = features @ features.T
    return (similarity - similarity.mean() * 1.2) * 3.0


def test_float64_dattn_decides_the_mask_as_exact_arithmetic_and_eager_keeps_its_float32_bits(monkeypatch):
    """Features whose A_01 lies within float32 rounding of 0: eager float32 decides it unlike float64 (counted by
    `float32_mask_flips`); `dino_similarity_attention_float64`, `float64_dattn()` and an export trace give the
    float64 weights; outside them the eager weights are the float32 computation, bitwise."""
    patches = _patches_with_float32_mask_flips()
    reference = _float64_dattn_weights(patches, 1.2, 3.0)
    eager = dino_similarity_attention(patches, 1.2, 3.0)
    assert torch.equal(eager, _reference_dattn_weights(patches, 1.2, 3.0))  # the float32 form, bitwise
    flipped = (eager == 0) != (reference == 0)
    assert torch.equal(float32_mask_flips(patches, 1.2, 3.0), flipped.sum(dim=(1, 2))) and flipped.any()
    assert (flipped[:, 0, 1] | flipped[:, 1, 0]).all()  # the engineered entry of every image
    assert torch.equal(dino_similarity_attention_float64(patches, 1.2, 3.0), reference)
    with float64_dattn():
        assert torch.equal(dino_similarity_attention(patches, 1.2, 3.0), reference)
    assert torch.equal(dino_similarity_attention(patches, 1.2, 3.0), eager)  # the block ended
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert torch.equal(dino_similarity_attention(patches, 1.2, 3.0), reference)


def test_eager_crane_plus_outputs_are_bitwise_the_float32_dattn_and_float64_dattn_only_inside_the_block(
    monkeypatch,
):
    """The eager model's scores and maps equal, bitwise, those of the model with D-Attn replaced by the float32
    form written in this test; inside `float64_dattn()` they equal those with the float64 form."""
    model = tiny_model("crane+")
    pixels = _probe(TINY_SIZE, 3)
    with torch.inference_mode():
        eager = model(pixels)
        with float64_dattn():
            double = model(pixels)
    for form, outputs in ((_reference_dattn_weights, eager), (_float64_dattn_weights, double)):
        with monkeypatch.context() as patch:
            patch.setattr(modeling_crane, "dino_similarity_attention", form)
            with torch.inference_mode():
                expected = model(pixels)
        assert torch.equal(outputs.anomaly_scores, expected.anomaly_scores)
        assert torch.equal(outputs.anomaly_maps, expected.anomaly_maps)


def test_per_sample_loops_in_eager_and_batches_only_while_tracing():
    calls = []

    def count(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * 2

    x = torch.randn(3, 4)
    assert torch.equal(per_sample(count, x), x * 2) and calls == [1, 1, 1]
    calls.clear()
    torch.jit.trace(lambda t: per_sample(count, t), (x,), check_trace=False)
    assert calls == [3]


def test_export_graph_returns_the_forward_outputs_bitwise(variant, images):
    """The traced module run eagerly equals `model.forward`: the constant text features are the cached ones."""
    model = tiny_model(variant)
    graph = CraneExportGraph(model, smoothing_sigma=4.0)
    with torch.inference_mode():
        scores, maps, smoothed = graph(images)
        eager = model(images)
    assert torch.equal(scores, eager.anomaly_scores) and torch.equal(maps, eager.anomaly_maps)
    assert torch.equal(smoothed, gaussian_smooth(eager.anomaly_maps, 4.0))
