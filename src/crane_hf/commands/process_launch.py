"""Running a command on several processes with crane-hf's own exit codes (`--num-processes N`).

`accelerate launch` (torch's elastic launcher underneath) turns any non-zero exit of a process into a failure of the
whole launch: exit 1 with a torch traceback, whatever the code was. crane-hf's codes mean more than that (3: the
report is complete but some inputs were skipped; 2: an input was refused; 130/143: interrupted), so a command given
`--num-processes N` starts the launcher itself: each process runs the command with the parsed arguments, records its
exit code in a private folder and exits 0 when crane-hf handled the outcome; the parent then exits with the main
process's code (or another process's, if only that one failed). A process that ends without recording a code (a
crash, a kill) makes the run exit 1, the launcher's traceback above it. On Linux, the launcher and the processes end
when the command that started them is killed, even with SIGKILL (`end_with_parent`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

from ..process_lifetime import end_with_parent, ends_with_parent
from .cli_support import EXIT_BUG, EXIT_SIGINT, EXIT_SIGTERM, Terminated

WORKER_FOLDER_VARIABLE = "CRANE_HF_WORKER_FOLDER"  # set by `run_in_processes` for the processes it starts
_ARGUMENTS_FILE = "arguments.json"


def launched_processes() -> int:
    """How many processes the launcher that started this one runs (1 when not under `accelerate launch`)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _arguments_for_workers(args: argparse.Namespace) -> dict:
    """The parsed arguments the processes run with: JSON values only (the subcommand's module is dropped)."""
    values = {name: value for name, value in vars(args).items() if not name.startswith("_") and name != "command"}
    values["num_processes"] = 1
    return values


def accelerate_launch_command(module: str, num_processes: int) -> list[str]:
    """`accelerate launch` of `python -m module` on `num_processes` processes of this machine (one per GPU; gloo on
    the CPU where there is none), on a free port, without mixed precision or dynamo (the command decides those)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        module,
    ]


def run_in_processes(module: str, args: argparse.Namespace, num_processes: int) -> int:
    """Run `python -m module` on `num_processes` processes (`accelerate launch --multi_gpu`, gloo where there is no
    GPU) with the already parsed and checked `args`; returns the exit code a single process would have given.

    Ctrl-C or SIGTERM received here is passed on to the processes (to the launcher while they start), which clean
    their temporary files and record 130 or 143; the run then returns that code."""
    with tempfile.TemporaryDirectory(prefix="crane-hf-processes-") as folder:
        with open(os.path.join(folder, _ARGUMENTS_FILE), "w", encoding="utf-8") as stream:
            json.dump(_arguments_for_workers(args), stream)
        command = accelerate_launch_command(module, num_processes)
        # Its own session: a Ctrl-C in the terminal reaches this process only, which passes it on once.
        environment = {**os.environ, WORKER_FOLDER_VARIABLE: folder}
        launcher = subprocess.Popen(command, env=environment, start_new_session=True, preexec_fn=ends_with_parent())
        returncode, stopped_by = _wait(launcher, folder, num_processes)
        codes = {rank: int(text) for rank in range(num_processes) if (text := _read(folder, f"exit-{rank}"))}
        # The other processes' messages repeat the main one's; shown when one of them alone failed.
        failed = next((rank for rank, code in codes.items() if code), None)
        if failed not in (None, 0):
            sys.stderr.write(_read(folder, f"stderr-{failed}") or "")
    if len(codes) < num_processes and stopped_by is not None:
        name = "SIGINT" if stopped_by == EXIT_SIGINT else "SIGTERM"
        print(f"crane-hf: interrupted ({name}) before its {num_processes} processes finished.", file=sys.stderr)
        return stopped_by
    if len(codes) < num_processes:
        missing = sorted(set(range(num_processes)) - set(codes))
        print(
            f"error: process {', '.join(map(str, missing))} of {num_processes} ended without finishing (launcher exit "
            f"code {returncode}; see its messages above)",
            file=sys.stderr,
        )
        return EXIT_BUG
    return codes[0] or next((code for code in codes.values() if code), 0)


def _read(folder: str, name: str) -> str | None:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as stream:
        return stream.read()


def _wait(launcher: subprocess.Popen, folder: str, num_processes: int) -> tuple[int, int | None]:
    """The launcher's exit code, and the exit code of the last signal passed on meanwhile (Ctrl-C: SIGINT,
    SIGTERM), or None. A signal goes to the processes themselves once each has recorded its process id (each
    then records 130 or 143 and ends normally, so that the launcher ends without a traceback of its own, which
    is not a bug); before that, to the launcher, which stops them."""
    stopped_by = None
    while True:
        try:
            return launcher.wait(), stopped_by
        except KeyboardInterrupt:
            _pass_on(launcher, folder, num_processes, signal.SIGINT)
            stopped_by = EXIT_SIGINT
        except Terminated:
            _pass_on(launcher, folder, num_processes, signal.SIGTERM)
            stopped_by = EXIT_SIGTERM


def _pass_on(launcher: subprocess.Popen, folder: str, num_processes: int, signum: int) -> None:
    pids = [_read(folder, f"pid-{rank}") for rank in range(num_processes)]
    if any(pid is None or not pid.strip().isdigit() for pid in pids):
        launcher.send_signal(signum)
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # already ended
            os.kill(int(pid), signum)


def worker_arguments() -> argparse.Namespace | None:
    """In a process started by `run_in_processes`: the arguments it runs with; otherwise None."""
    folder = os.environ.get(WORKER_FOLDER_VARIABLE)
    if not folder:
        return None
    with open(os.path.join(folder, _ARGUMENTS_FILE), encoding="utf-8") as stream:
        return argparse.Namespace(**json.load(stream))


def run_as_worker(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run_command(run, args)` in a process started by `run_in_processes`: records the exit code for the parent and
    returns 0, so that the launcher does not report crane-hf's codes as a failure. An exception crane-hf does not
    handle propagates (nothing recorded: the parent exits 1). The messages of processes other than the main one
    (which would repeat its error or interruption line) are recorded for the parent instead of printed."""
    from .cli_support import run_command

    rank = os.environ.get("RANK", "0")
    folder = os.environ[WORKER_FOLDER_VARIABLE]
    end_with_parent(os.getppid())  # killed with the launcher, which is killed with the command that started it
    written = os.path.join(folder, f"pid-{rank}.writing")
    with open(written, "w", encoding="utf-8") as stream:  # where the parent passes signals on
        stream.write(str(os.getpid()))
    os.replace(written, os.path.join(folder, f"pid-{rank}"))  # never read half-written
    if rank == "0":
        code = run_command(run, args)
    else:
        captured = io.StringIO()
        with contextlib.redirect_stderr(captured):
            code = run_command(run, args)
        with open(os.path.join(folder, f"stderr-{rank}"), "w", encoding="utf-8") as stream:
            stream.write(captured.getvalue())
    with open(os.path.join(folder, f"exit-{rank}"), "w", encoding="utf-8") as stream:
        stream.write(str(code))
    return 0
