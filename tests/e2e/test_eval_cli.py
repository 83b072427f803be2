"""`megatron-dapo eval CONFIG CHECKPOINT`: the demo's held-out set on the demo's initial
checkpoint through a real embedded SGLang server (no torchrun, no Megatron), and its numbers
against an independent scoring of the samples it wrote."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.rewards.exact_match import exact_match_reward
from tests.e2e.train_runs import DEMO, REPO, failure_excerpt, processes_mentioning

N_SAMPLES = 8
KS = (1, 2, 8)


def _independent_pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k as the share of k-subsets of the n samples holding a correct one."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.slow
@pytest.mark.server
def test_eval_command_scores_a_checkpoint(tmp_path: Path, initial_model: Path) -> None:
    output = tmp_path / "eval.json"
    command = [
        sys.executable,
        "-m",
        "megatron_dapo.cli",
        "eval",
        str(DEMO),
        str(initial_model),
        f"eval.n_samples={N_SAMPLES}",
        f"eval.ks=[{', '.join(map(str, KS))}]",
        "--output",
        str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, failure_excerpt(result.stdout + result.stderr)
    assert "torch.distributed.run" not in result.stdout + result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("dataset"))
    assert header.split() == [
        "dataset",
        "prompts",
        "n",
        *(f"{m}@{k}" for k in KS for m in ("mean", "pass")),
        "len",
        "trunc",
    ]

    report = json.loads(output.read_text())
    numbers = report["datasets"]["arithmetic-seed2"]
    samples = report["samples"]["arithmetic-seed2"]
    assert len(samples) == numbers["num_prompts"] == 32
    assert all(len(prompt) == N_SAMPLES for prompt in samples)
    # independent scoring: the demo's reward (exact match, truncated responses scored as is)
    correct = [
        sum(exact_match_reward(s["response"], s["ground_truth"]).acc for s in prompt)
        for prompt in samples
    ]
    assert correct == [sum(s["correct"] for s in prompt) for prompt in samples]
    for k in KS:
        expected_pass = sum(_independent_pass_at_k(N_SAMPLES, c, k) for c in correct) / 32
        assert numbers[f"pass@{k}"] == pytest.approx(expected_pass)
        assert numbers[f"mean@{k}"] == pytest.approx(sum(correct) / (32 * N_SAMPLES))
    flat = [s for prompt in samples for s in prompt]
    assert numbers["response_length_mean"] == pytest.approx(
        sum(s["response_length"] for s in flat) / len(flat)
    )
    truncated = sum(s["finish_reason"] == "length" for s in flat) / len(flat)
    assert numbers["truncated_ratio"] == pytest.approx(truncated)
    assert processes_mentioning(str(tmp_path)) == [], "servers outlived the command"
