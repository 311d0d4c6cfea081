"""`crane-hf --help` and every command's help answer without importing torch, transformers, datasets or accelerate,
show each option's default, and cite no document users do not have. (Start-up times: benchmarks/cli_startup.py.)"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

import pytest

from crane_hf.commands.cli import COMMANDS, build_parser

from .tiny_models import subprocess_environment

HEAVY = ("torch", "transformers", "datasets", "accelerate")
CONSOLE_SCRIPT = shutil.which("crane-hf")
HELP_COMMANDS = [
    [CONSOLE_SCRIPT, "--help"],
    *([CONSOLE_SCRIPT, command, "--help"] for command in COMMANDS),
    *([sys.executable, "-m", module, "--help"] for module in ("crane_hf.train", "crane_hf.evaluate")),
    [sys.executable, "-m", "crane_hf.convert_original", "--help"],
]


def imported_modules(importtime_report: str) -> list[str]:
    """Module names from `python -X importtime` lines ("import time: self | cumulative | name")."""
    return [
        line.rsplit("|", 1)[1].strip()
        for line in importtime_report.splitlines()
        if line.startswith("import time:") and not line.rstrip().endswith("imported package")
    ]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda command: " ".join(command[1:]))
def test_help_imports_nothing_heavy(command, tmp_path):
    assert CONSOLE_SCRIPT is not None, "the crane-hf console script is not installed"
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**subprocess_environment(), "PYTHONPROFILEIMPORTTIME": "1"},
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: ")
    imported = imported_modules(result.stderr)
    assert "crane_hf" in imported and "argparse" in imported  # the report is there
    assert [name for name in imported if name.partition(".")[0] in HEAVY] == []


def subcommand_parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    monkeypatch.setenv("COLUMNS", "10000")  # one line per option: defaults are not wrapped
    parser = build_parser()
    (subparsers,) = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return dict(subparsers.choices)


def test_every_option_default_is_shown_in_the_help(monkeypatch):
    missing = []
    for name, parser in subcommand_parsers(monkeypatch).items():
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            line = " ".join(parser._get_formatter()._format_action(action).split())  # as --help shows it
            default = action.default
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else str(default)
            if str(default) not in line and shown not in line:
                missing.append(f"crane-hf {name} {action.option_strings[0]}: {line.strip()}")
    assert missing == []


def test_help_cites_no_specification_sections(monkeypatch):
    texts = {name: parser.format_help() for name, parser in subcommand_parsers(monkeypatch).items()}
    citations = {name: re.findall(r".*\bspec\b.*", text) for name, text in texts.items()}
    assert {name: lines for name, lines in citations.items() if lines} == {}
