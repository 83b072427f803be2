"""summarize_step: one RL step's metrics from the batch, the queue stats and optimizer steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from megatron_dapo.algo.rollout_correction import RolloutMismatch
from megatron_dapo.config.loading import load_config
from megatron_dapo.mcore.policy_step import OptimizerStepMetrics, TrainResult
from megatron_dapo.report.prometheus import TrainerMetricsExporter
from megatron_dapo.report.step_report import StepReporter, summarize_step
from pipeline.dynamic_sampling import StepStats
from pipeline.train_batch import TrainBatch
from tests.metrics.step_metrics_example import example_step_metrics

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo-cpu.yaml"


def _optimizer_step(
    tokens: int,
    entropy: float,
    clip_high: float,
    loss: float,
    dual: float = 0.0,
    reference_kl: float | None = None,
) -> OptimizerStepMetrics:
    return OptimizerStepMetrics(
        loss=loss,
        clip_fraction_low=0.0,
        clip_fraction_high=clip_high,
        dual_clip_fraction=dual,
        entropy=entropy,
        approx_kl=0.0,
        grad_norm=0.5,
        lr=1e-3,
        num_loss_tokens=tokens,
        num_microbatches=2,
        padding_fraction=tokens / 100,
        update_successful=True,
        moe_aux_loss=0.01,
        expert_load=[[3, 1], [2, 2]],
        reference_kl=reference_kl,
    )


def _batch() -> TrainBatch:
    # prompt 2 + response 3 (stop), prompt 1 + response 1 (truncated)
    return TrainBatch(
        tokens=torch.arange(7),
        sample_offsets=torch.tensor([0, 5, 7]),
        prompt_lengths=torch.tensor([2, 1]),
        rollout_log_probs=torch.zeros(7),
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
    steps = [_optimizer_step(30, 2.0, 0.1, 0.4, 0.2), _optimizer_step(10, 1.0, 0.5, 0.2)]
    phases = {"generate": 3.0, "train": 2.0, "prefetch_wait": 1.0}
    m = summarize_step(5, _batch(), stats, TrainResult(steps, None, None), phases, 4.5)
    assert m.step == 5
    assert m.entropy == pytest.approx((30 * 2.0 + 10 * 1.0) / 40)
    assert m.clip_fraction_high == pytest.approx((30 * 0.1 + 10 * 0.5) / 40)
    assert m.dual_clip_fraction == pytest.approx(30 * 0.2 / 40)
    assert m.loss == pytest.approx(0.3)
    assert m.padding_ratio == pytest.approx((0.3 + 0.1) / 2) and m.microbatches == 4
    assert m.accuracy == pytest.approx(2 / 8)  # all generated responses, not only kept ones
    assert (m.response_length_mean, m.response_length_max, m.response_length_min) == (2, 3, 1)
    assert m.truncated_ratio == 0.5 and m.reward_mean == pytest.approx(0.25)
    assert m.generation_tokens_per_second == pytest.approx(10.0)
    assert m.training_tokens_per_second == pytest.approx(7 / 2.0)
    assert m.moe_expert_load == pytest.approx((10 / 16, 6 / 16))  # summed over layers and steps
    assert m.phase_seconds == {**phases, "reward": 1.5}
    assert m.step_seconds == 6.0  # reward calls overlap generation
    # the trainer waited for its batch and for the prefetch; the fleet generated 4.5 s of 6
    assert (m.trainer_idle_seconds, m.trainer_idle_ratio) == (4.0, pytest.approx(4 / 6))
    assert (m.fleet_idle_seconds, m.fleet_idle_ratio) == (1.5, pytest.approx(0.25))
    assert m.rollout_mismatch_kl is None  # pi_old is the rollout's
    assert m.reference_kl is None  # no reference policy


def test_summary_weights_the_reference_kl_and_splits_off_its_forward_pass() -> None:
    # pi_old is the rollout's, the reference pass alone takes 0.25 s of `train`
    steps = [
        _optimizer_step(30, 2.0, 0.1, 0.4, reference_kl=0.02),
        _optimizer_step(10, 1.0, 0.5, 0.2, reference_kl=0.06),
    ]
    trained = TrainResult(steps, None, 0.25)
    m = summarize_step(0, _batch(), StepStats(), trained, {"generate": 4.0, "train": 2.0}, 4.0)
    assert m.reference_kl == pytest.approx((30 * 0.02 + 10 * 0.06) / 40)
    assert m.phase_seconds["old_log_probs"] == 0.25 and m.phase_seconds["train"] == 1.75
    assert m.rollout_mismatch_kl is None


def test_summary_splits_off_the_old_log_prob_pass_and_reports_the_mismatch() -> None:
    # 8 loss tokens: k3 sum 0.004, |diff| sum 0.4, 2 truncated, largest |diff| 0.2
    mismatch = RolloutMismatch.from_reduced(
        torch.tensor([0.004, 0.4, 2.0, 8.0], dtype=torch.float64), torch.tensor(0.2)
    )
    trained = TrainResult([_optimizer_step(30, 2.0, 0.1, 0.4)], mismatch, 0.5)
    m = summarize_step(0, _batch(), StepStats(), trained, {"generate": 4.0, "train": 2.0}, 4.0)
    assert m.phase_seconds == {"generate": 4.0, "train": 1.5, "old_log_probs": 0.5, "reward": 0.0}
    assert m.training_tokens_per_second == pytest.approx(7 / 1.5)
    assert m.rollout_mismatch_kl == pytest.approx(0.0005)
    assert (m.rollout_logprob_diff_mean, m.rollout_logprob_diff_max) == pytest.approx((0.05, 0.2))
    assert m.rollout_truncated_ratio == 0.25


def test_reporter_logs_every_step_and_prints_every_log_every_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(DEMO, ["training.steps=5", "metrics.log_every=3"])
    registry = CollectorRegistry()
    log = tmp_path / "metrics.jsonl"
    reporter = StepReporter(config, TrainerMetricsExporter("r", registry), log)
    for step in range(5):
        reporter.report(example_step_metrics(step), StepStats(kept=16, generated_groups=20))
    reporter.close()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in printed] == ["step 3/5", "step 5/5"]
    assert len(log.read_text().splitlines()) == 5  # the log and Prometheus get every step
    assert registry.get_sample_value("dapo_step", {"run": "r"}) == 4
