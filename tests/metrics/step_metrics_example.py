"""A fully populated StepMetrics for exporter and dashboard tests."""

from __future__ import annotations

from megatron_dapo.report.prometheus import StepMetrics


def example_step_metrics(step: int = 3, **changes: object) -> StepMetrics:
    values = dict(
        step=step,
        loss=0.12,
        entropy=1.5,
        clip_fraction_low=0.01,
        clip_fraction_high=0.04,
        dual_clip_fraction=0.005,
        approx_kl=0.002,
        reward_mean=-0.25,
        accuracy=0.375,
        response_length_mean=20.5,
        response_length_max=32,
        response_length_min=3,
        truncated_ratio=0.125,
        advantage_mean=0.0,
        advantage_std=0.9,
        advantage_min=-1.7,
        advantage_max=1.3,
        generation_tokens_per_second=150.0,
        training_tokens_per_second=900.0,
        grad_norm=0.7,
        learning_rate=1e-3,
        trained_tokens=1000,
        padding_ratio=0.02,
        microbatches=3,
        phase_seconds={
            "generate": 4.0,
            "reward": 0.1,
            "old_log_probs": 0.4,
            "train": 1.5,
            "weight_sync": 0.3,
        },
        fleet_idle_seconds=2.0,
        moe_aux_loss=0.011,
        moe_expert_load=(0.3, 0.2, 0.25, 0.25),
        rollout_mismatch_kl=2e-4,
        rollout_logprob_diff_mean=0.01,
        rollout_logprob_diff_max=0.3,
        rollout_truncated_ratio=0.001,
        reference_kl=3e-3,
    )
    values.update(changes)
    return StepMetrics(**values)  # type: ignore[arg-type]
