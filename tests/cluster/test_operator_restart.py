"""Crash safety: an operator killed mid-reconcile and restarted, or two operators at once, still
make exactly one set of children (deterministic names, never a second head, worker or Secret)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from tests.kube import Kube, wait_for

from .test_operator_fixtures import (
    apply,
    crds_fixture,  # noqa: F401 - fixture
    example,
    operator_factory_fixture,  # noqa: F401 - fixture
    owned_children,
    pods_of,
    wait_cluster_ready,
)

pytestmark = pytest.mark.cluster


def _big_job(workers: int) -> dict[str, Any]:
    (job,) = example("training-tiny-cpu.yaml")
    job["metadata"]["name"] = "big"
    job["spec"]["workers"] = {"replicas": workers, "resources": {"cpu": "10m", "memory": "16Mi"}}
    job["spec"]["head"] = {"resources": {"cpu": "10m", "memory": "16Mi"}}
    return job


def _assert_one_set(kube: Kube, namespace: str, workers: int) -> None:
    children = owned_children(kube, namespace, "big")
    assert sorted(children["services"]) == ["big-head"]
    assert children["secrets"] == ["big-ray-auth"]
    pods = (
        client.CoreV1Api(kube.api_client)
        .list_namespaced_pod(namespace, label_selector="app.kubernetes.io/instance=big")
        .items
    )
    heads = [p for p in pods if p.metadata.labels["ray.io/node-type"] == "head"]
    worker_pods = [p for p in pods if p.metadata.labels["ray.io/node-type"] == "worker"]
    assert len(heads) == 1
    assert len(worker_pods) == workers, sorted(p.metadata.name for p in worker_pods)
    assert len({p.metadata.name for p in worker_pods}) == workers
    assert len({p.metadata.labels["llmray.io/worker-index"] for p in worker_pods}) == workers
    assert all(p.metadata.deletion_timestamp is None for p in pods)


def _wait_some_workers(kube: Kube, namespace: str, at_least: int) -> int:
    return wait_for(
        lambda: (
            len(pods_of(kube, namespace, "big", "worker")) >= at_least
            and len(pods_of(kube, namespace, "big", "worker"))
        ),
        timeout=60,
        interval=0.02,
        what=f"at least {at_least} worker pods",
    )


def test_killed_mid_reconcile_and_restarted_makes_exactly_one_set(
    kube: Kube, namespace: str, operator_factory: Any
) -> None:
    workers = 120
    op = operator_factory(namespace)
    op.start()
    apply(kube, _big_job(workers), namespace)
    seen = [_wait_some_workers(kube, namespace, 1)]
    op.kill()  # SIGKILL right after the first pods appeared: most creates are still to come
    for at_least in (seen[-1] + 1, workers // 2):
        op.start()
        seen.append(_wait_some_workers(kube, namespace, at_least))
        op.kill()
    assert min(seen) < workers, f"the kills all came too late to interrupt a reconcile: {seen}"
    op.start()
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "big", workers, timeout=180)
    _assert_one_set(kube, namespace, workers)
    # ... and stays so over the next resync passes
    done = op.metric("llmray_reconciles_total", kind="LLMTrainingJob", result="ok")
    wait_for(
        lambda: op.metric("llmray_reconciles_total", kind="LLMTrainingJob", result="ok") >= done + 2,
        timeout=30,
        what="two more reconcile passes",
    )
    _assert_one_set(kube, namespace, workers)


def test_two_operators_at_once_make_exactly_one_set(
    kube: Kube, namespace: str, operator_factory: Any
) -> None:
    workers = 40
    first, second = operator_factory(namespace), operator_factory(namespace)
    first.start(wait=False)
    second.start(wait=False)
    wait_for(lambda: first.healthy() and second.healthy(), timeout=60, what="both operators healthy")
    apply(kube, _big_job(workers), namespace)
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "big", workers, timeout=180)
    _assert_one_set(kube, namespace, workers)
