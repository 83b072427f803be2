"""Rank 0's account of one RL step: metrics from the batch, the queue and the optimizer steps,
exported to Prometheus and shown as a progress bar plus one summary line per step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm import tqdm

from megatron_dapo.config import RunConfig
from megatron_dapo.metrics import StepMetrics, TrainerMetricsExporter
from megatron_dapo.policy_step import OptimizerStepMetrics
from pipeline.dynamic_sampling import StepStats
from pipeline.overlong import TRUNCATED_FINISH_REASON
from pipeline.train_batch import TrainBatch


def summarize_step(
    step: int,
    batch: TrainBatch,
    stats: StepStats,
    optimizer_steps: Sequence[OptimizerStepMetrics],
    phase_seconds: Mapping[str, float],
) -> StepMetrics:
    """One RL step's metrics; per-token means are weighted by each optimizer step's tokens."""
    tokens = torch.tensor([float(o.num_loss_tokens) for o in optimizer_steps])
    weights = tokens / tokens.sum().clamp(min=1.0)

    def token_mean(name: str) -> float:
        values = torch.tensor([float(getattr(o, name)) for o in optimizer_steps])
        return float((values * weights).sum())

    lengths = batch.response_lengths().float()
    advantages = batch.advantages
    truncated = [m.get("finish_reason") == TRUNCATED_FINISH_REASON for m in batch.metadata]
    aux = [o.moe_aux_loss for o in optimizer_steps if o.moe_aux_loss is not None]
    loads = [torch.tensor(o.expert_load).sum(0) for o in optimizer_steps if o.expert_load]
    load = torch.stack(loads).sum(0).double() if loads else None
    trained_tokens = batch.num_tokens  # prompt and response tokens through the model
    return StepMetrics(
        step=step,
        loss=sum(o.loss for o in optimizer_steps) / len(optimizer_steps),
        entropy=token_mean("entropy"),
        clip_fraction_low=token_mean("clip_fraction_low"),
        clip_fraction_high=token_mean("clip_fraction_high"),
        approx_kl=token_mean("approx_kl"),
        reward_mean=float(batch.rewards.mean()),
        accuracy=stats.accuracy,
        response_length_mean=float(lengths.mean()),
        response_length_max=float(lengths.max()),
        response_length_min=float(lengths.min()),
        truncated_ratio=sum(truncated) / max(len(truncated), 1),
        advantage_mean=float(advantages.mean()),
        advantage_std=float(advantages.std()) if len(advantages) > 1 else 0.0,
        advantage_min=float(advantages.min()),
        advantage_max=float(advantages.max()),
        generation_tokens_per_second=stats.tokens_per_s,
        training_tokens_per_second=trained_tokens / max(phase_seconds.get("train", 0.0), 1e-9),
        grad_norm=optimizer_steps[-1].grad_norm,
        learning_rate=optimizer_steps[-1].lr,
        trained_tokens=trained_tokens,
        phase_seconds=dict(phase_seconds),
        moe_aux_loss=sum(aux) / len(aux) if aux else None,
        moe_expert_load=tuple((load / load.sum()).tolist()) if load is not None else (),
    )


class StepReporter:
    """Exports each step's metrics and prints a progress bar and a summary line per step."""

    def __init__(self, config: RunConfig, exporter: TrainerMetricsExporter):
        self._config = config
        self._exporter = exporter
        self._bar = tqdm(total=config.training.steps, desc="DAPO steps", unit="step")

    def report(self, m: StepMetrics, stats: StepStats) -> None:
        """Export one step's metrics (`summarize_step`) and print its summary line."""
        self._exporter.record(m)
        kept = stats.kept
        self._bar.write(
            f"step {m.step + 1}/{self._config.training.steps} | reward {m.reward_mean:+.3f} "
            f"acc {m.accuracy:.3f} | entropy {m.entropy:.3f} | clip lo/hi "
            f"{m.clip_fraction_low:.3f}/{m.clip_fraction_high:.3f} | "
            f"len {m.response_length_mean:.1f} (max {m.response_length_max:.0f}, "
            f"trunc {m.truncated_ratio:.2f}) | kept {kept}/"
            f"{stats.generated_groups} groups in {stats.generation_rounds} rounds | "
            f"gen {m.generation_tokens_per_second:.0f} tok/s train "
            f"{m.training_tokens_per_second:.0f} tok/s | "
            f"{sum(m.phase_seconds.values()):.1f}s"
        )
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
