"""A real pretrained model end to end: `megatron-dapo train configs/smollm2-135m-cpu.yaml` on
SmolLM2-135M-Instruct (its chat template, math prompts, math-verify reward, an embedded SGLang
server, 2 ranks), two steps.

The invariant: the trainer recomputes pi_old of the fleet's samples before each step's first
update, and the fleet computes in the policy's dtype (fp32), so pi_old equals pi_rollout up to
kernel rounding in step 1 (the trainer starts from the checkpoint the fleet serves) and in
step 2 (the fleet serves exactly the weights the trainer just updated). Measured: KL ~2e-11,
max |delta log p| ~7e-5 nats; a fleet in fp16 gave 2e-5, a stale or random trainer far more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megatron_dapo.hf.convert import hf_state_dict
from tests.e2e.train_runs import failure_excerpt

REPO = Path(__file__).resolve().parents[2]
STEPS = 2


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.server
def test_smollm2_trains_on_its_own_samples(smollm2_checkpoint: Path, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "megatron_dapo.cli",
        "train",
        str(REPO / "configs" / "smollm2-135m-cpu.yaml"),
        f"model.hf_checkpoint={smollm2_checkpoint}",
        f"training.steps={STEPS}",
        "training.prompts_per_step=2",
        "training.mini_batch_size=16",
        "optimizer.lr=1.0e-4",  # a visible update, so that step 2 tells a stale fleet apart
        f"checkpoint.dir={tmp_path / 'checkpoints'}",
        "metrics.prometheus=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, failure_excerpt(result.stdout + result.stderr)

    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(STEPS))
    for step in steps:
        assert step["rollout_mismatch_kl"] < 1e-6, step
        assert step["rollout_logprob_diff_max"] < 1e-2, step
        assert step["phase_seconds"]["old_log_probs"] > 0
    first = steps[0]
    assert (first["clip_fraction_low"], first["clip_fraction_high"]) == (0.0, 0.0)
    assert "mismatch KL" in result.stdout
    # the update the fleet received in between was real
    initial = load_file(smollm2_checkpoint / "model.safetensors")
    updated = hf_state_dict(tmp_path / "weights" / f"v{STEPS}")
    moved = max((updated[name] - tensor).abs().max().item() for name, tensor in initial.items())
    assert moved > 1e-5
