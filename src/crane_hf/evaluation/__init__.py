"""Evaluating a model on annotated datasets: the paper's per-class metrics and protocol."""
