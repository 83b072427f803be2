"""`exit_with_parent`: a child started with it dies when its parent is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.train_runs import REPO, survivors

PARENT = """
import subprocess, sys, time
from pipeline.parent_death import exit_with_parent
preexec = exit_with_parent if sys.argv[1] == "yes" else None
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=preexec)
print(child.pid, flush=True)
time.sleep(60)
"""


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
    return child, bool(survivors({child}, timeout_s=5.0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_child_dies_with_its_sigkilled_parent() -> None:
    _, survived = _orphan_after_parent_killed(with_parent_death=True)
    assert not survived


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_without_it_the_child_outlives_its_parent() -> None:
    child, survived = _orphan_after_parent_killed(with_parent_death=False)
    try:
        assert survived  # the control: the behaviour above is the call's doing
    finally:
        os.kill(child, signal.SIGKILL)
