"""Crash safety: an operator killed mid-reconcile and restarted, or two operators at once, still
make exactly one set of children (deterministic names, never a second head, worker or Secret)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.kube import Kube, wait_for

from .test_operator_fixtures import (
    apply,
    assert_one_set,
    pods_of,
    small_job,
    wait_cluster_ready,
)

pytestmark = pytest.mark.cluster


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
    apply(kube, small_job("big", workers), namespace)
    seen = [_wait_some_workers(kube, namespace, 1)]
    op.kill()  # SIGKILL right after the first pods appeared: most creates are still to come
    for at_least in (seen[-1] + 1, workers // 2):
        op.start()
        seen.append(_wait_some_workers(kube, namespace, at_least))
        op.kill()
    assert min(seen) < workers, f"the kills all came too late to interrupt a reconcile: {seen}"
    op.start()
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "big", workers, timeout=180)
    assert_one_set(kube, namespace, "big", workers)
    # ... and stays so over the next resync passes
    done = op.metric("llmray_reconciles_total", kind="LLMTrainingJob", result="ok")
    wait_for(
        lambda: op.metric("llmray_reconciles_total", kind="LLMTrainingJob", result="ok") >= done + 2,
        timeout=30,
        what="two more reconcile passes",
    )
    assert_one_set(kube, namespace, "big", workers)


def test_two_operators_at_once_make_exactly_one_set(
    kube: Kube, namespace: str, operator_factory: Any
) -> None:
    workers = 40
    first, second = operator_factory(namespace), operator_factory(namespace)
    first.start(wait=False)
    second.start(wait=False)
    wait_for(lambda: first.healthy() and second.healthy(), timeout=60, what="both operators healthy")
    apply(kube, small_job("big", workers), namespace)
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "big", workers, timeout=180)
    assert_one_set(kube, namespace, "big", workers)
