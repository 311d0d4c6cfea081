"""Old module path (`crane_hf._deprecated`); `python -m crane_hf.train` keeps running the command."""

from ._deprecated import moved

moved(
    __name__,
    "crane_hf.training.train",
    "crane_hf.commands.train",
    "crane_hf.training.options",
    main="crane_hf.commands.train",
)
