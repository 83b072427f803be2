"""Processes that do not outlive their parent (Linux `prctl(PR_SET_PDEATHSIG)`).

torchrun starts every rank in a session of its own, and the pipeline starts every SGLang server
in one too, so killing a launcher's process group (SIGKILL, an OOM kill) would leave ranks and
servers running as orphans. A process that calls `exit_with_parent` gets SIGKILL when the
thread that started it exits instead; through the chain launcher -> torchrun -> ranks ->
servers, killing the launcher ends the whole run (a server's own children, which ask for this
only once they have started, go with its process group: `pipeline.group_reaper`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def exit_with_parent(signum: int = signal.SIGKILL) -> None:
    """Have this process get `signum` (default SIGKILL) when its parent exits; a no-op outside
    Linux.

    Usable as a `subprocess.Popen(preexec_fn=...)` (async-signal-safe: one libc call; the
    setting survives exec). If the parent is already gone (adopted by init), the process gets
    `signum` at once.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    if _LIBC.prctl(_PR_SET_PDEATHSIG, signum) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent == 1:
        os.kill(os.getpid(), signum)


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
