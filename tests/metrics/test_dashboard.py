"""The shipped Grafana dashboard queries only exported series; the Prometheus config parses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from megatron_dapo.report.prometheus import TrainerMetricsExporter
from pipeline.metrics import EvalMetrics, FleetMetrics, QueueMetrics
from tests.metrics.step_metrics_example import example_step_metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "configs" / "grafana" / "megatron-dapo.json"
# A PromQL identifier followed by a selector, a range or the end of an argument.
METRIC_NAME = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\[|\)|$)")
PROMQL_WORDS = {"rate", "irate", "sum", "avg", "max", "min", "by", "increase"}
LABEL_VALUES = re.compile(r"label_values\((\w+),\s*\w+\)")


SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


def _exported_series() -> set[str]:
    """Every series name the trainer and data-plane exporters can expose (labelled or not)."""
    registry = CollectorRegistry()
    TrainerMetricsExporter("r", registry).record(example_step_metrics())
    QueueMetrics(registry), FleetMetrics(registry)  # the data plane's series, same registry
    evaluation = EvalMetrics(registry)  # labelled series appear once set, as after an eval
    evaluation.score.labels("held-out", "pass@1").set(0.5)
    evaluation.response_length.labels("held-out").set(3.0)
    evaluation.truncated_ratio.labels("held-out").set(0.0)
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in SERIES_SUFFIXES[family.type]
    }


def _queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    variables = dashboard.get("templating", {}).get("list", [])
    return exprs + [v["query"] for v in variables if v.get("type") == "query"]


def test_every_panel_queries_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = _exported_series()
    queries = _queries(dashboard)
    assert len(dashboard["panels"]) >= 10
    for query in queries:
        query = LABEL_VALUES.sub(r"\1", query)
        names = {n for n in METRIC_NAME.findall(query) if n not in PROMQL_WORDS}
        assert names, f"no metric name found in {query!r}"
        assert names <= exported, f"{query!r} names series not exported: {names - exported}"


def test_every_panel_series_is_selected_by_run() -> None:
    """Trainer, queue and fleet series all carry `run`; every panel filters on the variable."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    for expr in (t["expr"] for panel in panels for t in panel.get("targets", [])):
        for match in METRIC_NAME.finditer(expr):
            if match.group(1) not in PROMQL_WORDS:
                assert expr[match.end() :].startswith('{run=~"$run"'), f"{expr!r} ignores $run"


def test_panel_ids_are_unique() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)


def test_prometheus_config_scrapes_the_trainer_port() -> None:
    config = yaml.safe_load((REPO / "configs" / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert "127.0.0.1:9400" in targets


def test_the_dashboard_shows_the_held_out_evaluation() -> None:
    exprs = [
        t["expr"]
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for t in panel.get("targets", [])
    ]
    for series in ("dapo_eval_score_ratio", "dapo_eval_response_length_tokens"):
        assert any(expr.startswith(series) for expr in exprs), series
