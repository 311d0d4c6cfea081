"""Training Crane's prompts: the loop, its data loading, checkpoints and feature cache."""
