"""The `crane-hf` command line: the dispatcher (`cli.py`) and one module per command."""
