"""A saved folder carries its code: it loads with trust_remote_code=True where crane_hf cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy
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


# The child process's import system cannot find these packages, nor their distributions' metadata (so transformers
# takes them for not installed): remote code must run with what transformers needs and nothing else.
HIDE_PACKAGES = textwrap.dedent(
    """
    import importlib.metadata, importlib.util, re, sys

    HIDDEN = {"crane_hf", "datasets", "scipy", "sklearn", "accelerate"}
    HIDDEN_DISTRIBUTIONS = {"crane-hf", "datasets", "scipy", "scikit-learn", "accelerate"}


    class Hidden:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            find = getattr(self.finder, "find_spec", None)
            return None if name.partition(".")[0] in HIDDEN or find is None else find(name, path, target)

        def find_distributions(self, *args, **kwargs):
            find = getattr(self.finder, "find_distributions", None)
            found = find(*args, **kwargs) if find else []
            return [d for d in found if re.sub(r"[-_.]+", "-", (d.metadata["Name"] or "").lower())
                    not in HIDDEN_DISTRIBUTIONS]

        def invalidate_caches(self):
            getattr(self.finder, "invalidate_caches", lambda: None)()


    sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
    for name in HIDDEN:
        assert importlib.util.find_spec(name) is None, name
    for name in HIDDEN_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
            raise SystemExit(f"{name} is still visible")
        except importlib.metadata.PackageNotFoundError:
            pass
    """
)
WITHOUT_PACKAGES = HIDE_PACKAGES + textwrap.dedent(
    """
    import json
    import numpy as np
    from transformers import AutoImageProcessor, AutoModel, pipeline
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    mode, folder, pipeline_code, out = sys.argv[1:5]
    images = sys.argv[5:]
    if mode == "pipeline":  # a pushed folder: everything through transformers' pipeline()
        detector = pipeline("zero-shot-anomaly-detection", model=folder, trust_remote_code=True)
    else:  # a save_pretrained folder: its model and processor code, with the pipeline class a pushed folder ships
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        pipeline_class = get_class_from_dynamic_module(
            "pipeline_zero_shot_anomaly_detection.ZeroShotAnomalyDetectionPipeline", pipeline_code
        )
        detector = pipeline_class(model=model, image_processor=processor)
    results = detector(images, batch_size=2, return_overlay=True)
    assert "crane_hf" not in type(detector).__module__ and "crane_hf" not in type(detector.model).__module__
    loaded = sorted(name for name in sys.modules if name.partition(".")[0] in HIDDEN)
    assert not loaded, loaded
    np.savez(out, scores=np.array([r["score"] for r in results]), maps=np.stack([r["anomaly_map"] for r in results]))
    print(json.dumps([r["overlay"].size for r in results]))
    """
)


def run_without_packages(tmp_path, mode: str, folder: str, pipeline_code: str, images: list[str]) -> dict:
    script = tmp_path / "without_packages.py"
    script.write_text(WITHOUT_PACKAGES)
    out = tmp_path / f"{mode}.npz"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / f"modules-{mode}"), "OMP_NUM_THREADS": "1"})
    result = subprocess.run(
        [sys.executable, str(script), mode, folder, pipeline_code, str(out), *images],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with numpy.load(out) as arrays:
        return {"scores": arrays["scores"], "maps": arrays["maps"], "overlay_sizes": json.loads(result.stdout)}


def test_pushed_and_saved_folders_run_with_only_what_transformers_needs(tiny_model_dir, tmp_path):
    from crane_hf.commands.cli import main
    from crane_hf.model_loading import load_model, make_pipeline

    from .tiny_models import write_test_images

    pushed = tmp_path / "pushed"
    assert main(["push", tiny_model_dir, "--repo-id", "acme/crane-tiny", "--dry-run", str(pushed)]) == 0
    shipped = sorted(path.name for path in pushed.glob("*.py"))
    assert "pipeline_zero_shot_anomaly_detection.py" in shipped and "modeling_crane.py" in shipped
    assert json.loads((pushed / "config.json").read_text())["custom_pipelines"]
    images = write_test_images(tmp_path / "images", count=3, size=(40, 52))
    local = make_pipeline(*load_model(tiny_model_dir, device="cpu"))(images, batch_size=2)
    expected_scores = numpy.array([r["score"] for r in local])
    expected_maps = numpy.stack([r["anomaly_map"] for r in local])

    for mode, folder in (("pipeline", str(pushed)), ("parts", tiny_model_dir)):
        remote = run_without_packages(tmp_path, mode, folder, str(pushed), images)
        numpy.testing.assert_array_equal(remote["scores"], expected_scores)
        numpy.testing.assert_array_equal(remote["maps"], expected_maps)
        assert remote["overlay_sizes"] == [[52, 40]] * 3


OVERRIDES_SCRIPT = HIDE_PACKAGES + textwrap.dedent(
    """
    import torch
    from transformers import AutoConfig, AutoModel, pipeline

    folder, pushed, pixels_file, out = sys.argv[1:5]
    pixels = torch.load(pixels_file)
    results = {}
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, eattn_map_source="per_layer", soft_mean=True)
    assert "crane_hf" not in type(model).__module__
    with torch.no_grad():
        results["automodel"] = (model.config.eattn_map_source, model.config.soft_mean, model(pixels).anomaly_maps)
    detector = pipeline(
        "zero-shot-anomaly-detection", model=pushed, trust_remote_code=True, model_kwargs={"soft_mean": True}
    )
    results["pipeline"] = (detector.model.config.eattn_map_source, detector.model.config.soft_mean, None)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.soft_mean = True
    config.deep_prompt_rounding_dtype = None
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, config=config)
    with torch.no_grad():
        maps = model(pixels).anomaly_maps
    results["config"] = (model.config.deep_prompt_rounding_dtype, model.config.soft_mean, maps)
    torch.save(results, out)
    """
)


def test_overrides_and_an_explicit_config_reach_a_model_loaded_as_remote_code(tiny_model_dir, tmp_path):
    """AutoConfig and the model module import the folder's configuration module under two module names; the config
    carrying the user's overrides (keywords, pipeline model_kwargs, config=) must still be the one the model uses."""
    from crane_hf import CraneForAnomalyDetection
    from crane_hf.commands.cli import main

    pushed = tmp_path / "pushed"
    assert main(["push", tiny_model_dir, "--repo-id", "acme/crane-tiny", "--dry-run", str(pushed)]) == 0
    saved = json.loads((pushed / "config.json").read_text())
    assert (saved["eattn_map_source"], saved["soft_mean"], saved["deep_prompt_rounding_dtype"]) == (
        "last_layer",
        False,
        "float16",
    )
    pixels = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(4))
    torch.save(pixels, tmp_path / "pixels.pt")
    script = tmp_path / "overrides.py"
    script.write_text(OVERRIDES_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"})
    command = [sys.executable, str(script), tiny_model_dir, str(pushed), str(tmp_path / "pixels.pt")]
    result = subprocess.run(
        [*command, str(tmp_path / "out.pt")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(tmp_path / "out.pt")

    def local_maps(**overrides):
        model = CraneForAnomalyDetection.from_pretrained(tiny_model_dir, **overrides)
        with torch.no_grad():
            return model(pixels).anomaly_maps

    per_layer = local_maps(eattn_map_source="per_layer", soft_mean=True)
    assert remote["automodel"][:2] == ("per_layer", True)
    assert torch.equal(remote["automodel"][2], per_layer)
    assert (per_layer - local_maps()).abs().max() > 1e-4  # a dropped override would have been seen
    assert remote["pipeline"][:2] == ("last_layer", True)
    assert remote["config"][:2] == (None, True)
    assert torch.equal(remote["config"][2], local_maps(deep_prompt_rounding_dtype=None, soft_mean=True))
