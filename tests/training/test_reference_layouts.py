"""The reference policy is the checkpoint the run starts from in sharded layouts (TP2 with
sequence parallelism, PP2, PP2 x VPP2, EP2): after two optimizer steps its log-probs still
equal the checkpoint's transformers log-probs, while the moved policy's do not
(`reference_worker.py`, one 2-rank torchrun launch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_worker import VOCAB
from launch_helpers import run_torchrun
from pi_old_worker import LENGTHS
from reference_worker import SCENARIOS
from training_helpers import random_train_batch

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.multirank
def test_reference_log_probs_equal_the_checkpoint_in_sharded_layouts(tmp_path: Path) -> None:
    out = tmp_path / "reference.json"
    run_torchrun(HERE / "reference_worker.py", str(tmp_path), str(out))
    results = json.loads(out.read_text())
    print(json.dumps(results, indent=1))
    assert set(results) == set(SCENARIOS)
    loss_tokens = int(random_train_batch(0, LENGTHS, vocab=VOCAB).loss_mask.sum())
    for name, result in results.items():
        assert result["tokens"] == loss_tokens, (name, result)  # every rank's, counted once
        assert result["ref_max_abs_diff"] < 1e-4, (name, result)
        assert result["control_old_max_abs_diff"] > 1e-2, (name, result)  # the policy moved
        assert result["kl_step1"] == 0.0 and result["kl_step2"] > 1e-4, (name, result)
