"""`megatron-dapo train` end to end: 2 ranks (expert parallel), a real local SGLang server,
the dynamic-sampling queue, DAPO policy steps, weight sync from disk and a final checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
STEPS = 2


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.server
def test_two_rank_training_run_with_a_real_fleet(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "megatron_dapo.cli",
        "train",
        str(REPO / "configs" / "demo-cpu.yaml"),
        f"training.steps={STEPS}",
        "training.prompts_per_step=4",
        "rollout.n_samples_per_prompt=4",
        "training.mini_batch_size=8",
        "metrics.port=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    summaries = re.findall(
        r"step (\d+)/2 \| reward ([-+.\d]+) acc ([.\d]+) \| entropy ([.\d]+)", output
    )
    assert [int(s[0]) for s in summaries] == [1, 2], output[-4000:]
    assert all(0.0 < float(s[2]) < 1.0 for s in summaries)  # dynamic sampling: mixed groups only

    run_dir = tmp_path / "runs" / "demo-cpu"
    initial = load_file(run_dir / "initial-model" / "model.safetensors")
    trained = load_file(run_dir / "weights" / f"v{STEPS}" / "model.safetensors")
    assert initial.keys() == trained.keys()
    assert any(not initial[k].equal(trained[k]) for k in initial), "the policy did not change"
    assert (run_dir / "checkpoints" / f"step{STEPS}").is_dir()
    assert _processes_mentioning(str(tmp_path)) == [], "servers outlived the run"
