"""Start-up time of `crane-hf --help` and each command's `--help` (a new process each time), and whether torch,
transformers, datasets or accelerate were imported on the way.

    python benchmarks/cli_startup.py [--repeats 5]

Prints a table: best and median wall time over the repeats, and the heavy packages each command imported.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from crane_hf.commands.cli import COMMANDS  # every command of the dispatcher (importing it is light)

HEAVY = ("torch", "transformers", "datasets", "accelerate")


def heavy_imports(command: list[str]) -> list[str]:
    """The heavy packages that `command` imports (from `python -X importtime`'s report)."""
    report = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}, check=True
    ).stderr
    names = {line.rsplit("|", 1)[1].strip().partition(".")[0] for line in report.splitlines() if "|" in line}
    return sorted(names & set(HEAVY))


def wall_times(command: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (default: 5)")
    args = parser.parse_args()
    script = shutil.which("crane-hf")
    if script is None:
        print("error: the crane-hf console script is not installed (pip install -e .)", file=sys.stderr)
        return 2
    commands = [[script, "--help"], *([script, name, "--help"] for name in COMMANDS)]
    commands += [[sys.executable, "-m", "crane_hf.train", "--help"]]
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load} (1, 5, 15 min)")
    print("| command | best (s) | median (s) | heavy packages imported |")
    print("|---|---|---|---|")
    for command in commands:
        times = wall_times(command, args.repeats)
        names = {script: "crane-hf", sys.executable: "python"}
        shown = " ".join(names.get(part, part) for part in command)
        heavy = ", ".join(heavy_imports(command)) or "none"
        print(f"| `{shown}` | {min(times):.2f} | {statistics.median(times):.2f} | {heavy} |")
    print("load average after: " + ", ".join(f"{value:.1f}" for value in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
