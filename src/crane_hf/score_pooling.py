"""Old module path, kept until crane_hf 0.3.0 (`crane_hf._deprecated`)."""

from ._deprecated import moved

moved(__name__, "crane_hf.models.crane.score_pooling")
