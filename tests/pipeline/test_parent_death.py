"""`exit_with_parent`: a child started with it dies when its parent is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PARENT = """
import subprocess, sys, time
from pipeline.parent_death import exit_with_parent
preexec = exit_with_parent if sys.argv[1] == "yes" else None
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=preexec)
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state


def _orphan_after_parent_killed(with_parent_death: bool) -> tuple[int, bool]:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, "yes" if with_parent_death else "no"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5.0
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    return child, _alive(child)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_child_dies_with_its_sigkilled_parent() -> None:
    _, alive = _orphan_after_parent_killed(with_parent_death=True)
    assert not alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_without_it_the_child_outlives_its_parent() -> None:
    child, alive = _orphan_after_parent_killed(with_parent_death=False)
    try:
        assert alive  # the control: the behaviour above is the call's doing
    finally:
        os.kill(child, signal.SIGKILL)
