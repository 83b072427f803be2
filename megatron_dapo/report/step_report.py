"""Rank 0's account of one RL step: metrics from the batch, the queue and the optimizer steps,
exported to Prometheus, appended to the run's `metrics.jsonl`, and shown as a progress bar plus
one summary line per step; in steps that evaluate, the held-out evaluation too (the record's
`eval` field, one line per dataset; the data plane exports its series)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_dapo.config.schema import RunConfig
from megatron_dapo.mcore.policy_step import TrainResult
from megatron_dapo.report.prometheus import StepMetrics, TrainerMetricsExporter, step_wall_seconds
from pipeline.dynamic_sampling import StepStats
from pipeline.evaluation import EvalReport
from pipeline.overlong import TRUNCATED_FINISH_REASON
from pipeline.train_batch import TrainBatch


def run_summary(config: RunConfig) -> str:
    """What a run is about to do, in a few lines: the first thing it prints."""
    model, par, rollout, algorithm = (
        config.model,
        config.parallelism,
        config.rollout,
        config.algorithm,
    )
    kv_heads = model.num_query_groups or model.num_attention_heads
    heads = f"{model.num_attention_heads} heads, {kv_heads} kv"
    experts = f", {model.moe.num_experts} experts top-{model.moe.router_topk}" if model.moe else ""
    fleet = (
        f"{rollout.num_servers} embedded SGLang server(s)"
        if rollout.mode == "embedded"
        else f"SGLang at {rollout.router_url or ', '.join(rollout.server_urls)}"
    )
    correction = algorithm.rollout_correction
    schedule = (
        f"generation overlaps training (max_staleness {rollout.max_staleness})"
        if rollout.overlaps_generation
        else "generation, then training"
    )
    return "\n".join(
        [
            f"policy: {model.num_layers} layers x {model.hidden_size} ({heads}{experts}), "
            f"{model.vocab_size} tokens, {model.params_dtype}, from {model.hf_checkpoint}",
            f"ranks: {config.launch.world_size} = TP {par.tensor} x PP {par.pipeline} x DP "
            f"{config.data_parallel_size} (EP {par.expert}); fleet: {fleet}; {schedule}",
            f"objective: {algorithm.policy_loss} loss, {algorithm.advantage.estimator} advantages, "
            f"{algorithm.loss_aggregation}, eps {algorithm.eps_low}/{algorithm.eps_high}; pi_old "
            f"{algorithm.old_log_probs}, rollout correction {correction.mode}"
            + (
                f"; KL penalty {algorithm.kl_coef} x {algorithm.kl_estimator} to the reference"
                if algorithm.kl_coef > 0
                else ""
            ),
            f"steps: {config.training.steps} x {config.training.prompts_per_step} prompts x "
            f"{rollout.n_samples_per_prompt} samples; prompts <= {config.data.max_prompt_length}, "
            f"responses <= {rollout.max_response_length} tokens",
        ]
        + ([_eval_summary(config)] if config.eval.interval else [])
    )


def _eval_summary(config: RunConfig) -> str:
    """The run summary's line about held-out evaluation."""
    evaluation = config.eval
    datasets = ", ".join(
        f"{d.name}" + (f" ({d.max_prompts} prompts)" if d.max_prompts else "")
        for d in evaluation.datasets
    )
    return (
        f"eval: every {evaluation.interval} steps and after the last, {datasets} x "
        f"{evaluation.n_samples} samples at temperature {evaluation.temperature:g}, k "
        f"{'/'.join(map(str, evaluation.ks))}"
    )


def summarize_step(
    step: int,
    batch: TrainBatch,
    stats: StepStats,
    trained: TrainResult,
    phase_seconds: Mapping[str, float],
    fleet_busy_seconds: float,
) -> StepMetrics:
    """One RL step's metrics; per-token means are weighted by each optimizer step's tokens.

    `phase_seconds` holds the phases the loop timed; the forward-only passes inside `train`
    (pi_old recomputed, reference log-probs) are split off as the `old_log_probs` phase.
    `fleet_busy_seconds`: the time the fleet generated during the step (the rest is its idle
    time).
    """
    optimizer_steps = trained.optimizer_steps
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
    phases = {**phase_seconds, "reward": stats.reward_seconds}
    if trained.old_log_prob_seconds is not None:
        phases["old_log_probs"] = trained.old_log_prob_seconds
        phases["train"] = phase_seconds["train"] - trained.old_log_prob_seconds
    mismatch = trained.mismatch
    with_reference = optimizer_steps[0].reference_kl is not None
    return StepMetrics(
        step=step,
        loss=sum(o.loss for o in optimizer_steps) / len(optimizer_steps),
        entropy=token_mean("entropy"),
        clip_fraction_low=token_mean("clip_fraction_low"),
        clip_fraction_high=token_mean("clip_fraction_high"),
        dual_clip_fraction=token_mean("dual_clip_fraction"),
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
        training_tokens_per_second=trained_tokens / max(phases.get("train", 0.0), 1e-9),
        grad_norm=optimizer_steps[-1].grad_norm,
        learning_rate=optimizer_steps[-1].lr,
        trained_tokens=trained_tokens,
        padding_ratio=sum(o.padding_fraction for o in optimizer_steps) / len(optimizer_steps),
        microbatches=sum(o.num_microbatches for o in optimizer_steps),
        phase_seconds=phases,
        fleet_idle_seconds=max(step_wall_seconds(phases) - fleet_busy_seconds, 0.0),
        skipped_optimizer_steps=sum(not o.update_successful for o in optimizer_steps),
        moe_aux_loss=sum(aux) / len(aux) if aux else None,
        moe_expert_load=tuple((load / load.sum()).tolist()) if load is not None else (),
        rollout_mismatch_kl=mismatch.mean_kl() if mismatch else None,
        rollout_logprob_diff_mean=mismatch.mean_abs_diff() if mismatch else None,
        rollout_logprob_diff_max=float(mismatch.max_abs_diff) if mismatch else None,
        rollout_truncated_ratio=mismatch.truncated_fraction() if mismatch else None,
        reference_kl=token_mean("reference_kl") if with_reference else None,
    )


def step_record(
    m: StepMetrics, stats: StepStats, evaluation: EvalReport | None = None
) -> dict[str, object]:
    """One line of `metrics.jsonl`: every `StepMetrics` field, the idle times, the queue's
    group counts and, in a step that evaluated, `eval` (`EvalReport.record`: the policy
    version, the seconds, and per dataset mean@k / pass@k, response length, truncation)."""
    record: dict[str, object] = {
        **dataclasses.asdict(m),
        "trainer_idle_seconds": m.trainer_idle_seconds,
        "trainer_idle_ratio": m.trainer_idle_ratio,
        "fleet_idle_ratio": m.fleet_idle_ratio,
        "kept_groups": stats.kept,
        "generated_groups": stats.generated_groups,
        "generation_rounds": stats.generation_rounds,
    }
    if evaluation is not None:
        record["eval"] = evaluation.record()
    return record


class StepReporter:
    """Exports each step's metrics, appends them to `log_path` (JSON lines, flushed per step so a
    crash loses nothing) and prints a progress bar and a summary line every `metrics.log_every`
    steps (and for the last step).

    A run that starts at `first_step` (resumed) first drops the log's records of steps
    >= `first_step`: a crash after the last checkpoint left them, and they are redone.
    """

    def __init__(
        self,
        config: RunConfig,
        exporter: TrainerMetricsExporter,
        log_path: Path,
        first_step: int = 0,
    ):
        self._config = config
        self._exporter = exporter
        log_path.parent.mkdir(parents=True, exist_ok=True)
        kept = [
            line
            for line in (log_path.read_text().splitlines() if log_path.is_file() else [])
            if json.loads(line)["step"] < first_step
        ]
        log_path.write_text("".join(f"{line}\n" for line in kept))
        self._log = log_path.open("a", encoding="utf-8")
        self._bar = tqdm(
            total=config.training.steps, initial=first_step, desc="DAPO steps", unit="step"
        )

    def report(
        self, m: StepMetrics, stats: StepStats, evaluation: EvalReport | None = None
    ) -> None:
        """Export one step's metrics (`summarize_step`), log them (with the step's
        `evaluation`, if it evaluated) and print the summary line, and the evaluation's lines
        whatever `metrics.log_every` says."""
        self._exporter.record(m)
        self._log.write(json.dumps(step_record(m, stats, evaluation)) + "\n")
        self._log.flush()
        self._bar.update(1)
        steps = self._config.training.steps
        if not (m.step + 1) % self._config.metrics.log_every or m.step + 1 == steps:
            self._bar.write(self._step_line(m, stats))
        if evaluation is not None:
            for line in evaluation.lines():
                self._bar.write(f"{line} | {evaluation.seconds:.1f}s")

    def _step_line(self, m: StepMetrics, stats: StepStats) -> str:
        """The step's summary line."""
        steps = self._config.training.steps
        kept = stats.kept
        problems = [
            f"{count} {what}"
            for count, what in (
                (m.skipped_optimizer_steps, "optimizer step(s) SKIPPED as non-finite"),
                (stats.reward_timeouts, "reward timeout(s)"),
                (stats.reward_errors, "reward error(s)"),
                (stats.skipped_prompts, "over-long prompt(s) skipped"),
            )
            if count
        ]
        parts = [
            f"step {m.step + 1}/{steps}",
            f"reward {m.reward_mean:+.3f} acc {m.accuracy:.3f}",
            f"entropy {m.entropy:.3f}",
            f"clip lo/hi {m.clip_fraction_low:.3f}/{m.clip_fraction_high:.3f}",
        ]
        if m.rollout_mismatch_kl is not None:
            parts.append(f"mismatch KL {m.rollout_mismatch_kl:.1e}")
        if m.reference_kl is not None:
            parts.append(f"ref KL {m.reference_kl:.1e}")
        parts += [
            f"len {m.response_length_mean:.1f} (max {m.response_length_max:.0f}, "
            f"trunc {m.truncated_ratio:.2f})",
            f"kept {kept}/{stats.generated_groups} groups in {stats.generation_rounds} rounds",
            f"gen {m.generation_tokens_per_second:.0f} tok/s train "
            f"{m.training_tokens_per_second:.0f} tok/s",
            f"{m.step_seconds:.1f}s, idle trainer {m.trainer_idle_ratio:.0%} fleet "
            f"{m.fleet_idle_ratio:.0%}",
            *problems,
        ]
        return " | ".join(parts)

    def close(self) -> None:
        self._bar.close()
        self._log.close()
