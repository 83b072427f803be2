"""Run checkpoints on one rank: which directories count, pruning, RNG and pipeline state."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import random_train_batch, tiny_run_config

from megatron_dapo.ckpt.run_checkpoint import (
    complete_checkpoints,
    latest_checkpoint,
    load_run_checkpoint,
    save_run_checkpoint,
    step_directory,
)
from megatron_dapo.mcore.parallel import DistributedEnv, destroy_parallel, initialize_parallel
from megatron_dapo.mcore.policy_step import PolicyTrainer
from pipeline.sglang_server import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trainer():
    config = tiny_run_config()
    env = DistributedEnv(0, 1, 0, "127.0.0.1", free_port())
    initialize_parallel(config.parallelism, env, seed=7)
    trainer = PolicyTrainer(config)
    trainer.train(random_train_batch(0, (9, 7, 12, 5, 6, 11, 8, 10)))  # optimizer state exists
    yield trainer
    destroy_parallel()


def _draws() -> tuple[float, float, float]:
    return torch.rand(1).item(), random.random(), float(np.random.rand())


def test_save_prune_and_resume(trainer: PolicyTrainer, tmp_path: Path) -> None:
    pipeline_state = {"prompts": {"position": 17}, "carried": ["group"]}
    for step in (1, 2, 3):
        save_run_checkpoint(trainer, tmp_path, step, {**pipeline_state, "step": step}, 2)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [2, 3]  # keep_last=2
    expected_draws = _draws()  # what follows the state saved at step 3
    step_directory(tmp_path, 4).mkdir()  # a save interrupted before its `complete` marker
    assert latest_checkpoint(tmp_path) == step_directory(tmp_path, 3)

    weight = next(trainer.chunks[0].parameters())
    saved_weight = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    trainer.optimizer_steps = 99
    point = load_run_checkpoint(trainer, latest_checkpoint(tmp_path))

    assert point.step == 3
    assert point.pipeline_state == {**pipeline_state, "step": 3}
    assert torch.equal(weight, saved_weight)
    assert trainer.optimizer_steps == 1
    assert _draws() == expected_draws
    # A new save of step 4 replaces the incomplete directory.
    save_run_checkpoint(trainer, tmp_path, 4, pipeline_state, 2)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [3, 4]


def test_no_checkpoint_in_a_missing_or_empty_directory(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None


def test_a_checkpoint_of_another_layout_is_refused_by_name(
    trainer: PolicyTrainer, tmp_path: Path
) -> None:
    directory = save_run_checkpoint(trainer, tmp_path, 1, None, 1)
    state = torch.load(directory / "pipeline.pt", weights_only=False)
    assert state["layout"]["tensor"] == trainer.config.parallelism.tensor == 1
    state["layout"] = {**state["layout"], "tensor": 2, "expert": 4}  # what a TP2 EP4 run saves
    torch.save(state, directory / "pipeline.pt")
    with pytest.raises(ValueError, match=r"tensor 2 \(this run: 1\), expert 4 \(this run: 1\)"):
        load_run_checkpoint(trainer, directory)
