"""The trainer's Prometheus exporter: every StepMetrics field lands in a labelled series."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from megatron_dapo.report.prometheus import TrainerMetricsExporter
from tests.metrics.step_metrics_example import example_step_metrics as _metrics


def test_record_sets_every_series() -> None:
    registry = CollectorRegistry()
    exporter = TrainerMetricsExporter("run-a", registry)
    exporter.record(_metrics())
    exporter.record(_metrics(step=4))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"run": "run-a", **labels})

    assert value("dapo_step") == 4
    assert value("dapo_policy_entropy_nats") == 1.5
    assert value("dapo_clip_fraction_ratio", bound="high") == 0.04
    assert value("dapo_clip_fraction_ratio", bound="low") == 0.01
    assert value("dapo_clip_fraction_ratio", bound="dual") == 0.005
    assert value("dapo_padding_ratio") == 0.02 and value("dapo_microbatches") == 3
    assert value("dapo_rollout_mismatch_kl_nats") == 2e-4
    assert value("dapo_rollout_logprob_diff_nats", stat="max") == 0.3
    assert value("dapo_rollout_truncated_weight_ratio") == 0.001
    assert value("dapo_reference_kl_nats") == 3e-3
    assert value("dapo_step_phase_seconds", phase="old_log_probs") == 0.4
    assert value("dapo_response_length_tokens", stat="max") == 32
    assert value("dapo_advantage", stat="min") == -1.7
    assert value("dapo_tokens_per_second", phase="generate") == 150.0
    assert value("dapo_step_phase_seconds", phase="weight_sync") == 0.3
    assert value("dapo_idle_seconds", side="trainer") == 4.0  # waiting for the batch
    assert value("dapo_idle_seconds", side="fleet") == 2.0
    assert value("dapo_idle_ratio", side="fleet") == pytest.approx(2.0 / 6.2)
    assert value("dapo_moe_expert_load_ratio", expert="0") == 0.3
    assert value("dapo_trained_tokens_total") == 2000  # a counter: both steps add up


def test_unknown_phase_is_rejected() -> None:
    exporter = TrainerMetricsExporter("r", CollectorRegistry())
    with pytest.raises(ValueError, match="unknown step phase 'checkpoint'"):
        exporter.record(_metrics(phase_seconds={"checkpoint": 1.0}))


def test_serve_exposes_text_format_on_loopback() -> None:
    exporter = TrainerMetricsExporter("served", CollectorRegistry())
    exporter.record(_metrics())
    port = exporter.serve("127.0.0.1", 0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    assert 'dapo_policy_entropy_nats{run="served"} 1.5' in body
