"""Files on disk: atomic outputs."""
