"""The trainer starts from its checkpoint in every parallel layout: its recomputed pi_old of a
batch equals the checkpoint's transformers log-probs (the fleet's), through load, forward-only
pass and mismatch reduction (`pi_old_worker.py`, one 2-rank torchrun launch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_worker import VOCAB
from launch_helpers import run_torchrun
from pi_old_worker import LENGTHS, SCENARIOS
from training_helpers import random_train_batch

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.multirank
def test_recomputed_pi_old_equals_the_checkpoint_in_every_layout(tmp_path: Path) -> None:
    out = tmp_path / "mismatch.json"
    run_torchrun(HERE / "pi_old_worker.py", str(tmp_path), str(out))
    results = json.loads(out.read_text())
    assert set(results) == set(SCENARIOS)
    control = results.pop("control_other_weights")
    assert control["max_abs_diff"] > 0.1 and control["kl"] > 1e-3, control
    loss_tokens = int(random_train_batch(0, LENGTHS, vocab=VOCAB).loss_mask.sum())
    for name, result in results.items():
        assert result["tokens"] == loss_tokens, (name, result)  # every rank's, counted once
        assert result["max_abs_diff"] < 1e-4 and result["kl"] < 1e-9, (name, result)
