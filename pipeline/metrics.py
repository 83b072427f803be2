"""Prometheus metric objects of the rollout fleet and the dynamic-sampling queue.

Every metric is registered in the `CollectorRegistry` passed in (a private one when none is
given), never in prometheus_client's global registry, so several fleets or queues (and tests)
coexist in one process. The exporter serves whichever registry the run builds.

Every series carries the label `run` first (the run name, as the trainer's series in
`megatron_dapo.report.prometheus`). Metrics without further labels are exposed already bound to
the run (`metrics.kept_groups.inc()`); families with further labels take only those
(`metrics.retries.labels(server_url).inc()`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DEFAULT_RUN = "default"
"""The `run` label of metrics built without a run name (tests, benchmarks)."""

MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)


class RunFamily(Generic[MetricT]):
    """A labelled metric family whose first label, `run`, is fixed."""

    def __init__(self, family: MetricT, run: str) -> None:
        self._family = family
        self._run = run

    def labels(self, *values: str) -> MetricT:
        """The child for (`run`, *values)."""
        return self._family.labels(self._run, *values)


class RunMetrics(ABC):
    """Base of a set of metrics of one run in one registry; subclasses create theirs in
    `_create` with the helpers below, named `<prefix>_<name>` and labelled (`run`, ...).

    Args:
        registry: where the series are registered (a private registry when None).
        run: the `run` label value.
        prefix: the metric name prefix.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        run: str = DEFAULT_RUN,
        prefix: str = "dapo",
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.run = run
        self._prefix = prefix
        self._create()

    @abstractmethod
    def _create(self) -> None:
        """Create the metrics (as attributes)."""

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(f"{self._prefix}_{name}", doc, ["run"], registry=self.registry).labels(
            self.run
        )

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(f"{self._prefix}_{name}", doc, ["run"], registry=self.registry).labels(
            self.run
        )

    def _histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(
            f"{self._prefix}_{name}", doc, ["run"], buckets=buckets, registry=self.registry
        ).labels(self.run)

    def _counter_family(self, name: str, doc: str, label: str) -> RunFamily[Counter]:
        family = Counter(f"{self._prefix}_{name}", doc, ["run", label], registry=self.registry)
        return RunFamily(family, self.run)

    def _gauge_family(self, name: str, doc: str, *labels: str) -> RunFamily[Gauge]:
        family = Gauge(f"{self._prefix}_{name}", doc, ["run", *labels], registry=self.registry)
        return RunFamily(family, self.run)


class FleetMetrics(RunMetrics):
    """Rollout-fleet metrics, labelled by server URL where it makes sense.

    Attributes:
        registry: the registry holding the series.
        run: the `run` label value.
        inflight_requests: generate requests outstanding per server (gauge).
        requests: generate requests answered per server (counter).
        retries: HTTP calls retried after a timeout or server error, per server (counter).
        server_failures: times a server was declared dead, per server (counter).
        server_revivals: times a dead server answered again and was re-admitted, per server
            (counter).
        live_servers: workers currently taking requests (gauge).
        reissued_requests: generate requests re-issued on another server (counter).
        generated_tokens: response tokens received (counter, tokens).
    """

    def _create(self) -> None:
        self.inflight_requests = self._gauge_family(
            "fleet_inflight_requests", "Outstanding generate requests", "server"
        )
        self.requests = self._counter_family(
            "fleet_requests", "Answered generate requests", "server"
        )
        self.retries = self._counter_family("fleet_retries", "Retried HTTP calls", "server")
        self.server_failures = self._counter_family(
            "fleet_server_failures", "Times a server was declared dead", "server"
        )
        self.server_revivals = self._counter_family(
            "fleet_server_revivals", "Times a dead server was re-admitted", "server"
        )
        self.live_servers = self._gauge("fleet_live_servers", "Workers taking requests")
        self.reissued_requests = self._counter(
            "fleet_reissued_requests", "Requests re-issued elsewhere"
        )
        self.generated_tokens = self._counter("fleet_generated_tokens", "Response tokens received")


class QueueMetrics(RunMetrics):
    """Dynamic-sampling queue metrics.

    Attributes:
        registry: the registry holding the series.
        run: the `run` label value.
        kept_groups: groups that entered a batch or the carry-over buffer (counter).
        dropped_groups: groups dropped, by reason `all_correct` / `all_wrong` / `stale` /
            `aborted` (counter).
        generation_rounds: generation rounds per step (histogram).
        generated_samples: responses generated, whether kept or not (counter).
        skipped_prompts: prompts skipped as longer than `data.max_prompt_length` (counter).
        reward_timeouts: responses whose reward call passed `reward.timeout_s` (scored as
            wrong; counter).
        reward_errors: responses whose reward function raised (scored as wrong; counter).
        queue_depth: kept groups waiting in the carry-over buffer (gauge).
        staleness: policy version minus generating version, per trained sample (histogram).
        batch_version: policy version of the last batch handed out (gauge).
        generation_tokens_per_s: response tokens per second of generation wall time in the
            last step (gauge, tokens/s).
    """

    def _create(self) -> None:
        self.kept_groups = self._counter("queue_kept_groups", "Groups kept for training")
        self.dropped_groups = self._counter_family(
            "queue_dropped_groups", "Groups dropped", "reason"
        )
        self.generation_rounds = self._histogram(
            "queue_generation_rounds",
            "Generation rounds per step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
        )
        self.generated_samples = self._counter("queue_generated_samples", "Responses generated")
        self.skipped_prompts = self._counter(
            "queue_skipped_prompts", "Prompts skipped as longer than data.max_prompt_length"
        )
        self.reward_timeouts = self._counter(
            "reward_timeouts", "Responses whose reward call timed out (scored as wrong)"
        )
        self.reward_errors = self._counter(
            "reward_errors", "Responses whose reward function raised (scored as wrong)"
        )
        self.queue_depth = self._gauge(
            "queue_depth", "Kept groups waiting in the carry-over buffer"
        )
        self.staleness = self._histogram(
            "queue_staleness",
            "Policy version minus generating version of trained samples",
            buckets=(0, 1, 2, 4, 8),
        )
        self.batch_version = self._gauge("queue_batch_version", "Policy version of the last batch")
        self.generation_tokens_per_s = self._gauge(
            "queue_generation_tokens_per_second",
            "Response tokens per second of generation in the last step",
        )


class EvalMetrics(RunMetrics):
    """Held-out evaluation metrics (`pipeline.evaluation`), labelled by dataset name.

    Attributes:
        registry: the registry holding the series.
        run: the `run` label value.
        score: `mean@k` / `pass@k` of the last evaluation, by `dataset` and `metric` (gauge,
            ratio in [0, 1]).
        response_length: mean response length of the last evaluation, by `dataset` (gauge,
            tokens).
        truncated_ratio: share of responses cut at the length limit, by `dataset` (gauge).
        policy_version: the policy version last evaluated (gauge).
        seconds: wall time of the last evaluation, all datasets (gauge, seconds).
    """

    def _create(self) -> None:
        self.score = self._gauge_family(
            "eval_score_ratio",
            "Held-out mean@k / pass@k of the last evaluation",
            "dataset",
            "metric",
        )
        self.response_length = self._gauge_family(
            "eval_response_length_tokens", "Mean held-out response length", "dataset"
        )
        self.truncated_ratio = self._gauge_family(
            "eval_truncated_ratio", "Share of held-out responses cut at the length limit", "dataset"
        )
        self.policy_version = self._gauge("eval_policy_version", "Policy version last evaluated")
        self.seconds = self._gauge("eval_seconds", "Wall time of the last evaluation")
