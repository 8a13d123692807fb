"""The Grafana dashboard names only metrics that exist (the operator's registry, or the workloads')."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import llmray.controllers.runtime
import llmray.kube
import llmray.leader
import llmray.metrics
import llmray.operator_main  # noqa: F401 - registers every operator metric
from llmray.api.telemetry import SERVING_METRICS, TRAINING_METRICS

pytestmark = pytest.mark.unit

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "llmray" / "dashboards" / "llmray.json"
# PromQL words that look like metric names: functions, aggregations, keywords.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "irate", "increase",
    "histogram_quantile", "le", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
}  # fmt: skip
_SUFFIXES = ("_bucket", "_sum", "_count")


def exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    out = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert out, "no queries found"
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names in one PromQL expression (label matchers, strings, durations and legends removed)."""
    text = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d+", w)}


def base(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def operator_names() -> set[str]:
    """Every name the operator's registry exposes as scraped (a labelled metric with no child yet
    has no sample, so names come from each family's type)."""
    names: set[str] = set()
    for metric in REGISTRY.collect():
        names |= {s.name for s in metric.samples}
        if metric.type == "counter":
            names.add(metric.name + "_total")
        elif metric.type == "histogram":
            names |= {metric.name + suffix for suffix in _SUFFIXES}
        else:
            names.add(metric.name)
    return names


def test_metric_names_are_extracted() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, kind) (rate(llmray_reconcile_seconds_bucket{kind="x"}[5m])))'
    assert metric_names(expr) == {"llmray_reconcile_seconds_bucket"}


def test_every_dashboard_query_names_existing_metrics() -> None:
    known = operator_names()
    workloads = set(TRAINING_METRICS) | set(SERVING_METRICS)
    used: set[str] = set()
    for expr in exprs():
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            used.add(name)
            assert name in known or base(name) in workloads, (
                f"{name} (in {expr!r}) is neither an operator metric nor in llmray.api.telemetry"
            )
    # The dashboard covers all three parts: operator, training, serving.
    assert any(n.startswith("llmray_") for n in used)
    assert {base(n) for n in used} >= {"ray_llmray_train_mfu", "ray_llmray_serve_time_to_first_token_seconds"}


def test_a_misspelt_metric_would_be_caught() -> None:
    known = operator_names()
    assert {"llmray_reconciles_total", "llmray_reconcile_seconds_bucket", "llmray_resources"} <= known
    assert not {"llmray_reconciles", "llmray_reconciles_bucket", "llmray_reconcile_second"} & known
