"""Crane and Crane+: the model folder that `save_pretrained` and `crane-hf push` ship as remote code."""
