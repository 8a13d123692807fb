"""Worker pods are matched to Ray nodes by pod IP, which is how idle workers get found on a cluster."""

from __future__ import annotations

import pytest

from llmray.autoscaling import worker_states
from llmray.builders.observe import PodView
from llmray.ray import RayNode

pytestmark = pytest.mark.unit


def test_pod_view_reads_the_pod_ip() -> None:
    pod = PodView.of({"metadata": {"name": "d-worker-gpu-abcde"}, "status": {"podIP": "10.0.3.7"}})
    assert pod.pod_ip == "10.0.3.7"
    assert PodView.of({"metadata": {"name": "x"}}).pod_ip == ""


def test_worker_with_a_ray_node_on_its_ip_reports_that_nodes_idle_time() -> None:
    nodes = [
        RayNode(node_id="h", ip="10.0.0.1", is_head=True, alive=True, idle_seconds=0.0, start_time_s=0.0),
        RayNode(node_id="w", ip="10.0.3.7", is_head=False, alive=True, idle_seconds=90.0, start_time_s=0.0),
    ]
    states = worker_states(
        [("d-worker-gpu-abcde", "10.0.3.7"), ("d-worker-gpu-fghij", None)], nodes, now=1000.0
    )
    assert states[0].in_ray and states[0].idle_seconds == 90.0
    assert not states[1].in_ray and states[1].idle_seconds is None
