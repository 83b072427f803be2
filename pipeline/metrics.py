"""Prometheus metric objects of the rollout fleet and the dynamic-sampling queue.

Every metric is registered in the `CollectorRegistry` passed in (a private one when none is
given), never in prometheus_client's global registry, so several fleets or queues (and tests)
coexist in one process. The exporter serves whichever registry the run builds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class FleetMetrics:
    """Rollout-fleet metrics, labelled by server URL where it makes sense.

    Attributes:
        inflight_requests: generate requests outstanding per server (gauge).
        requests: generate requests answered per server (counter).
        retries: HTTP calls retried after a timeout or server error, per server (counter).
        server_failures: servers declared dead (counter).
        reissued_requests: generate requests re-issued on another server (counter).
        generated_tokens: response tokens received (counter, tokens).
    """

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "dapo") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.inflight_requests = Gauge(
            f"{prefix}_fleet_inflight_requests",
            "Outstanding generate requests",
            ["server"],
            registry=reg,
        )
        self.requests = Counter(
            f"{prefix}_fleet_requests", "Answered generate requests", ["server"], registry=reg
        )
        self.retries = Counter(
            f"{prefix}_fleet_retries", "Retried HTTP calls", ["server"], registry=reg
        )
        self.server_failures = Counter(
            f"{prefix}_fleet_server_failures", "Servers declared dead", registry=reg
        )
        self.reissued_requests = Counter(
            f"{prefix}_fleet_reissued_requests", "Requests re-issued elsewhere", registry=reg
        )
        self.generated_tokens = Counter(
            f"{prefix}_fleet_generated_tokens", "Response tokens received", registry=reg
        )


class QueueMetrics:
    """Dynamic-sampling queue metrics.

    Attributes:
        kept_groups: groups that entered a batch or the carry-over buffer (counter).
        dropped_groups: groups dropped, by reason `all_correct` / `all_wrong` / `stale` /
            `aborted` (counter).
        generation_rounds: generation rounds per step (histogram).
        generated_samples: responses generated, whether kept or not (counter).
        queue_depth: kept groups waiting in the carry-over buffer (gauge).
        staleness: policy version minus generating version, per trained sample (histogram).
        batch_version: policy version of the last batch handed out (gauge).
        generation_tokens_per_s: response tokens per second of generation wall time in the
            last step (gauge, tokens/s).
    """

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "dapo") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.kept_groups = Counter(
            f"{prefix}_queue_kept_groups", "Groups kept for training", registry=reg
        )
        self.dropped_groups = Counter(
            f"{prefix}_queue_dropped_groups", "Groups dropped", ["reason"], registry=reg
        )
        self.generation_rounds = Histogram(
            f"{prefix}_queue_generation_rounds",
            "Generation rounds per step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=reg,
        )
        self.generated_samples = Counter(
            f"{prefix}_queue_generated_samples", "Responses generated", registry=reg
        )
        self.queue_depth = Gauge(
            f"{prefix}_queue_depth", "Kept groups waiting in the carry-over buffer", registry=reg
        )
        self.staleness = Histogram(
            f"{prefix}_queue_staleness",
            "Policy version minus generating version of trained samples",
            buckets=(0, 1, 2, 4, 8),
            registry=reg,
        )
        self.batch_version = Gauge(
            f"{prefix}_queue_batch_version", "Policy version of the last batch", registry=reg
        )
        self.generation_tokens_per_s = Gauge(
            f"{prefix}_queue_generation_tokens_per_second",
            "Response tokens per second of generation in the last step",
            registry=reg,
        )
