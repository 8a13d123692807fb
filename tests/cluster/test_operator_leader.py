"""Leader election: two operators against one control plane, the leader killed with SIGKILL.

Exactly one of them reconciles; the standby takes over once the Lease has not been renewed for
its duration, no child is ever made twice, and the resources keep reconciling under the new leader.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client

from tests.kube import Kube, wait_for

from .test_operator_fixtures import (
    apply,
    assert_one_set,
    pods_of,
    running_ready,
    small_job,
    wait_cluster_ready,
)

pytestmark = pytest.mark.cluster

LEASE = "llmray-test-leader"
DURATION, RENEW, RETRY = 15.0, 10.0, 2.0  # the chart's defaults
TAKEOVER_BOUND = DURATION + 2 * RETRY + 3  # lease duration + two retry periods (jittered) + slack


def _holder(kube: Kube, namespace: str) -> str | None:
    try:
        lease = client.CoordinationV1Api(kube.api_client).read_namespaced_lease(LEASE, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return lease.spec.holder_identity


def _delete_a_worker_and_see_it_replaced(kube: Kube, namespace: str, name: str) -> None:
    """Only a reconciling (leading) operator brings a deleted worker back."""
    victim = pods_of(kube, namespace, name, "worker")[0]
    client.CoreV1Api(kube.api_client).delete_namespaced_pod(victim.metadata.name, namespace)

    def replaced() -> bool:
        workers = pods_of(kube, namespace, name, "worker")
        back = victim.metadata.uid not in {p.metadata.uid for p in workers} and len(workers) == 2
        return back and all(running_ready(p) for p in workers)

    wait_for(replaced, timeout=60, what=f"the deleted worker of {name} replaced by the leader")


def test_standby_takes_over_within_the_lease_duration_with_one_set_of_children(
    kube: Kube, namespace: str, operator_factory: Any
) -> None:
    flags = (
        "--leader-elect", "--lease-name", LEASE, "--lease-namespace", namespace,
        "--lease-duration", str(DURATION), "--renew-deadline", str(RENEW), "--retry-period", str(RETRY),
    )  # fmt: skip
    first = operator_factory(namespace, *flags, env={"POD_NAME": "op-a"}).start()
    wait_for(lambda: _holder(kube, namespace) == "op-a", timeout=30, what="op-a holds the Lease")
    second = operator_factory(namespace, *flags, env={"POD_NAME": "op-b"}).start()  # healthy as standby
    assert second.metric("llmray_leader") == 0 and first.metric("llmray_leader") == 1

    names = ["lead-1", "lead-2", "lead-3"]
    for name in names:
        apply(kube, small_job(name), namespace)
    for name in names:
        wait_cluster_ready(kube, "LLMTrainingJob", namespace, name, 2, timeout=120)
    assert second.metric("llmray_reconciles_total") == 0, "the standby reconciled"
    assert _holder(kube, namespace) == "op-a"

    first.kill()
    killed = time.monotonic()
    wait_for(
        lambda: _holder(kube, namespace) == "op-b" and second.metric("llmray_leader") == 1,
        timeout=TAKEOVER_BOUND + 10,
        interval=0.1,
        what="op-b takes the Lease over",
    )
    takeover = time.monotonic() - killed
    print(f"takeover after SIGKILL of the leader: {takeover:.1f}s (lease duration {DURATION:g}s)")
    assert takeover <= TAKEOVER_BOUND, takeover

    # the new leader reconciles: a deleted worker comes back, a new resource gets its cluster
    wait_for(
        lambda: second.metric("llmray_reconciles_total", result="ok") > 0, timeout=30, what="op-b passes"
    )
    _delete_a_worker_and_see_it_replaced(kube, namespace, "lead-1")
    apply(kube, small_job("lead-4"), namespace)
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "lead-4", 2, timeout=120)
    for name in [*names, "lead-4"]:
        assert_one_set(kube, namespace, name, 2)

    # the old leader comes back: it stays standby, still one set of children
    first.start()
    done = second.metric("llmray_reconciles_total", result="ok")
    wait_for(
        lambda: second.metric("llmray_reconciles_total", result="ok") >= done + 8,
        timeout=30,
        what="a resync under op-b",
    )
    assert first.metric("llmray_leader") == 0 and first.metric("llmray_reconciles_total") == 0
    assert _holder(kube, namespace) == "op-b"
    for name in [*names, "lead-4"]:
        assert_one_set(kube, namespace, name, 2)


def test_a_leader_shut_down_cleanly_hands_over_at_once(
    kube: Kube, namespace: str, operator_factory: Any
) -> None:
    """A rolling update: SIGTERM releases the Lease, the standby acquires it at its next read."""
    flags = ("--leader-elect", "--lease-name", LEASE, "--lease-namespace", namespace)
    first = operator_factory(namespace, *flags, env={"POD_NAME": "op-a"}).start()
    wait_for(lambda: _holder(kube, namespace) == "op-a", timeout=30, what="op-a holds the Lease")
    second = operator_factory(namespace, *flags, env={"POD_NAME": "op-b"}).start()
    assert second.metric("llmray_leader") == 0
    apply(kube, small_job("roll"), namespace)
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "roll", 2, timeout=120)
    stopping = time.monotonic()
    first.stop()
    wait_for(
        lambda: _holder(kube, namespace) == "op-b", timeout=15, interval=0.1, what="op-b holds the Lease"
    )
    handover = time.monotonic() - stopping
    print(f"handover after SIGTERM of the leader: {handover:.1f}s")
    assert handover < DURATION, handover  # released, not expired
    _delete_a_worker_and_see_it_replaced(kube, namespace, "roll")
    assert_one_set(kube, namespace, "roll", 2)
    assert second.metric("llmray_leader") == 1
