"""The operator's Prometheus metrics that are not owned by one module.

Served by ``llmray operator --metrics-port`` (prometheus-client's default registry); the reconcile
loop's own metrics live in :mod:`llmray.controllers.runtime`, the Kubernetes API's in
:mod:`llmray.kube`, the Lease's in :mod:`llmray.leader`. Labels stay bounded: kinds, phases,
child kinds, normalised Ray endpoints and outcome classes -- never a resource name, an id or a URL.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import get_args

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmray.api import deployment, training

RAY_REQUESTS = Counter(
    "llmray_ray_requests",
    "Calls to Ray heads (retries included in one call), by endpoint and outcome",
    ["endpoint", "method", "outcome"],
)
RAY_REQUEST_SECONDS = Histogram(
    "llmray_ray_request_seconds",
    "Duration of one call to a Ray head (all attempts), by endpoint",
    ["endpoint", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CHILDREN_CREATED = Counter(
    "llmray_children_created",
    "Child objects the operator created, by owner kind and child kind",
    ["kind", "child"],
)
CHILDREN_DELETED = Counter(
    "llmray_children_deleted",
    "Child objects the operator deleted, by owner kind and child kind",
    ["kind", "child"],
)

# Outcome classes of a Ray call (the label's only values).
OUTCOME_OK = "ok"

_ENDPOINTS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), name)
    for pattern, name in (
        (r"^/api/jobs/?$", "/api/jobs/"),
        (r"^/api/jobs/[^/]+/logs/?$", "/api/jobs/{id}/logs"),
        (r"^/api/jobs/[^/]+/stop/?$", "/api/jobs/{id}/stop"),
        (r"^/api/jobs/[^/]+/?$", "/api/jobs/{id}"),
        (r"^/api/v0/logs/file/?$", "/api/v0/logs/file"),
        (r"^/api/serve/applications/?$", "/api/serve/applications/"),
        (r"^/api/cluster_status/?$", "/api/cluster_status"),
        (r"^/api/version/?$", "/api/version"),
        (r"^/nodes/?$", "/nodes"),
        (r"^/api/gcs_healthz/?$", "/api/gcs_healthz"),
        (r"^/llmray/stats/?$", "/llmray/stats"),
    )
)


def endpoint_label(path: str) -> str:
    """The bounded label of a request path: its template (ids replaced), or ``other``."""
    path = path.split("?", 1)[0]
    for pattern, name in _ENDPOINTS:
        if pattern.match(path):
            return name
    return "other"


def status_class(code: int) -> str:
    """``2xx`` .. ``5xx`` (an untrusted head may answer any number: the label stays bounded)."""
    return f"{code // 100}xx" if 100 <= code < 600 else "invalid"


# --- resources per phase (computed at scrape time from the watch caches) ---------------------------

PhaseCounts = Callable[[], Mapping[tuple[str, str], int]]


class PhaseCollector(Collector):
    """``llmray_resources{kind, phase}``: how many resources the operator knows, per phase.

    Read from the watch caches when scraped (always current, nothing to keep in sync); every
    known phase of every kind is reported, zeros included, so a panel never loses a series.
    """

    NAME = "llmray_resources"

    def __init__(self, phases: Mapping[str, Iterable[str]]) -> None:
        self.phases = {kind: tuple(values) for kind, values in phases.items()}
        self.source: PhaseCounts | None = None

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.NAME, "Custom resources by kind and phase", labels=["kind", "phase"])

    def describe(self) -> Iterable[Metric]:
        yield self._family()

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        counts = dict(self.source()) if self.source is not None else {}
        for kind, phases in self.phases.items():
            for phase in phases:
                family.add_metric([kind, phase], counts.get((kind, phase), 0))
        yield family


def count_phases(
    bodies: Iterable[tuple[str, Mapping[str, object]]], phases: Mapping[str, Iterable[str]]
) -> dict[tuple[str, str], int]:
    """(kind, phase) -> count over ``(kind, body)`` pairs; an unknown or missing phase counts as Pending
    (a new resource has no status yet), an unknown kind is skipped."""
    known = {kind: set(values) for kind, values in phases.items()}
    out: dict[tuple[str, str], int] = {}
    for kind, body in bodies:
        if kind not in known:
            continue
        status = body.get("status")
        phase = status.get("phase") if isinstance(status, Mapping) else None
        label = phase if isinstance(phase, str) and phase in known[kind] else "Pending"
        out[(kind, label)] = out.get((kind, label), 0) + 1
    return out


def _phases() -> dict[str, tuple[str, ...]]:
    return {
        training.KIND: get_args(training.Phase),
        deployment.KIND: get_args(deployment.Phase),
    }


RESOURCES = PhaseCollector(_phases())
REGISTRY.register(RESOURCES)
