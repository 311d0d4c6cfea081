"""Conventions every crane-hf command follows: argument checks before work, one-line errors, exit codes, signals.

Exit codes (also in `crane-hf --help`): 0 success; 1 a bug (the only case with a traceback); 2 an argument, input,
model folder or output was refused, with one line on stderr naming it; 3 finished, but some inputs were skipped
(listed on stderr and in the output); 130 interrupted by SIGINT (Ctrl-C) and 143 by SIGTERM: the run's temporary
files are removed and nothing half-written is published.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from collections.abc import Callable

EXIT_OK, EXIT_BUG, EXIT_ERROR, EXIT_SKIPPED = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM

EXIT_CODES_HELP = """exit codes:
  0    success
  2    an argument, input, model folder or output was refused: one line on stderr names it and the problem;
       nothing is written
  3    finished, but some inputs were skipped (each named on stderr with the reason, and in skipped.txt)
  130  interrupted by Ctrl-C (SIGINT); 143: terminated (SIGTERM). Temporary files are removed, nothing
       half-written is published; a later run on the same output cleans what a killed (SIGKILL) run left
       (predict keeps the images it finished for --resume)
  1    a bug in crane-hf: the only case that prints a traceback

Outputs: crane-hf writes each output folder under a temporary name and renames it when complete; it refuses
an output that is, or contains, an input, the model, the dataset, the working, home or root folder; --overwrite
replaces only folders crane-hf wrote (they hold .crane-hf-output.json, listing its files with their SHA-256, and
nothing else); two runs on one
output at once: the second is refused."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The help of every command (the dispatcher's and the `python -m` programs'): keeps the description's layout
    and appends each option's default to its help, where it has one that the help does not already state (None and
    off switches have none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = "%(default)" in text or "default" in text.lower()
        if shown or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that temporary outputs are removed as on Ctrl-C."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: the command, the argument and the problem."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def require_range(
    name: str,
    value: float | None,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise `ValueError` "NAME VALUE: must be in [low, high]" unless `value` (None: not given) is finite, inside."""
    if value is None:
        return
    inside = math.isfinite(value) and (low < value if low_open else low <= value)
    inside = inside and (value < high if high_open else value <= high)
    if not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} {value:g}: must be in {interval}")


def local_path(text: str) -> str:
    """argparse type of the folders and files a command writes: "~" expanded once, here, so that the path checked
    (protected folders, existing contents) is the path written, also when the shell left a quoted "~" alone."""
    return os.path.expanduser(text)


def require_positive(name: str, value: int | None) -> None:
    """Raise `ValueError` unless the integer `value` (None: not given) is at least 1."""
    if value is not None and value < 1:
        raise ValueError(f"{name} {value}: must be at least 1")


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run(args)` with crane-hf's handling of interruptions and expected failures (see the exit codes)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return run(args)
    except KeyboardInterrupt:
        print(
            "crane-hf: interrupted (SIGINT); temporary files removed, nothing half-written published.", file=sys.stderr
        )
        return EXIT_SIGINT
    except Terminated:
        print(
            "crane-hf: terminated (SIGTERM); temporary files removed, nothing half-written published.", file=sys.stderr
        )
        return EXIT_SIGTERM
    except (OSError, ValueError, MemoryError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except RuntimeError as error:
        if type(error).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            raise
        print(f"error: out of memory ({one_line(error)}); try a smaller --batch-size", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        release_process_group()


def release_process_group() -> None:
    """Destroy the default `torch.distributed` process group if this process joined one (`accelerate launch`,
    `--num-processes`). A process that exits with its gloo group alive can abort at interpreter shutdown
    (SIGABRT, "terminate called without an active exception": gloo's threads outlive the interpreter), which the
    launcher reports as the whole run failing. Destroying it is local to the process; torch is not imported here."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (multi-line library messages joined with "; ")."""
    text = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


__all__ = [
    "EXIT_CODES_HELP",
    "HelpFormatter",
    "OneLineArgumentParser",
    "Terminated",
    "local_path",
    "one_line",
    "release_process_group",
    "require_positive",
    "require_range",
    "run_command",
]
