"""Old module path (`crane_hf._deprecated`); `python -m crane_hf.cli` keeps running the command."""

from ._deprecated import moved

moved(__name__, "crane_hf.commands.cli", main="crane_hf.commands.cli")
