"""Prometheus metrics of the trainer: one `StepMetrics` per RL step, exported by rank 0.

Every series carries the label `run` (`metrics.run_name`). Names follow Prometheus conventions
(base units, `_seconds`, `_ratio`, `_total` for counters). The data plane exports its own queue
and fleet series (`pipeline.metrics`) into the same registry when both run in one process.

    exporter = TrainerMetricsExporter(run_name="demo", registry=CollectorRegistry())
    exporter.serve("127.0.0.1", 9400)          # /metrics over HTTP
    exporter.record(step_metrics)              # after every RL step
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

PREFIX = "dapo"
STEP_PHASES = (
    "generate",
    "reward",
    "old_log_probs",
    "train",
    "prefetch_wait",
    "weight_sync",
    "eval",
)
OVERLAPPING = ("reward",)
"""Phases that run during another phase (reward calls, during generation)."""
TRAINER_IDLE_PHASES = ("generate", "prefetch_wait", "eval")
"""Phases in which the trainer waits for the fleet (its samples, or a held-out evaluation)."""


def step_wall_seconds(phase_seconds: Mapping[str, float]) -> float:
    """Wall time of a step from its phase times: the sequential phases, `OVERLAPPING` left out."""
    return math.fsum(s for phase, s in phase_seconds.items() if phase not in OVERLAPPING)


@dataclass(frozen=True)
class StepMetrics:
    """What one RL step measured (global values, already reduced over ranks).

    Units: entropy and KL in nats per token, lengths in tokens, times in seconds, throughput
    in tokens per second; fractions and ratios in [0, 1].
    """

    step: int
    loss: float
    entropy: float
    clip_fraction_low: float
    clip_fraction_high: float
    dual_clip_fraction: float
    approx_kl: float
    reward_mean: float
    accuracy: float
    """Fraction of correct responses among all generated in the step (before filtering)."""
    response_length_mean: float
    response_length_max: float
    response_length_min: float
    truncated_ratio: float
    advantage_mean: float
    advantage_std: float
    advantage_min: float
    advantage_max: float
    generation_tokens_per_second: float
    training_tokens_per_second: float
    grad_norm: float
    learning_rate: float
    trained_tokens: int
    padding_ratio: float
    """Padding tokens / packed row slots of the step's micro-batches (mean over optimizer
    steps)."""
    microbatches: int
    """Micro-batches per data-parallel rank, summed over the step's optimizer steps."""
    phase_seconds: Mapping[str, float] = field(default_factory=dict)
    """Wall time per phase of the step; keys from `STEP_PHASES`. `generate` is the time the
    trainer waited for its batch (all of the generation when sequential, what the prefetch
    did not cover with overlap); `prefetch_wait` the time it waited, with overlap, for the
    next step's groups before the weight sync. `reward` is the time of the reward calls, which
    run while other groups generate (it overlaps `generate`). `eval` (only in steps that
    evaluate) is the held-out evaluation after the weight sync."""
    fleet_idle_seconds: float = 0.0
    """Wall time of the step in which the fleet generated nothing for the queue (waiting for
    the trainer and the weight sync)."""
    skipped_optimizer_steps: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient (`training.on_nonfinite`)."""
    moe_aux_loss: float | None = None
    moe_expert_load: tuple[float, ...] = ()
    """Fraction of routed token slots per expert (summed over MoE layers), sums to 1."""
    rollout_mismatch_kl: float | None = None
    """k3 KL(pi_rollout || pi_old) per loss token (nats); None when pi_old is the rollout's."""
    rollout_logprob_diff_mean: float | None = None
    """Mean |log pi_old - log pi_rollout| per loss token (nats)."""
    rollout_logprob_diff_max: float | None = None
    """Largest |log pi_old - log pi_rollout| of the step (nats)."""
    rollout_truncated_ratio: float | None = None
    """Fraction of loss tokens whose importance weight was truncated (rollout correction)."""
    reference_kl: float | None = None
    """KL(pi_theta || pi_ref) per loss token (nats) by `algorithm.kl_estimator`, the KL penalty's
    before its coefficient; None without a reference policy (`algorithm.kl_coef` 0)."""

    @property
    def step_seconds(self) -> float:
        """Wall time of the step: its sequential phases (`reward` overlaps `generate`)."""
        return step_wall_seconds(self.phase_seconds)

    @property
    def trainer_idle_seconds(self) -> float:
        """Wall time of the step in which the trainer waited for samples."""
        return math.fsum(self.phase_seconds.get(p, 0.0) for p in TRAINER_IDLE_PHASES)

    @property
    def trainer_idle_ratio(self) -> float:
        """`trainer_idle_seconds` as a share of the step."""
        return self.trainer_idle_seconds / max(self.step_seconds, 1e-9)

    @property
    def fleet_idle_ratio(self) -> float:
        """`fleet_idle_seconds` as a share of the step."""
        return self.fleet_idle_seconds / max(self.step_seconds, 1e-9)


class TrainerMetricsExporter:
    """Owns the trainer's Prometheus series in `registry` and updates them from `StepMetrics`."""

    def __init__(self, run_name: str, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._run = run_name

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, ("run", *labels), registry=registry)

        self._step = gauge("step", "Last completed RL step")
        self._loss = gauge("policy_loss", "Policy loss of the last step (token-level, global)")
        self._entropy = gauge("policy_entropy_nats", "Mean policy entropy per response token")
        self._clip = gauge("clip_fraction_ratio", "Fraction of loss tokens clipped", "bound")
        self._kl = gauge("approx_kl_nats", "Approximate KL(pi_old || pi_theta) per token (k3)")
        self._reward = gauge("reward_mean", "Mean shaped reward of the trained samples")
        self._accuracy = gauge("accuracy_ratio", "Fraction of correct responses")
        self._length = gauge("response_length_tokens", "Response length", "stat")
        self._truncated = gauge("truncated_ratio", "Fraction of responses cut at the length limit")
        self._advantage = gauge("advantage", "Advantage statistics", "stat")
        self._throughput = gauge("tokens_per_second", "Token throughput", "phase")
        self._phase = gauge("step_phase_seconds", "Wall time of the last step by phase", "phase")
        self._idle = gauge("idle_seconds", "Wall time of the last step spent waiting", "side")
        self._idle_ratio = gauge("idle_ratio", "Share of the last step spent waiting", "side")
        self._padding = gauge("padding_ratio", "Padding share of the packed micro-batch rows")
        self._microbatches = gauge("microbatches", "Micro-batches per data-parallel rank in a step")
        self._grad_norm = gauge("grad_norm", "Global gradient norm before clipping")
        self._lr = gauge("learning_rate", "Learning rate of the last optimizer step")
        self._moe_aux = gauge("moe_aux_loss", "MoE load-balancing auxiliary loss")
        self._expert_load = gauge("moe_expert_load_ratio", "Share of routed tokens", "expert")
        self._mismatch_kl = gauge(
            "rollout_mismatch_kl_nats", "k3 KL(pi_rollout || pi_old) per loss token"
        )
        self._logprob_diff = gauge(
            "rollout_logprob_diff_nats", "|log pi_old - log pi_rollout| per loss token", "stat"
        )
        self._truncated_weights = gauge(
            "rollout_truncated_weight_ratio", "Fraction of loss tokens with a truncated IS weight"
        )
        self._reference_kl = gauge(
            "reference_kl_nats", "KL(pi_theta || pi_ref) per loss token (KL penalty's estimator)"
        )
        self._skipped = Counter(
            f"{PREFIX}_skipped_optimizer_steps",
            "Optimizer steps skipped for a non-finite loss or gradient",
            ("run",),
            registry=registry,
        )
        self._tokens = Counter(
            f"{PREFIX}_trained_tokens",
            "Tokens (prompt and response) through the policy in training",
            ("run",),
            registry=registry,
        )

    def serve(self, bind_address: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
        server, _ = start_http_server(port, addr=bind_address, registry=self.registry)
        return server.server_port

    def record(self, m: StepMetrics) -> None:
        """Set every series from one step's metrics."""
        run = self._run
        self._step.labels(run).set(m.step)
        self._loss.labels(run).set(m.loss)
        self._entropy.labels(run).set(m.entropy)
        self._clip.labels(run, "low").set(m.clip_fraction_low)
        self._clip.labels(run, "high").set(m.clip_fraction_high)
        self._clip.labels(run, "dual").set(m.dual_clip_fraction)
        self._kl.labels(run).set(m.approx_kl)
        self._reward.labels(run).set(m.reward_mean)
        self._accuracy.labels(run).set(m.accuracy)
        for stat in ("mean", "max", "min"):
            self._length.labels(run, stat).set(getattr(m, f"response_length_{stat}"))
        self._truncated.labels(run).set(m.truncated_ratio)
        for stat in ("mean", "std", "min", "max"):
            self._advantage.labels(run, stat).set(getattr(m, f"advantage_{stat}"))
        self._throughput.labels(run, "generate").set(m.generation_tokens_per_second)
        self._throughput.labels(run, "train").set(m.training_tokens_per_second)
        for phase, seconds in m.phase_seconds.items():
            if phase not in STEP_PHASES:
                raise ValueError(f"unknown step phase {phase!r}; expected one of {STEP_PHASES}")
            self._phase.labels(run, phase).set(seconds)
        self._idle.labels(run, "trainer").set(m.trainer_idle_seconds)
        self._idle.labels(run, "fleet").set(m.fleet_idle_seconds)
        self._idle_ratio.labels(run, "trainer").set(m.trainer_idle_ratio)
        self._idle_ratio.labels(run, "fleet").set(m.fleet_idle_ratio)
        self._padding.labels(run).set(m.padding_ratio)
        self._microbatches.labels(run).set(m.microbatches)
        self._grad_norm.labels(run).set(m.grad_norm)
        self._lr.labels(run).set(m.learning_rate)
        if m.moe_aux_loss is not None:
            self._moe_aux.labels(run).set(m.moe_aux_loss)
        for expert, share in enumerate(m.moe_expert_load):
            self._expert_load.labels(run, str(expert)).set(share)
        if m.rollout_mismatch_kl is not None:
            self._mismatch_kl.labels(run).set(m.rollout_mismatch_kl)
            self._logprob_diff.labels(run, "mean").set(m.rollout_logprob_diff_mean)
            self._logprob_diff.labels(run, "max").set(m.rollout_logprob_diff_max)
            self._truncated_weights.labels(run).set(m.rollout_truncated_ratio)
        if m.reference_kl is not None:
            self._reference_kl.labels(run).set(m.reference_kl)
        self._tokens.labels(run).inc(m.trained_tokens)
        self._skipped.labels(run).inc(m.skipped_optimizer_steps)
