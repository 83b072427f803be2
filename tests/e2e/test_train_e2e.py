"""`megatron-dapo train` end to end: 2 ranks (expert parallel), a real local SGLang server,
the dynamic-sampling queue generating the next step's groups while the trainer trains
(`rollout.max_staleness: 1`), DAPO policy steps, weight sync from disk, a final checkpoint, and
the step metrics read back through a real Prometheus server scraping the run, and the demo's
held-out set evaluated by the fleet every 2 steps and after the last (`eval`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megatron_dapo.hf.convert import hf_state_dict
from pipeline.sglang_server import free_port
from tests.e2e.prometheus_server import PrometheusServer
from tests.e2e.train_runs import failure_excerpt, processes_mentioning

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
EVAL_INTERVAL = 2
"""Evaluations after steps 2 and 3 (the last)."""
MAX_PROMPT_LENGTH = 38
"""Tokens: about a quarter of the demo's prompts are longer (35-64 tokens with the template)."""


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.server
def test_two_rank_training_run_with_a_real_fleet(tmp_path: Path) -> None:
    metrics_port = free_port()
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
        f"metrics.port={metrics_port}",
        "metrics.run_name=e2e",
        f"data.max_prompt_length={MAX_PROMPT_LENGTH}",
        "rollout.max_staleness=1",
        f"eval.interval={EVAL_INTERVAL}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with PrometheusServer(tmp_path / "prometheus", [f"127.0.0.1:{metrics_port}"]) as prometheus:
        result = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        entropy = prometheus.wait_for('last_over_time(dapo_policy_entropy_nats{run="e2e"}[10m])')
        throughput = prometheus.wait_for(
            'last_over_time(dapo_tokens_per_second{run="e2e", phase="train"}[10m])'
        )
        kept = prometheus.wait_for('last_over_time(dapo_queue_kept_groups_total{run="e2e"}[10m])')
        skipped = prometheus.wait_for(
            'last_over_time(dapo_queue_skipped_prompts_total{run="e2e"}[10m])'
        )
        staleness = prometheus.wait_for('last_over_time(dapo_queue_staleness_sum{run="e2e"}[10m])')
        trainer_idle = prometheus.wait_for(
            'last_over_time(dapo_idle_ratio{run="e2e", side="trainer"}[10m])'
        )
        pass_at_4 = prometheus.wait_for(
            'last_over_time(dapo_eval_score_ratio{run="e2e", metric="pass@4"}[10m])'
        )
    output = result.stdout + result.stderr
    assert result.returncode == 0, failure_excerpt(output)
    run_dir = tmp_path / "runs" / "demo-cpu"

    summaries = re.findall(
        rf"step (\d+)/{STEPS} \| reward ([-+.\d]+) acc ([.\d]+) \| entropy ([.\d]+)", output
    )
    assert [int(s[0]) for s in summaries] == list(range(1, STEPS + 1)), output[-4000:]
    assert all(0.0 < float(s[2]) < 1.0 for s in summaries)  # kept groups hold a correct answer

    # Prometheus scraped the trainer: the entropy it holds is one the run printed.
    printed_entropies = {float(s[3]) for s in summaries}
    assert round(float(entropy[0]["value"][1]), 3) in printed_entropies
    assert float(throughput[0]["value"][1]) > 0
    # The data plane's series carry the run label too: every step kept 4 groups (or more).
    assert float(kept[0]["value"][1]) >= 4 * STEPS
    # Prompts longer than data.max_prompt_length were skipped and counted, not a dead step.
    assert float(skipped[0]["value"][1]) > 0 and "over-long prompt(s) skipped" in output
    # Steps 2 and 3 trained on groups generated during the step before: one version behind.
    assert "generation overlaps training (max_staleness 1)" in output
    assert float(staleness[0]["value"][1]) >= 2 * 4 * 4
    assert 0.0 <= float(trainer_idle[0]["value"][1]) <= 1.0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        phases = record["phase_seconds"]
        assert record["trainer_idle_seconds"] == pytest.approx(
            phases["generate"] + phases["prefetch_wait"] + phases.get("eval", 0.0)
        )
        assert 0.0 <= record["fleet_idle_ratio"] <= 1.0
    _check_evaluations(records, output)
    assert pass_at_4[0]["metric"]["dataset"] == "arithmetic-seed2"
    assert (
        float(pass_at_4[0]["value"][1])
        == records[-1]["eval"]["datasets"]["arithmetic-seed2"]["pass@4"]
    )
    assert len(re.findall(r"idle trainer \d+% fleet \d+%", output)) == STEPS
    # The run's summary first, and no library notices anywhere (they would hide real warnings)
    assert result.stdout.startswith("policy: 2 layers x 64"), result.stdout[:500]
    notices = [line for line in output.splitlines() if re.search(r"Warning|CUDA_HOME", line)]
    assert notices == []

    initial = load_file(run_dir / "initial-model" / "model.safetensors")
    trained = hf_state_dict(run_dir / "weights" / f"v{STEPS}")
    assert initial.keys() == trained.keys()
    assert any(not initial[k].equal(trained[k]) for k in initial), "the policy did not change"
    assert (run_dir / "checkpoints" / f"step{STEPS}").is_dir()
    assert processes_mentioning(str(tmp_path)) == [], "servers outlived the run"


def _check_evaluations(records: list[dict], output: str) -> None:
    """The held-out set was scored after steps 2 and 3 on the policy just synced: mean@k and
    pass@k in [0, 1], pass@1 == mean@1, pass@k >= mean@k, pass@k nondecreasing in k; one line
    per evaluation."""
    evaluated = [(r["step"], r["eval"]) for r in records if "eval" in r]
    assert [step for step, _ in evaluated] == [1, 2]  # 0-based: after steps 2 and 3
    for step, evaluation in evaluated:
        assert evaluation["policy_version"] == step + 1
        assert records[step]["phase_seconds"]["eval"] > 0
        held_out = evaluation["datasets"]["arithmetic-seed2"]
        assert (held_out["num_prompts"], held_out["n_samples"]) == (32, 4)
        assert held_out["skipped_prompts"] > 0  # data.max_prompt_length=38 applies to it too
        assert held_out["response_length_mean"] == 1.0
        for k in (1, 4):
            assert 0.0 <= held_out[f"mean@{k}"] <= held_out[f"pass@{k}"] <= 1.0
        assert held_out["pass@1"] == pytest.approx(held_out["mean@1"])
        assert held_out["mean@4"] == pytest.approx(held_out["mean@1"])
        assert held_out["pass@4"] >= held_out["pass@1"]
    lines = re.findall(r"eval v(\d) \| arithmetic-seed2: mean@1 [.\d]+ pass@1 [.\d]+", output)
    assert lines == ["2", "3"], output[-3000:]
