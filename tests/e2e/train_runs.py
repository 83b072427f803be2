"""`megatron-dapo train` as a subprocess of an end-to-end test: the command against a test's
SGLang server (cluster mode), started in its own process group, awaited, and its step log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.group_reaper import stat_fields

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo-cpu.yaml"


def train_command(
    run_dir: Path, initial_model: Path, server_url: str, *overrides: str
) -> list[str]:
    """The demo on 2 ranks, generating with the server at `server_url`, run dir `run_dir`."""
    return [
        sys.executable,
        "-m",
        "megatron_dapo.cli",
        "train",
        str(DEMO),
        f"checkpoint.dir={run_dir / 'checkpoints'}",
        f"model.hf_checkpoint={initial_model}",
        "rollout.mode=cluster",
        f'rollout.server_urls=["{server_url}"]',
        "metrics.prometheus=false",
        *overrides,
    ]


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start `command` in a new session (its process group is killable as one), output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with log.open("ab") as out:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(process: subprocess.Popen[bytes], log: Path, timeout_s: float = 600.0) -> None:
    """Wait for `process` (its group is SIGKILLed after `timeout_s`); assert it succeeded."""
    try:
        process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, failure_excerpt(log.read_text())


def failure_excerpt(output: str, lines: int = 40) -> str:
    """What a failed run printed that says why: rank 0's last lines (a rank that crashes first
    makes the others fail with connection errors, which fill the tail), then the tail."""
    rank0 = [line for line in output.splitlines() if line.startswith("[rank0]")]
    return "\n".join(rank0[-lines:]) + "\n...\n" + output[-3000:]


def step_records(run_dir: Path) -> list[dict]:
    """The run's `metrics.jsonl`, one dict per logged step."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def processes_mentioning(text: str) -> list[int]:
    """PIDs of the processes whose command line contains `text`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def _children_by_parent() -> dict[int, list[int]]:
    """Every live process's PID under its parent's PID."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        child = int(stat.parent.name)
        if (found := stat_fields(child)) is not None and found[0] != "Z":
            children.setdefault(found[1], []).append(child)
    return children


def children(pid: int) -> set[int]:
    """PIDs of `pid`'s live children."""
    return set(_children_by_parent().get(pid, []))


def descendants(pid: int) -> set[int]:
    """PIDs of the live processes descended from `pid` (children, their children, ...)."""
    children = _children_by_parent()
    found, frontier = set(), [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.add(child)
            frontier.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` that are still running (zombies count as ended)."""
    return {pid for pid in pids if (found := stat_fields(pid)) is not None and found[0] != "Z"}


def survivors(pids: set[int], timeout_s: float) -> set[int]:
    """Those of `pids` still running after waiting up to `timeout_s` for all of them to end."""
    deadline = time.monotonic() + timeout_s
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


def command_line(pid: int) -> str:
    """`pid`'s command line, shortened ("" once it has ended)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except OSError:
        return ""
