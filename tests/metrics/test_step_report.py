"""summarize_step: one RL step's metrics from the batch, the queue stats and optimizer steps."""

from __future__ import annotations

import pytest
import torch

from megatron_dapo.mcore.policy_step import OptimizerStepMetrics
from megatron_dapo.report.step_report import summarize_step
from pipeline.dynamic_sampling import StepStats
from pipeline.train_batch import TrainBatch


def _optimizer_step(tokens: int, entropy: float, clip_high: float, loss: float):
    return OptimizerStepMetrics(
        loss=loss,
        clip_fraction_low=0.0,
        clip_fraction_high=clip_high,
        dual_clip_fraction=0.0,
        entropy=entropy,
        approx_kl=0.0,
        grad_norm=0.5,
        lr=1e-3,
        num_loss_tokens=tokens,
        num_sequences=2,
        num_microbatches=1,
        padding_fraction=0.0,
        update_successful=True,
        moe_aux_loss=0.01,
        expert_load=[[3, 1], [2, 2]],
    )


def _batch() -> TrainBatch:
    # prompt 2 + response 3 (stop), prompt 1 + response 1 (truncated)
    return TrainBatch(
        tokens=torch.arange(7),
        sample_offsets=torch.tensor([0, 5, 7]),
        prompt_lengths=torch.tensor([2, 1]),
        old_log_probs=torch.zeros(7),
        loss_mask=torch.tensor([False, False, True, True, True, False, True]),
        advantages=torch.tensor([1.0, -1.0]),
        rewards=torch.tensor([1.0, -0.5]),
        group_ids=torch.tensor([0, 0]),
        weight_versions=torch.tensor([0, 0]),
        metadata=({"finish_reason": "stop"}, {"finish_reason": "length"}),
    )


def test_summary_weights_token_means_and_reads_the_queue() -> None:
    stats = StepStats(generated_samples=8, correct_samples=2, generated_tokens=40)
    stats.generation_seconds, stats.reward_seconds = 4.0, 1.5
    steps = [_optimizer_step(30, 2.0, 0.1, 0.4), _optimizer_step(10, 1.0, 0.5, 0.2)]
    m = summarize_step(5, _batch(), stats, steps, {"generate": 4.0, "train": 2.0})
    assert m.step == 5
    assert m.entropy == pytest.approx((30 * 2.0 + 10 * 1.0) / 40)
    assert m.clip_fraction_high == pytest.approx((30 * 0.1 + 10 * 0.5) / 40)
    assert m.loss == pytest.approx(0.3)
    assert m.accuracy == pytest.approx(2 / 8)  # all generated responses, not only kept ones
    assert (m.response_length_mean, m.response_length_max, m.response_length_min) == (2, 3, 1)
    assert m.truncated_ratio == 0.5 and m.reward_mean == pytest.approx(0.25)
    assert m.generation_tokens_per_second == pytest.approx(10.0)
    assert m.training_tokens_per_second == pytest.approx(7 / 2.0)
    assert m.moe_expert_load == pytest.approx((10 / 16, 6 / 16))  # summed over layers and steps
    assert m.phase_seconds == {"generate": 4.0, "train": 2.0, "reward": 1.5}
    assert m.step_seconds == 6.0  # reward calls overlap generation
