"""The chart's monitoring: ServiceMonitor, PodMonitor and the Grafana dashboard, only when enabled.

``helm template`` only (no API server needed: the Prometheus Operator CRDs are not installed here).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import _bin_dir

from .test_operator_fixtures import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.helm]

CHART = REPO / "charts" / "llmray"
ALL_ON = "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,metrics.dashboard.enabled=true"


@pytest.fixture(scope="module")
def helm() -> Path:
    return _bin_dir() / "helm"


def render(helm: Path, *sets: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = [str(helm), "template", "r", str(CHART), "--namespace", "llmray-system"]
    for value in sets:
        args += ["--set", value]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def docs(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(proc.stdout) if d}


def operator_container(rendered: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return dict(rendered["Deployment"]["spec"]["template"]["spec"]["containers"][0])


def test_monitoring_is_absent_by_default(helm: Path) -> None:
    rendered = docs(render(helm))
    assert not {"ServiceMonitor", "PodMonitor", "ConfigMap"} & set(rendered)
    container = operator_container(rendered)
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    assert not [a for a in container["args"] if a.startswith("--metrics-scraper")]


def test_monitors_and_dashboard_render_when_enabled(helm: Path) -> None:
    rendered = docs(render(helm, ALL_ON, "metrics.serviceMonitor.labels.release=kps"))
    monitor = rendered["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    service = rendered["Service"]
    assert service["spec"]["ports"][0]["name"] == "metrics"
    assert all(
        service["metadata"]["labels"].get(k) == v
        for k, v in monitor["spec"]["selector"]["matchLabels"].items()
    )

    pods = rendered["PodMonitor"]["spec"]
    assert pods["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "llmray-operator"}
    assert pods["namespaceSelector"] == {"any": True}
    assert pods["podMetricsEndpoints"][0]["port"] == "metrics"  # the Ray pods' port 8080
    # The Ray clusters' NetworkPolicies admit the monitoring namespace on the metrics port.
    assert "--metrics-scraper-namespace=monitoring" in operator_container(rendered)["args"]

    dashboard = rendered["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dashboard["data"]["llmray.json"])
    assert board["uid"] == "llmray-overview"
    assert board == json.loads((CHART / "dashboards" / "llmray.json").read_text())


def test_pod_monitor_follows_watched_namespaces(helm: Path) -> None:
    rendered = docs(render(helm, "metrics.podMonitor.enabled=true", "watchNamespaces={a,b}"))
    assert rendered["PodMonitor"]["spec"]["namespaceSelector"] == {"matchNames": ["a", "b"]}


def test_service_monitor_needs_the_metrics_service(helm: Path) -> None:
    proc = render(helm, "metrics.serviceMonitor.enabled=true,metrics.service.enabled=false", check=False)
    assert proc.returncode != 0 and "needs metrics.enabled and metrics.service.enabled" in proc.stderr
