"""Model folders, one per model as in transformers' `models/`: `crane/` holds Crane and Crane+."""
