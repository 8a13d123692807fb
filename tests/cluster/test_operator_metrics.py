"""The operator's /metrics against a real control plane: scraped over loopback and parsed with
prometheus_client's parser, its counters and per-phase gauges follow the resources."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kube import Kube, wait_for

from .test_operator_fixtures import (
    Operator,
    apply,
    example,
    status_of,
    wait_cluster_ready,
    wait_gone,
)

pytestmark = pytest.mark.cluster


def scrape(operator: Operator) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the operator's /metrics: (name, labels) -> value."""
    url = f"http://127.0.0.1:{operator.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_metrics_follow_the_resources(kube: Kube, namespace: str, operator: Operator) -> None:
    before = scrape(operator)
    assert value(before, "llmray_resources", kind="LLMTrainingJob") == 0
    assert (
        "llmray_resources",
        frozenset({("kind", "LLMDeployment"), ("phase", "Ready")}),
    ) in before  # zeros too
    assert value(before, "llmray_queue_oldest_seconds") >= 0

    apply(kube, example("training-tiny-cpu.yaml"), namespace)
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "tiny-train", 2)
    phase = status_of(kube, "LLMTrainingJob", namespace, "tiny-train")["phase"]

    def moved() -> bool:
        now = scrape(operator)
        return (
            value(now, "llmray_resources", kind="LLMTrainingJob", phase=phase) == 1
            and value(now, "llmray_reconciles_total", kind="LLMTrainingJob", result="ok") > 0
            and value(now, "llmray_children_created_total", kind="LLMTrainingJob", child="Pod") >= 3
            and value(now, "llmray_reconcile_seconds_count", kind="LLMTrainingJob") > 0
        )

    wait_for(moved, timeout=30, what=f"metrics of one LLMTrainingJob in phase {phase}")
    after = scrape(operator)
    created = value(after, "llmray_children_created_total", kind="LLMTrainingJob")
    assert created >= 6, "head + 2 workers, Services, auth Secret, NetworkPolicy"

    kube.kubectl("delete", "ltj", "tiny-train", "-n", namespace, "--wait=true")
    wait_gone(kube, namespace, "tiny-train")
    wait_for(
        lambda: value(scrape(operator), "llmray_resources", kind="LLMTrainingJob") == 0,
        timeout=30,
        what="llmray_resources back to 0 after deletion",
    )
