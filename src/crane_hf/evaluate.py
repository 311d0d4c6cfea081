"""Old module path (`crane_hf._deprecated`); `python -m crane_hf.evaluate` keeps running the command."""

from ._deprecated import moved

moved(__name__, "crane_hf.evaluation.evaluate", "crane_hf.commands.evaluate", main="crane_hf.commands.evaluate")
