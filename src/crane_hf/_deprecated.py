"""The module paths of crane_hf 0.1.0 (before the layout in wings: `models/crane/`, `commands/`, `training/`, ...),
kept importable until crane_hf 0.3.0.

No file stands at an old path (so that version control follows each file to its new place); `install()`, called by
`crane_hf/__init__.py`, puts a finder at the end of `sys.meta_path` that answers for `crane_hf.<old name>` only.
Importing an old path warns with a `DeprecationWarning` naming the new place and gives the new module itself where
the module moved whole (so that monkeypatching the old path reaches the code), or else a module that hands on the
names of the modules its contents went to, looked up in the order of `MOVED`.

Run as programs, the old paths the README and docs use keep running their command, without a warning:
`python -m crane_hf.train` and `python -m crane_hf.predict` (also under `accelerate launch -m`),
`python -m crane_hf.evaluate`,
`python -m crane_hf.convert_original` and `python -m crane_hf.cli`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType
from typing import Any

REMOVED_IN = "0.3.0"

MODEL_FOLDER = "crane_hf.models.crane"
MOVED: dict[str, tuple[str, ...]] = {
    **{
        name: (f"{MODEL_FOLDER}.{name}",)
        for name in (
            "anomaly_losses",
            "checkpoint_validation",
            "clip_layers",
            "configuration_crane",
            "d_attention",
            "e_attention",
            "gaussian_smoothing",
            "image_processing_crane",
            "modeling_crane",
            "pipeline_zero_shot_anomaly_detection",
            "position_embeddings",
            "prompt_learning",
            "prompt_tokenization",
            "reproducibility",
            "score_pooling",
            "visualization",
        )
    },
    "atomic_io": ("crane_hf.io.atomic",),
    "calibrate": ("crane_hf.commands.calibrate",),
    "cli": ("crane_hf.commands.cli",),
    "convert_original": (f"{MODEL_FOLDER}.convert_original", "crane_hf.commands.convert"),
    "demo": ("crane_hf.commands.demo",),
    "evaluate": ("crane_hf.evaluation.evaluate", "crane_hf.commands.evaluate"),
    "feature_cache": ("crane_hf.training.feature_cache",),
    "hub_publishing": ("crane_hf.commands.push",),
    "image_files": (f"{MODEL_FOLDER}.image_reading", "crane_hf.io.image_files"),
    "predict": ("crane_hf.commands.predict", "crane_hf.model_loading"),
    "train": ("crane_hf.training.train", "crane_hf.commands.train", "crane_hf.training.options"),
    "training_checkpoints": ("crane_hf.training.checkpoints",),
    "training_data": ("crane_hf.training.data_loading",),
}
# Old paths run with `python -m`: the module whose `main()` (returning an exit code) they run.
PROGRAMS = {
    "cli": "crane_hf.commands.cli",
    "convert_original": "crane_hf.commands.convert",
    "evaluate": "crane_hf.commands.evaluate",
    "predict": "crane_hf.commands.predict",
    "train": "crane_hf.commands.train",
}


def install() -> None:
    """Make the old module paths importable (idempotent)."""
    if not any(isinstance(finder, _OldPathFinder) for finder in sys.meta_path):
        sys.meta_path.append(_OldPathFinder())


class _OldPathFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != "crane_hf" or name not in MOVED:
            return None
        # For `python -m`: runpy takes sys.argv[0] and __file__ from the origin, the module that holds `main`.
        origin = importlib.util.find_spec(PROGRAMS[name]).origin if name in PROGRAMS else None
        return importlib.machinery.ModuleSpec(fullname, _OldPathLoader(name), origin=origin)


class _OldPathLoader(importlib.abc.Loader):
    def __init__(self, name: str):
        self.name = name
        self.new_spec: Any = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[self.name]
        warnings.warn(
            f"crane_hf.{self.name} is deprecated: its contents moved to {', '.join(new)}; import them from there "
            f"(the old path is removed in crane_hf {REMOVED_IN}).",
            DeprecationWarning,
            stacklevel=2,
        )
        modules = [importlib.import_module(name) for name in new]
        if len(modules) == 1:
            self.new_spec = modules[0].__spec__  # the import system sets the old path's spec; exec_module restores it
            return modules[0]
        return _NamesOf(spec.name, modules)

    def exec_module(self, module: ModuleType) -> None:
        if self.new_spec is not None:
            module.__spec__ = self.new_spec

    def get_code(self, fullname: str) -> CodeType | None:
        """What `python -m crane_hf.<old path>` runs: the command's `main()` (nothing under another `__name__`,
        e.g. `__mp_main__` in a spawned child process)."""
        if self.name not in PROGRAMS:
            return None
        source = (
            "if __name__ == '__main__':\n"
            "    import sys\n"
            f"    from {PROGRAMS[self.name]} import main\n"
            "    sys.exit(main())\n"
        )
        return compile(source, f"<{fullname}>", "exec")


class _NamesOf(ModuleType):
    """A module whose names are those of `modules`, looked up in order."""

    def __init__(self, name: str, modules: list[ModuleType]):
        super().__init__(name, f"Deprecated: the names of {', '.join(module.__name__ for module in modules)}.")
        self._modules = modules

    def __getattr__(self, attribute: str) -> Any:
        for module in self._modules:
            if hasattr(module, attribute):
                return getattr(module, attribute)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attribute!r}")

    def __dir__(self) -> list[str]:
        return sorted(set().union(*(dir(module) for module in self._modules)))


__all__ = ["MOVED", "PROGRAMS", "REMOVED_IN", "install"]
