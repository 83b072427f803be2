"""`pipeline.group_reaper` under `ManagedProcess`: a managed command's own children (which, like
SGLang's scheduler and detokenizer while they start, have not asked to die with their parent)
end with it, whether its owner is SIGKILLed or the command exits; the command's exit code comes
through. One test kills the owner of a real SGLang server while it starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.sglang_server import (
    ManagedProcess,
    cpu_server_args,
    free_port,
    sglang_server_argv,
)
from tests.e2e.train_runs import REPO, command_line, descendants, survivors

SPAWNER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(sys.argv[1] + ".tmp", "w") as out:
    out.write(f"{os.getpid()} {child.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(float(sys.argv[2]))
sys.exit(3)
"""
"""A command that starts a child with no parent-death signal, writes `command_pid child_pid` to
argv[1], and exits with code 3 after argv[2] seconds."""

OWNER = """
import json, subprocess, sys, time
from pipeline.parent_death import exit_with_parent
from pipeline.sglang_server import ManagedProcess
command = json.loads(sys.argv[1])
if sys.argv[2] == "managed":
    ManagedProcess("command", command, sys.argv[3], None).start()
else:  # the command started directly, dying with its parent
    subprocess.Popen(command, start_new_session=True, preexec_fn=exit_with_parent)
time.sleep(600)
"""
"""Starts the command (JSON argv[1]) under `ManagedProcess` (argv[2] `managed`; log argv[3])
or directly, then sleeps."""


def _start_owner(command: list[str], how: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", OWNER, json.dumps(command), how, str(log)],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )


def _wait_for_pids(pid_file: Path, timeout_s: float = 30.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the command never wrote its pids"
        time.sleep(0.05)
    command, child = pid_file.read_text().split()
    return int(command), int(child)


def _survivors_of_killed_owner(tmp_path: Path, how: str) -> set[int]:
    pid_file = tmp_path / "pids"
    spawner = [sys.executable, "-c", SPAWNER, str(pid_file), "60"]
    owner = _start_owner(spawner, how, tmp_path / "spawner.log")
    try:
        started = set(_wait_for_pids(pid_file))
    finally:
        owner.kill()
        owner.wait()
    return survivors(started, timeout_s=5.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_a_killed_owner_takes_the_commands_children_with_it(tmp_path: Path) -> None:
    assert _survivors_of_killed_owner(tmp_path, "managed") == set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_without_the_reaper_the_commands_child_outlives_the_owner(tmp_path: Path) -> None:
    left = _survivors_of_killed_owner(tmp_path, "direct")
    try:  # the control: the command dies with its owner, its child does not
        assert len(left) == 1
    finally:
        for pid in left:
            os.kill(pid, signal.SIGKILL)


def test_a_command_that_exits_takes_its_children_and_keeps_its_code(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    process = ManagedProcess(
        "spawner", [sys.executable, "-c", SPAWNER, str(pid_file), "0.5"], tmp_path / "log", None
    )
    process.start()
    try:
        command, child = _wait_for_pids(pid_file)
        with pytest.raises(RuntimeError, match="exited with code 3"):
            process.wait_until(lambda: False, 30.0, "never")
        assert survivors({command, child}, timeout_s=5.0) == set()
    finally:
        process.stop(grace_s=1.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_an_owner_killed_while_its_sglang_server_starts_leaves_no_process(
    tiny_models, tmp_path: Path
) -> None:
    """SGLang's scheduler and detokenizer outlive a server killed while they start (measured
    without the reaper: 4 of 5 such kills left them and a resource tracker running)."""
    server = sglang_server_argv(tiny_models.base, free_port(), extra_args=cpu_server_args(1024))
    owner = _start_owner(server, "managed", tmp_path / "server.log")
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 120.0
        while len(seen) < 4:  # reaper, server, and two of its children
            assert time.monotonic() < deadline, f"the server never started its children: {seen}"
            seen |= descendants(owner.pid)
            time.sleep(0.02)
    finally:
        owner.kill()
        owner.wait()
    left = survivors(seen, timeout_s=10.0)
    try:
        assert not left, [command_line(pid) for pid in left]
    finally:
        for pid in left:
            os.kill(pid, signal.SIGKILL)
