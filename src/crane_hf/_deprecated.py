"""The module paths of crane_hf before its layout in wings (`models/crane/`, `commands/`, `training/`, ...).

Each old module (`crane_hf/modeling_crane.py`, `crane_hf/predict.py`, ...) is a file of three lines that calls
`moved`: importing it warns with a `DeprecationWarning` naming the new place and hands on the new module (or the
names of the modules its contents went to). They stay for one release and are removed in crane_hf 0.3.0.

Run as programs, the old paths the README and docs use (`python -m crane_hf.train`, `accelerate launch -m
crane_hf.evaluate`, `python -m crane_hf.convert_original`) run their command without a warning, and keep doing so.
"""

from __future__ import annotations

import importlib
import sys
import warnings

REMOVED_IN = "0.3.0"


def moved(old: str, *new: str, main: str | None = None) -> None:
    """Make the calling module `old` stand for the module(s) `new`.

    Args:
        old: the calling module's `__name__` (`"__main__"` when it is run with `python -m`).
        new: the modules that hold its contents now. With one, importing `old` gives that module itself (so
            `monkeypatch.setattr` on it reaches the real code); with several, `old` hands on their names, looked up
            in this order.
        main: the module whose `main()` (returning an exit code) runs when `old` is run as a program.

    Raises:
        SystemExit: with `main()`'s exit code, when `old` is run as a program.
    """
    if old == "__main__":
        if main is not None:
            sys.exit(importlib.import_module(main).main())
        return
    warnings.warn(
        f"{old} is deprecated: its contents moved to {', '.join(new)}; import them from there (the old path is "
        f"removed in crane_hf {REMOVED_IN}).",
        DeprecationWarning,
        stacklevel=3,
    )
    modules = [importlib.import_module(name) for name in new]
    if len(modules) == 1:
        sys.modules[old] = modules[0]
        return
    shim = sys.modules[old]

    def __getattr__(name: str) -> object:
        for module in modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set().union(*(dir(module) for module in modules)))

    shim.__getattr__ = __getattr__
    shim.__dir__ = __dir__


__all__ = ["REMOVED_IN", "moved"]
