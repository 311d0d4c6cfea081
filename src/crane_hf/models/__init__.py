"""Model folders, one per model as in transformers' `models/`: `crane/` is Crane and Crane+.

transformers is imported here, before any module of a model folder: importing transformers runs crane_hf's
registration (`crane_hf/registration.py`), which imports the model folder's modules, and must never find one of them
half-imported because it was that module's own `import transformers` that triggered it.
"""

import transformers  # noqa: F401
