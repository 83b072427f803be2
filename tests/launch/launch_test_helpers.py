"""Shared pieces of the launcher tests: paths, a clean environment, the workers' outputs."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from pipeline.sglang_server import cpu_server_args, free_port

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo-cpu.yaml"
WORKER = Path(__file__).resolve().parent / "allreduce_worker.py"
SUBMIT = REPO / "launch" / "slurm" / "submit.sh"
SBATCH = REPO / "launch" / "slurm" / "dapo.sbatch"
CPU_SGLANG_ARGS = shlex.join(cpu_server_args(0))
"""DAPO_SGLANG_ARGS for a real SGLang server on this machine's CPU."""


def clean_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) without DAPO_* settings or an outer SLURM
    job's variables (SLURM_CONF, which names the cluster, is kept), with DAPO_PYTHON = this
    Python, plus `extra`."""
    source = os.environ if base is None else base
    env = {
        k: v
        for k, v in source.items()
        if not k.startswith("DAPO_") and (k == "SLURM_CONF" or not k.startswith("SLURM_"))
    }
    env.update(DAPO_PYTHON=sys.executable, **extra)
    return env


def launch_env(base: dict[str, str], out_dir: Path, log_dir: Path, **extra: str) -> dict[str, str]:
    """`clean_env(base)` set up to launch WORKER, which writes its records to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return clean_env(
        base,
        DAPO_MASTER_PORT=str(free_port()),
        DAPO_LOG_DIR=str(log_dir),
        DAPO_TRAIN_CMD=f"{WORKER} {out_dir}",
        OMP_NUM_THREADS="1",
        **extra,
    )


def read_ranks(out_dir: Path) -> list[dict]:
    """The per-rank records the worker wrote, ordered by rank."""
    records = [json.loads(p.read_text()) for p in out_dir.glob("rank-*.json")]
    return sorted(records, key=lambda r: r["rank"])


def expected_sum(world_size: int) -> float:
    """The all_reduce result: rank r contributes r + 1."""
    return float(sum(rank + 1 for rank in range(world_size)))
