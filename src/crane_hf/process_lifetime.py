"""A child process that ends with its parent: no launcher, rank or DataLoader worker outlives a killed command.

`end_with_parent(parent)` asks Linux (prctl PR_SET_PDEATHSIG) to send the calling process SIGKILL when its parent
dies, so that a run killed with SIGKILL (a cron timeout, the OOM killer, `kill -9` of the PID a scheduler knows)
leaves nothing behind scoring on, holding files, memory and devices, or publishing the output of a run that was
killed. Used by `commands/process_launch.py` (the `--num-processes` launcher and the processes of
`accelerate launch`) and `prediction/image_stream.py` (DataLoader workers). Elsewhere than Linux nothing changes.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def end_with_parent(parent: int, prctl: Callable[..., int] | None = None) -> None:
    """Get SIGKILL when the parent, process id `parent`, dies; if it died before this call, end now (exit 1), as
    the signal would have. `prctl` is the C function when already looked up (`ends_with_parent`). A no-op
    elsewhere than Linux."""
    prctl = prctl or _prctl()
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def ends_with_parent() -> Callable[[], None]:
    """A `subprocess.Popen` `preexec_fn` that makes the child end with this process (`end_with_parent`). The C
    function is looked up here, in the parent, so that the child runs no dynamic loading between fork and exec."""
    parent, prctl = os.getpid(), _prctl()
    return lambda: end_with_parent(parent, prctl)


__all__ = ["end_with_parent", "ends_with_parent"]
