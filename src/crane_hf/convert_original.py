"""Old module path (`crane_hf._deprecated`); `python -m crane_hf.convert_original` keeps running the command."""

from ._deprecated import moved

moved(
    __name__, "crane_hf.models.crane.convert_original", "crane_hf.commands.convert", main="crane_hf.commands.convert"
)
