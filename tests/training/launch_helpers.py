"""Launching multi-rank test workers with torchrun (gloo, one thread per rank)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 600) -> None:
    """Run `script args` on `nproc` local ranks; raises CalledProcessError if any rank fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]
    subprocess.run([*cmd, str(script), *args], env=env, check=True, timeout=timeout)
