"""The package layout: the model folder imports only what remote code may, no import circles, registration on
import whatever is imported first, public names, and the old module paths (deprecated, with all their names)."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers.dynamic_module_utils import get_imports

import crane_hf

from .tiny_models import subprocess_environment

PACKAGE = Path(crane_hf.__file__).parent
MODEL_FOLDER = PACKAGE / "models" / "crane"
# What transformers itself needs: remote code may import these (and the standard library), nothing else.
REMOTE_CODE_PACKAGES = {"torch", "transformers", "huggingface_hub", "safetensors", "numpy", "PIL"}

# The public names each module of crane_hf 0.1.0 defined (read from its sources before the layout change).
OLD_API = {
    "anomaly_losses": ["LABEL_SMOOTHING", "crane_loss", "dice_loss", "focal_loss", "patch_probabilities"],
    "atomic_io": [
        "OutputExistsError",
        "atomic_output_dir",
        "atomic_write_bytes",
        "atomic_write_text",
        "check_can_write",
    ],
    "calibrate": ["add_arguments", "calibrate_folder", "run", "threshold_for_fpr"],
    "checkpoint_validation": [
        "CheckpointMismatchError",
        "FLOAT_DTYPES",
        "check_checkpoint",
        "check_floating_point",
        "check_loading_info",
        "checkpoint_problems",
        "resolve_safetensors_files",
        "safetensors_header",
    ],
    "cli": ["COMMANDS", "build_parser", "main"],
    "clip_layers": ["clip_block", "clip_mlp", "merge_heads", "project_qkv", "split_heads"],
    "configuration_crane": [
        "CLIP_VIT_L14_336",
        "CraneConfig",
        "DINOV2_REG_B14",
        "EATTN_TYPES",
        "IMAGENET_MEAN",
        "IMAGENET_STD",
        "LEGACY_CLIP_EOS_TOKEN_ID",
        "OPENAI_CLIP_MEAN",
        "OPENAI_CLIP_STD",
        "PAPER_SETTINGS",
        "VARIANTS",
        "build_prompt_texts",
        "end_of_text_id",
    ],
    "convert_original": [
        "BackboneMismatchError",
        "FINGERPRINT_KEYS",
        "FINGERPRINT_RTOL",
        "PROMPT_KEYS",
        "add_arguments",
        "apply_original_prompts",
        "check_backbone_fingerprint",
        "convert_original_checkpoint",
        "deep_prompt_keys",
        "load_original_checkpoint",
        "main",
        "require_prompt_width",
        "run",
    ],
    "d_attention": ["dattn_features", "dattn_values", "dino_similarity_attention"],
    "demo": [
        "DEMO_EXAMPLE_CLASSES",
        "DEMO_EXAMPLE_DEFECTS",
        "DEMO_IMAGE_SIZE",
        "DEMO_TRAIN_CLASSES",
        "OFFLINE_BANNER",
        "add_arguments",
        "run",
        "run_demo",
        "train_demo_prompts",
    ],
    "e_attention": ["EAttnLayerOutput", "SELF_CORRELATION_PAIRS", "dual_stream_attention", "eattn_block"],
    "evaluate": [
        "INDUSTRIAL_DATASETS",
        "MEDICAL_DATASETS",
        "TABLE_COLUMNS",
        "add_arguments",
        "evaluate_model",
        "main",
        "metrics_table",
        "paper_protocol",
        "run",
        "score_dataset",
        "write_report",
    ],
    "feature_cache": [
        "CACHE_INFO",
        "CachedFeatures",
        "FeatureCache",
        "FeatureCacheMismatchError",
        "VISION_FIELDS",
        "cache_fingerprint",
        "dataset_signature",
        "feature_grid",
        "fill_feature_cache",
    ],
    "gaussian_smoothing": ["gaussian_kernel1d", "gaussian_smooth"],
    "hub_publishing": [
        "METRIC_NAMES",
        "PIPELINE_TAG",
        "TAGS",
        "add_arguments",
        "build_model_card",
        "known_results",
        "run",
        "write_repository_folder",
    ],
    "image_files": [
        "IMAGE_EXTENSIONS",
        "SkippedFile",
        "collect_image_paths",
        "image_file_size",
        "read_encoded_image",
        "read_image",
        "read_image_bytes",
    ],
    "image_processing_crane": [
        "CraneImageProcessor",
        "FLOAT_RANGE_TOLERANCE",
        "ImageLike",
        "OPENAI_CLIP_MEAN",
        "OPENAI_CLIP_STD",
        "image_to_rgb_array",
        "mask_to_binary",
        "resize_mask",
        "resize_rgb",
    ],
    "modeling_crane": [
        "CraneAnomalyDetectionOutput",
        "CraneForAnomalyDetection",
        "CranePreTrainedModel",
        "PROMPT_PREFIX",
    ],
    "pipeline_zero_shot_anomaly_detection": ["ZeroShotAnomalyDetectionPipeline"],
    "position_embeddings": ["resize_position_embeddings"],
    "predict": ["CSV_COLUMNS", "PredictionReport", "add_arguments", "make_pipeline", "predict_images", "run"],
    "prompt_learning": ["CranePromptLearner", "encode_prompts"],
    "prompt_tokenization": [
        "CLIP_CONTEXT_LENGTH",
        "CLIP_EOT_TOKEN_ID",
        "CLIP_SOT_TOKEN_ID",
        "bundled_tokenizer_dir",
        "load_clip_tokenizer",
        "tokenize_prompts",
    ],
    "reproducibility": ["ALIGNMENT", "align_tensors", "per_sample"],
    "score_pooling": ["score_based_pooling"],
    "train": [
        "CraneTrainingStep",
        "DEFAULT_CLIP",
        "DEFAULT_DINO",
        "FEATURE_CACHE",
        "LOSS_NAMES",
        "RESUME_SETTINGS",
        "TRAINING_LOG",
        "add_arguments",
        "build_model",
        "epoch_seed",
        "load_training_data",
        "main",
        "run",
        "train",
    ],
    "training_checkpoints": [
        "CHECKPOINT_PREFIX",
        "TRAINER_STATE",
        "TRAINING_STATE",
        "checkpoint_path",
        "list_checkpoints",
        "prompt_tensors",
        "publish_model",
        "read_trainer_state",
        "register_prompt_state_hooks",
        "resolve_checkpoint",
        "save_checkpoint",
    ],
    "training_data": [
        "EpochShuffleSampler",
        "ProcessedImages",
        "UnreadableRowError",
        "epoch_permutation",
        "image_file",
        "undecoded",
    ],
    "visualization": ["CONTOUR_COLOR", "colorize", "render_overlay", "threshold_contour"],
}


MOVED_WHOLE = {"modeling_crane": "crane_hf.models.crane.modeling_crane", "atomic_io": "crane_hf.io.atomic"}


def run_python(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A child Python process with this checkout's crane_hf; fails the test unless it exits 0."""
    result = subprocess.run(
        [sys.executable, *arguments],
        capture_output=True,
        text=True,
        env=subprocess_environment(),
        cwd=cwd,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


COMPUTED_NAME = "<a computed name>"


def import_statements(path: Path) -> list[tuple[int, str, list[str], int]]:
    """(level, module, imported names, line) of every import in the file, inside functions and `try` blocks too, and
    of every `import_module(...)` / `__import__(...)` call (a name that is no string literal: `COMPUTED_NAME`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend((0, alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or "", [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in ("import_module", "__import__"):
            name = node.args[0] if node.args else None
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                module = name.value.lstrip(".")
                found.append((len(name.value) - len(module), module, [], node.lineno))
            else:
                found.append((0, COMPUTED_NAME, [], node.lineno))
    return sorted(found, key=lambda item: item[3])


def remote_code_problems(folder: Path) -> list[str]:
    """Imports of the folder's modules that remote code may not have: beyond `REMOTE_CODE_PACKAGES`, the standard
    library and the folder's own modules (by `ast`, and by transformers' own remote-code import check)."""
    problems = []
    for path in sorted(folder.glob("*.py")):
        for level, module, names, line in import_statements(path):
            top = module.split(".")[0]
            if level == 0:
                allowed = top in REMOTE_CODE_PACKAGES or top in sys.stdlib_module_names
            else:
                siblings = [top] if top else names
                allowed = level == 1 and all((folder / f"{name}.py").is_file() for name in siblings)
            if not allowed:
                problems.append(f"{path.name}:{line} imports {'.' * level}{module}")
        problems += [
            f"{path.name}: transformers' import check requires {name}"
            for name in get_imports(path)
            if name not in REMOTE_CODE_PACKAGES and name not in sys.stdlib_module_names
        ]
    return problems


def test_the_boundary_check_finds_imports_inside_functions_and_outside_the_folder(tmp_path):
    (tmp_path / "inside.py").write_text("import torch\nfrom .other import x\n")
    (tmp_path / "other.py").write_text(
        "def f():\n    import datasets\n\n\nfrom ..presets import y\nimport scipy.ndimage\n"
    )
    assert remote_code_problems(tmp_path) == [
        "other.py:2 imports datasets",
        "other.py:5 imports ..presets",
        "other.py:6 imports scipy.ndimage",
        "other.py: transformers' import check requires datasets",
        "other.py: transformers' import check requires scipy",
    ]


def test_the_boundary_check_finds_imports_by_name(tmp_path):
    """`importlib.import_module` and `__import__` import as surely as an import statement: a literal name is checked
    like one, a computed name cannot be checked and is refused."""
    (tmp_path / "named.py").write_text(
        "import importlib\nfrom importlib import import_module\n\n\ndef f(name):\n"
        "    importlib.import_module('scipy.ndimage')\n    __import__('datasets')\n"
        "    import_module('..io.atomic', __package__)\n    return import_module(name)\n"
    )
    assert remote_code_problems(tmp_path) == [
        "named.py:6 imports scipy.ndimage",
        "named.py:7 imports datasets",
        "named.py:8 imports ..io.atomic",
        "named.py:9 imports <a computed name>",
    ]


def test_model_folder_imports_only_what_remote_code_may():
    shipped = {path.name for path in MODEL_FOLDER.glob("*.py")}
    assert {
        "configuration_crane.py",
        "modeling_crane.py",
        "image_processing_crane.py",
        "pipeline_zero_shot_anomaly_detection.py",
        "e_attention.py",
        "d_attention.py",
    } <= shipped
    assert remote_code_problems(MODEL_FOLDER) == []


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """crane_hf module -> the crane_hf modules it imports (module level and inside functions)."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for level, module, names, _ in import_statements(path):
            if level:
                base = package.split(".")[: len(package.split(".")) - level + 1]
                module = ".".join([*base, module] if module else base)
            targets = [module, *(f"{module}.{imported}" for imported in names)]
            graph[name].update(target for target in targets if target in paths and target != name)
        if name != "crane_hf._deprecated":  # its table names every module an old path hands on, imported on demand
            graph[name].update(named_modules(path, paths) - {name})
    return graph


def named_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The crane_hf modules whose full name a string of the file spells out, where the file imports by name
    (`importlib.import_module(module_name)`, as the command line does with its table of command modules)."""
    if not any(module == COMPUTED_NAME for _, module, _, _ in import_statements(path)):
        return set()
    strings = {
        node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.Constant)
    }
    return {value for value in strings if isinstance(value, str) and value in modules}


def test_no_import_circles():
    graph = import_graph()
    assert graph["crane_hf.model_loading"] >= {"crane_hf.presets", "crane_hf.models.crane.modeling_crane"}
    circles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert circles == []


def test_import_graph_has_the_modules_imported_by_name():
    """Modules imported by `importlib.import_module` with their name written out (the command line's table of
    command modules) are arrows of the graph too; otherwise a circle through them goes unseen."""
    graph = import_graph()
    assert "crane_hf.commands.predict" in graph["crane_hf.commands.cli"]
    assert "crane_hf.commands.cli" not in graph["crane_hf.commands.predict"]


def imports_leaving(graph: dict[str, set[str]], package: str) -> set[tuple[str, str]]:
    """(module, imported module) pairs of the crane_hf modules in `package` that import crane_hf outside it."""
    return {
        (name, target)
        for name, targets in graph.items()
        if name.startswith(package)
        for target in targets
        if not target.startswith(package)
    }


def test_the_model_folder_imports_no_other_part_of_crane_hf():
    assert imports_leaving(import_graph(), "crane_hf.models.crane") == set()


def test_reporting_imports_no_other_part_of_crane_hf():
    """`reporting/` is a leaf: the commands and the evaluation call it, and a Space copies two of its modules alone."""
    graph = import_graph()
    assert graph["crane_hf.reporting.gradio_app"] == {"crane_hf.reporting.decision_figure"}
    assert imports_leaving(graph, "crane_hf.reporting") == set()


REGISTERED = textwrap.dedent(
    """
    import sys
    {first}
    torch_after_first_import = "torch" in sys.modules
    import crane_hf
    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY
    assert "zero-shot-anomaly-detection" in PIPELINE_REGISTRY.get_supported_tasks()
    assert type(AutoConfig.for_model("crane")) is crane_hf.CraneConfig
    assert crane_hf.CraneForAnomalyDetection.preset_loader is not None
    print(torch_after_first_import)
    """
)


@pytest.mark.parametrize(
    ("first", "torch_imported"),
    [
        ("import crane_hf", False),  # light: registration waits for transformers
        ("import transformers", False),  # transformers first: crane_hf registers at once
        ("import crane_hf.models.crane.configuration_crane", True),  # a model-folder module first
        (
            "from crane_hf.models.crane.pipeline_zero_shot_anomaly_detection import ZeroShotAnomalyDetectionPipeline",
            True,
        ),
    ],
)
def test_registered_with_transformers_whatever_is_imported_first(first, torch_imported, tmp_path):
    result = run_python(["-c", REGISTERED.format(first=first)], tmp_path)
    assert result.stdout.split() == [str(torch_imported)]


def test_public_names_are_importable_from_crane_hf():
    from crane_hf.models.crane import modeling_crane

    names = {name: getattr(crane_hf, name) for name in crane_hf.__all__}
    assert names["CraneForAnomalyDetection"] is modeling_crane.CraneForAnomalyDetection
    assert names["PIPELINE_TASK"] == "zero-shot-anomaly-detection"
    assert callable(names["load_detector"])
    assert set(crane_hf.__all__) <= set(dir(crane_hf))


@pytest.mark.parametrize("old", sorted(OLD_API))
def test_old_module_path_warns_and_keeps_every_name(old):
    name = f"crane_hf.{old}"
    saved = sys.modules.pop(name, None)
    try:
        with pytest.warns(DeprecationWarning, match=rf"^{name} is deprecated: its contents moved to crane_hf\."):
            module = importlib.import_module(name)
        assert [attribute for attribute in OLD_API[old] if not hasattr(module, attribute)] == []
        if old in MOVED_WHOLE:  # the new module itself, so that monkeypatching the old path reaches the code
            assert module is importlib.import_module(MOVED_WHOLE[old])
            assert module.__spec__.name == MOVED_WHOLE[old]
    finally:
        if saved is not None:
            sys.modules[name] = saved


@pytest.mark.parametrize(
    "module", ["crane_hf.train", "crane_hf.evaluate", "crane_hf.convert_original", "crane_hf.data.synthetic"]
)
def test_documented_programs_run_without_a_deprecation_warning(module, tmp_path):
    result = run_python(["-W", "always::DeprecationWarning", "-m", module, "--help"], tmp_path)
    assert result.stdout.startswith("usage: ")
    assert "is deprecated" not in result.stderr
    assert os.path.basename(module.replace(".", "/")) in result.stdout.splitlines()[0]
