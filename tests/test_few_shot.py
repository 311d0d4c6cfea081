"""Few-shot: the reference memory (memory bank) of normal images, its nearest-patch scoring and fusion, checked
against brute-force computations written here; saving and loading beside the model; refusing another model's
memory; zero-shot outputs unchanged."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crane_hf import CraneConfig, CraneForAnomalyDetection
from crane_hf.models.crane.reference_memory import (
    MEMORY_FILE_NAME,
    ReferenceMemory,
    array_fingerprint,
    file_fingerprint,
    nearest_patch_distances,
)

from .tiny_models import TINY_SIZE, tiny_model


def brute_force_distances(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """1 - max cosine, one query patch and one memory patch at a time, in float64."""
    result = torch.empty(queries.shape[:2], dtype=torch.float64)
    for b, n in itertools.product(range(queries.shape[0]), range(queries.shape[1])):
        query = queries[b, n].double()
        best = max(float(query @ patch.double()) for patch in memory)
        result[b, n] = 1.0 - best
    return result


def brute_force_few_shot(memory: ReferenceMemory, features: dict[str, torch.Tensor], names: list[str]):
    """Patch map [B, N]: mean over the sources of (1 - nearest cosine) / 2."""
    maps = [brute_force_distances(features[name], memory.features[name]) for name in names]
    return torch.stack(maps).mean(dim=0) / 2


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 22])
def test_nearest_patch_distances_equal_brute_force_for_any_chunk(chunk):
    generator = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(2, 9, 5, generator=generator), dim=-1)
    memory = F.normalize(torch.randn(23, 5, generator=generator), dim=-1)
    distances = nearest_patch_distances(queries, memory, chunk_elements=chunk)
    assert distances.shape == (2, 9) and distances.dtype == torch.float32
    torch.testing.assert_close(distances.double(), brute_force_distances(queries, memory), atol=1e-6, rtol=0)


def test_nearest_patch_distances_refuses_mismatched_sizes():
    with pytest.raises(ValueError, match="must be"):
        nearest_patch_distances(torch.zeros(1, 4, 5), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="no patches"):
        nearest_patch_distances(torch.zeros(1, 4, 5), torch.zeros(0, 5))


@pytest.mark.parametrize("variant", ["crane", "crane+"])
def test_memory_holds_the_models_patch_features(variant):
    model = tiny_model(variant)
    references = images(3)
    memory = model.build_reference_memory(references, ["a", "b", "c"], class_name="bottle")
    with torch.inference_mode():
        _, patch_features, grid, dino_tokens = model.encode_image(references, return_dino_tokens=True)
    expected = {f"clip_{i}": maps for i, maps in enumerate(patch_features)}
    if variant == "crane+":
        expected["dino"] = F.normalize(dino_tokens, dim=-1)
    assert set(memory.features) == set(expected)
    assert memory.grid == grid and memory.num_images == 3 and memory.class_name == "bottle"
    for name, features in expected.items():
        torch.testing.assert_close(memory.features[name], features.reshape(-1, features.shape[-1]))


@pytest.mark.parametrize(("variant", "sources"), [("crane", "all"), ("crane+", "all"), ("crane+", "dino")])
def test_few_shot_and_fused_outputs_equal_brute_force(variant, sources):
    model = tiny_model(variant, few_shot_features=sources, few_shot_fusion_weight=0.3)
    memory = model.build_reference_memory(images(2), ["a", "b"])
    tests = images(3, seed=5)
    with torch.inference_mode():
        output = model(tests, reference_memory=memory)
        features = model.memory_features(tests)
    names = [name for name in memory.features if sources == "all" or name.startswith(sources)]
    patch_map = brute_force_few_shot(memory, features, names)  # [B, N]
    torch.testing.assert_close(output.few_shot_scores.double(), patch_map.amax(dim=1), atol=1e-6, rtol=0)
    grid = memory.grid
    upsampled = F.interpolate(patch_map.reshape(-1, 1, *grid).float(), size=(TINY_SIZE, TINY_SIZE), mode="bilinear")
    torch.testing.assert_close(output.few_shot_maps, upsampled[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(output.fused_maps, 0.7 * output.anomaly_maps + 0.3 * output.few_shot_maps)
    torch.testing.assert_close(output.fused_scores, 0.7 * output.anomaly_scores + 0.3 * output.few_shot_scores)
    assert ((output.fused_maps >= 0) & (output.fused_maps <= 1)).all()


def test_a_reference_image_is_normal_to_its_own_memory():
    model = tiny_model("crane+")
    references = images(2)
    memory = model.build_reference_memory(references, ["a", "b"])
    with torch.inference_mode():
        output = model(torch.cat([references, images(1, seed=9)]), reference_memory=memory)
    assert output.few_shot_scores[:2].abs().max() < 1e-5  # each of its patches is in the memory
    assert output.few_shot_scores[2] > 1e-3


@pytest.mark.parametrize("variant", ["crane", "crane+"])
def test_zero_shot_outputs_are_bitwise_unchanged_by_a_memory(variant):
    model = tiny_model(variant)
    tests = images(3, seed=2)
    with torch.inference_mode():
        plain = model(tests)
        memory = model.build_reference_memory(images(2), ["a", "b"])
        with_memory = model(tests, reference_memory=memory)
        model.set_reference_memory(memory)
        attached = model(tests)
    assert plain.few_shot_scores is None and plain.fused_maps is None and len(plain.to_tuple()) == 6
    for output in (with_memory, attached):
        assert torch.equal(output.anomaly_scores, plain.anomaly_scores)
        assert torch.equal(output.anomaly_maps, plain.anomaly_maps)
        assert torch.equal(output.image_logits, plain.image_logits)
    assert torch.equal(attached.fused_maps, with_memory.fused_maps)


def test_memory_is_saved_and_loaded_beside_the_model(tmp_path):
    model = tiny_model("crane+")
    memory = model.build_reference_memory(images(2), ["sha256:aa", "sha256:bb"], class_name="screw")
    model.set_reference_memory(memory)
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / MEMORY_FILE_NAME).is_file()
    loaded = CraneForAnomalyDetection.from_pretrained(tmp_path / "model")
    assert loaded.reference_memory.class_name == "screw"
    assert loaded.reference_memory.fingerprints == ["sha256:aa", "sha256:bb"]
    for name, features in memory.features.items():
        assert torch.equal(loaded.reference_memory.features[name], features)
    tests = images(2, seed=3)
    with torch.inference_mode():
        expected, got = model(tests), loaded(tests)
    torch.testing.assert_close(got.fused_maps, expected.fused_maps)
    torch.testing.assert_close(got.fused_scores, expected.fused_scores)
    # Saved again without a memory: the folder's memory file goes, so the folder no longer loads one.
    loaded.set_reference_memory(None)
    loaded.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / MEMORY_FILE_NAME).exists()
    assert CraneForAnomalyDetection.from_pretrained(tmp_path / "model").reference_memory is None


def test_memory_file_round_trip(tmp_path):
    model = tiny_model("crane")
    memory = model.build_reference_memory(images(2), ["x", "y"], class_name=None)
    memory.save(tmp_path / "memory.safetensors")
    loaded = ReferenceMemory.load(tmp_path / "memory.safetensors")
    assert loaded.describe() == memory.describe()
    assert loaded.settings == json.loads(json.dumps(memory.settings))
    model.check_reference_memory(loaded, "memory.safetensors")  # accepted by the model that built it


def test_memory_of_another_model_is_refused(tmp_path):
    memory = tiny_model("crane", seed=0).build_reference_memory(images(1), ["a"])
    with pytest.raises(ValueError, match="other backbone weights"):
        tiny_model("crane", seed=1).set_reference_memory(memory, "m.safetensors")
    with pytest.raises(ValueError, match=r"m.safetensors was built for another model: .*variant"):
        tiny_model("crane+").set_reference_memory(memory, "m.safetensors")
    with pytest.raises(ValueError, match="feature_layers"):
        tiny_model("crane", feature_layers=[3, 6]).set_reference_memory(memory, "m.safetensors")
    with pytest.raises(ValueError, match=r"image_size 56 \(this model: 84\)"):
        tiny_model("crane", image_size=84).set_reference_memory(memory, "m.safetensors")


def test_damaged_memory_files_are_refused_with_their_name(tmp_path):
    path = tmp_path / "memory.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"memory\.safetensors: not a valid safetensors file"):
        ReferenceMemory.load(path)
    memory = tiny_model("crane").build_reference_memory(images(2), ["a", "b"])
    memory.fingerprints = ["a"]  # features of 2 images, fingerprint of 1
    memory.save(path)
    with pytest.raises(ValueError, match=r"memory.safetensors: damaged reference memory: features.clip_0"):
        ReferenceMemory.load(path)


def test_fingerprints_are_sha256_of_file_bytes_and_of_pixels(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG fake bytes")
    assert file_fingerprint(path) == "sha256:" + hashlib.sha256(b"\x89PNG fake bytes").hexdigest()
    pixels = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert array_fingerprint(pixels) == array_fingerprint(pixels.copy())
    assert array_fingerprint(pixels) != array_fingerprint(pixels.T.copy())  # same bytes, other shape
    assert array_fingerprint(pixels) != array_fingerprint(pixels.astype(np.uint16))


def test_few_shot_config_fields_are_validated():
    from .tiny_models import tiny_config

    assert tiny_config("crane").few_shot_fusion_weight == 0.5
    with pytest.raises(ValueError, match=r"few_shot_fusion_weight=1\.5 must be in"):
        tiny_config("crane", few_shot_fusion_weight=1.5)
    with pytest.raises(ValueError, match="few_shot_fusion_weight=nan"):
        tiny_config("crane", few_shot_fusion_weight=float("nan"))
    with pytest.raises(ValueError, match="few_shot_features='dino' needs Crane"):
        tiny_config("crane", few_shot_features="dino")
    with pytest.raises(ValueError, match="few_shot_features='patches' is unknown"):
        tiny_config("crane+", few_shot_features="patches")
    assert "few_shot_fusion_weight" in CraneConfig.field_names()


# ---------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def few_shot_folder(tmp_path_factory):
    from .tiny_models import save_tiny_model_folder, write_test_images

    root = tmp_path_factory.mktemp("few_shot")
    folder = save_tiny_model_folder(root / "model", "crane+")
    good = write_test_images(root / "good", count=4, seed=1)
    return folder, good, root


def test_pipeline_with_reference_images_returns_fused_and_both_branches(few_shot_folder):
    from transformers import pipeline

    from crane_hf.models.crane.image_reading import read_image

    folder, good, _ = few_shot_folder
    zero_shot = pipeline("zero-shot-anomaly-detection", model=folder)
    few_shot = pipeline("zero-shot-anomaly-detection", model=folder, reference_images=good[:2])
    plain = zero_shot(good[3])
    result = few_shot(good[3])
    assert set(result) >= {"score", "is_anomalous", "anomaly_map", "zero_shot_score", "few_shot_score", "few_shot_map"}
    assert result["zero_shot_score"] == plain["score"]  # the zero-shot branch is the plain model's
    np.testing.assert_array_equal(result["zero_shot_map"], plain["anomaly_map"])
    weight = zero_shot.model.config.few_shot_fusion_weight
    assert result["score"] == pytest.approx((1 - weight) * plain["score"] + weight * result["few_shot_score"])
    np.testing.assert_allclose(
        result["anomaly_map"], (1 - weight) * plain["anomaly_map"] + weight * result["few_shot_map"], atol=1e-6
    )
    assert result["anomaly_map"].shape == plain["anomaly_map"].shape
    # The memory equals one built by the model from the processed images, with the files' sha256 as fingerprints.
    memory = few_shot._forward_params["reference_memory"]
    assert memory.fingerprints == [file_fingerprint(path) for path in good[:2]]
    pixels = torch.cat([zero_shot.preprocess(read_image(path))["pixel_values"] for path in good[:2]])
    direct = zero_shot.model.build_reference_memory(pixels, memory.fingerprints)
    for name, features in direct.features.items():
        torch.testing.assert_close(memory.features[name], features)
    # per call, and in batches, the same results
    batch = zero_shot([good[3], good[2]], reference_images=good[:2], batch_size=2)
    assert batch[0]["score"] == pytest.approx(result["score"], abs=1e-6)


def test_pipeline_refuses_to_score_a_reference_image_of_the_memory_in_use(few_shot_folder, tmp_path):
    """A reference image matches itself in memory and would pass as normal: the same file, a copy under another
    name, its bytes, its pixels, in a list, against a call's, a pipeline's or the model folder's own memory."""
    import shutil

    from PIL import Image
    from transformers import pipeline

    folder, good, _ = few_shot_folder
    detector = pipeline("zero-shot-anomaly-detection", model=folder)
    copy = shutil.copy(good[0], tmp_path / "renamed.png")  # a pathlib.Path: an input as a str is
    pixels = np.asarray(Image.open(good[1]).convert("RGB"))
    from_files = {"reference_images": good[:2]}
    cases = [
        (good[0], from_files, "good"),
        (copy, from_files, r"renamed\.png"),
        (Path(good[1]).read_bytes(), from_files, "an input image"),
        ([good[3], good[1]], from_files, "good"),
        (Image.fromarray(pixels), {"reference_images": [pixels]}, "an input image"),
    ]
    for image, kwargs, name in cases:
        with pytest.raises(ValueError, match=rf"{name}.*is one of the few-shot memory's reference images"):
            detector(image, **kwargs)
    few_shot = pipeline("zero-shot-anomaly-detection", model=folder, reference_images=good[:2])
    with pytest.raises(ValueError, match="reference images"):
        few_shot(copy)
    detector.model.set_reference_memory(detector.build_reference_memory(good[:2]))
    detector.model.save_pretrained(tmp_path / "with_memory")
    detector.image_processor.save_pretrained(tmp_path / "with_memory")
    detector.model.set_reference_memory(None)
    own = pipeline("zero-shot-anomaly-detection", model=str(tmp_path / "with_memory"))
    with pytest.raises(ValueError, match="reference images"):
        own(good[0])
    # other images are scored; without a memory a reference image is scored as any image
    assert np.isfinite(own(good[3])["score"])
    assert np.isfinite(detector(good[0])["score"])


def test_pipeline_with_a_saved_memory_and_a_folder_memory(few_shot_folder, tmp_path):
    from transformers import pipeline

    folder, good, _ = few_shot_folder
    detector = pipeline("zero-shot-anomaly-detection", model=folder)
    memory = detector.build_reference_memory(good[:2], class_name="part")
    memory.save(tmp_path / "memory.safetensors")
    expected = detector(good[3], reference_images=good[:2])
    from_file = detector(good[3], reference_memory=str(tmp_path / "memory.safetensors"))
    assert from_file["score"] == expected["score"]
    # saved with the model: the folder's pipeline is few-shot without arguments
    detector.model.set_reference_memory(memory)
    detector.model.save_pretrained(tmp_path / "with_memory")
    detector.image_processor.save_pretrained(tmp_path / "with_memory")
    detector.model.set_reference_memory(None)
    again = pipeline("zero-shot-anomaly-detection", model=str(tmp_path / "with_memory"))(good[3])
    assert again["score"] == pytest.approx(expected["score"], abs=1e-6)
    assert again["few_shot_score"] == pytest.approx(expected["few_shot_score"], abs=1e-6)


def test_a_memory_file_is_read_once_per_call_and_again_when_it_changes(few_shot_folder, tmp_path, monkeypatch):
    """The threshold check and the call itself use one reading of `reference_memory=FILE`; a changed file (another
    memory written in its place) is read again and used."""
    from transformers import pipeline

    folder, good, _ = few_shot_folder
    detector = pipeline("zero-shot-anomaly-detection", model=folder)
    path = tmp_path / "memory.safetensors"
    detector.build_reference_memory(good[:2]).save(path)
    expected_first = detector(good[3], reference_images=good[:2])
    expected_second = detector(good[3], reference_images=good[1:3])
    loads: list[str] = []
    original = ReferenceMemory.load.__func__

    def counting_load(cls, source):
        loads.append(str(source))
        return original(cls, source)

    monkeypatch.setattr(ReferenceMemory, "load", classmethod(counting_load))
    result = detector(good[3], reference_memory=str(path))
    assert loads == [str(path)]
    assert result["score"] == expected_first["score"]
    detector(good[3], reference_memory=str(path))
    assert len(loads) == 1  # unchanged file: not read again
    detector.build_reference_memory(good[1:3]).save(path)  # another memory in its place
    result = detector(good[3], reference_memory=str(path))
    assert len(loads) == 2
    assert result["score"] == expected_second["score"]


def test_pipeline_refuses_bad_reference_inputs(few_shot_folder, tmp_path):
    from transformers import pipeline

    folder, good, _ = few_shot_folder
    detector = pipeline("zero-shot-anomaly-detection", model=folder)
    with pytest.raises(ValueError, match="reference_images is empty"):
        detector(good[0], reference_images=[])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.png"):
        detector(good[0], reference_images=[good[1], str(broken)])
    with pytest.raises(ValueError, match=r"missing\.safetensors: no such file"):
        detector(good[0], reference_memory=str(tmp_path / "missing.safetensors"))
    other = tiny_model("crane+", seed=3).build_reference_memory(images(1), ["a"])
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"other\.safetensors was built with other backbone weights"):
        detector(good[0], reference_memory=str(tmp_path / "other.safetensors"))


def _forged(tmp_path, name: str, tensors=None, metadata=None) -> Path:
    """A memory file of a tiny Crane+ model with some tensors or metadata values changed (a stranger's file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = tmp_path / "genuine.safetensors"
    if not source.exists():
        tiny_model("crane+").build_reference_memory(images(2), ["sha256:aa", "sha256:bb"]).save(source)
    with safe_open(str(source), framework="pt") as reader:
        stored_metadata = dict(reader.metadata())
        names = list(reader.keys())
        stored = {key: reader.get_tensor(key) for key in names}
    if tensors is not None:
        tensors(stored)
    stored_metadata.update(metadata or {})
    stored_metadata = {key: value for key, value in stored_metadata.items() if value is not None}
    path = tmp_path / f"{name}.safetensors"
    save_file(stored, str(path), metadata=stored_metadata)
    return path


def _scale_features(factor: float):
    def change(tensors: dict) -> None:
        for key in tensors:
            if key.startswith("features."):
                tensors[key] = tensors[key] * factor

    return change


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        # Features that are not unit vectors: x1000 makes every test patch "identical" (few-shot score 0, a silent
        # pass), zeros make every patch equally far (0.5).
        (_scale_features(1000.0), None, r"features\.clip_0 holds rows that are not unit vectors"),
        (_scale_features(0.0), None, r"features\.clip_0 holds rows that are not unit vectors"),
        (lambda t: t.__setitem__("probe.dino", t["probe.dino"] * float("nan")), None, r"probe\.dino holds non-fin"),
        (lambda t: t.__setitem__("junk", torch.zeros(3)), None, r"unknown tensors \['junk'\]"),
        (None, {"settings": "[1]"}, r"settings must be a JSON object"),
        (None, {"class_name": '{"a": 1}'}, r"class_name must be a string or null"),
        (None, {"fingerprints": '"abc"'}, r"fingerprints must be a list of non-empty strings"),
        (None, {"fingerprints": '["", ""]'}, r"fingerprints must be a list of non-empty strings"),
        (None, {"grid": "[4.7, 4.2]"}, r"grid must be two positive integers"),
        (None, {"grid": "[1e400, 1]"}, r"grid must be two positive integers"),
        (None, {"grid": "[true, 4]"}, r"grid must be two positive integers"),
    ],
)
def test_a_forged_memory_file_is_refused_naming_the_file_and_the_part(tmp_path, tensors, metadata, message):
    """A memory from a stranger's folder decides pass/fail: any part that `save` would not have written fails closed
    with one ValueError naming the file, never a silent score and never a traceback of another type."""
    path = _forged(tmp_path, "forged", tensors, metadata)
    with pytest.raises(ValueError, match=rf"forged\.safetensors: damaged reference memory: .*{message}"):
        ReferenceMemory.load(path)
    assert ReferenceMemory.load(tmp_path / "genuine.safetensors").num_images == 2  # the genuine file loads


def test_the_same_pixels_in_other_bytes_are_a_reference_image_too(few_shot_folder, tmp_path):
    """A reference file re-encoded (another PNG compression, a 16-bit copy of 8-bit values is not the same pixels),
    or opened as a PIL image / array, holds the reference's pixels under other bytes: compared with itself it would
    score ~0 in the few-shot branch and pass as normal. It is refused with memories built from files, and with
    such a memory saved and loaded again."""
    from PIL import Image
    from transformers import pipeline

    folder, good, _ = few_shot_folder
    detector = pipeline("zero-shot-anomaly-detection", model=folder)
    reencoded = tmp_path / "reencoded.png"
    Image.open(good[0]).save(reencoded, compress_level=1)
    assert reencoded.read_bytes() != Path(good[0]).read_bytes()
    memory = detector.build_reference_memory(good[:2])
    memory.save(tmp_path / "memory.safetensors")
    pixels = np.asarray(Image.open(good[1]).convert("RGB"))
    for image in (reencoded, str(reencoded), Image.open(good[1]), pixels, reencoded.read_bytes()):
        for kwargs in ({"reference_images": good[:2]}, {"reference_memory": tmp_path / "memory.safetensors"}):
            with pytest.raises(ValueError, match="is one of the few-shot memory's reference images"):
                detector(image, **kwargs)
    # a re-encoding that changes the pixels (lossy JPEG) is another image, scored as any image
    Image.open(good[0]).save(tmp_path / "lossy.jpg", quality=80)
    assert np.isfinite(detector(str(tmp_path / "lossy.jpg"), reference_images=good[:2])["score"])
    assert np.isfinite(detector(good[3], reference_images=good[:2])["score"])


def test_a_reference_image_in_another_bit_depth_is_a_reference_image_too(few_shot_folder, tmp_path):
    """A 16-bit copy of an 8-bit reference (values x 257) or its float array (/ 255) is the same picture at 8 bits:
    compared with itself it scored ~6e-5 and passed as normal. Pixel fingerprints are taken at 8 bits."""
    from PIL import Image
    from transformers import pipeline

    folder, good, _ = few_shot_folder
    detector = pipeline("zero-shot-anomaly-detection", model=folder)
    pixels = np.asarray(Image.open(good[0]).convert("RGB"))
    Image.fromarray(pixels[..., 0]).save(tmp_path / "gray8.png")
    Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    with pytest.raises(ValueError, match="is one of the few-shot memory's reference images"):
        detector(str(tmp_path / "gray16.png"), reference_images=[str(tmp_path / "gray8.png")])
    for image in (pixels.astype(np.float32) / 255, pixels.astype(np.float64) / 255):
        with pytest.raises(ValueError, match="is one of the few-shot memory's reference images"):
            detector(image, reference_images=good[:2])
    with pytest.raises(ValueError, match="is one of the few-shot memory's reference images"):
        detector(pixels, reference_images=[pixels.astype(np.float32) / 255])
    # one 8-bit step brighter is another picture, scored as any image
    brighter = np.clip(pixels.astype(np.int16) + 1, 0, 255).astype(np.uint8)
    assert np.isfinite(detector(brighter, reference_images=good[:2])["score"])


def test_pixel_fingerprints_are_saved_checked_and_optional_in_older_files(tmp_path):
    """A memory file of an earlier version has no pixel fingerprints: it loads (its images known by their bytes);
    pixel fingerprints of another count than the images are refused."""
    memory = tiny_model("crane+").build_reference_memory(images(2), ["sha256:aa", "sha256:bb"])
    memory.pixel_fingerprints = ["sha256:cc", "sha256:dd"]
    memory.save(tmp_path / "genuine.safetensors")
    loaded = ReferenceMemory.load(tmp_path / "genuine.safetensors")
    assert loaded.pixel_fingerprints == ["sha256:cc", "sha256:dd"]
    assert loaded.known_fingerprints == {"sha256:aa", "sha256:bb", "sha256:cc", "sha256:dd"}
    older = _forged(tmp_path, "older", metadata={"pixel_fingerprints": None})  # no such key
    assert ReferenceMemory.load(older).known_fingerprints == {"sha256:aa", "sha256:bb"}
    with pytest.raises(ValueError, match=r"damaged reference memory: 1 pixel_fingerprints for 2 images"):
        ReferenceMemory.load(_forged(tmp_path, "short", metadata={"pixel_fingerprints": '["sha256:cc"]'}))
