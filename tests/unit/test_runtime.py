"""The reconcile loop's queue, deadlines and liveness signal; Expectations; the Ray client pool."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import kopf
import pytest

from llmray.builders.observe import PodView
from llmray.controllers.rayconn import Head, PooledRay
from llmray.controllers.runtime import Gate, ReconcileLoop, WorkQueue
from llmray.controllers.store import Expectations
from llmray.ray.endpoints import HeadEndpoints

pytestmark = pytest.mark.unit


async def wait_until(check: object, timeout: float = 2.0) -> None:
    async def poll() -> None:
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


async def test_queue_deduplicates_and_reruns_a_key_added_while_processing() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    q.add("a")
    q.add("b")
    assert len(q) == 2
    key = await q.get()
    assert key == "a"
    q.add("a")  # an event while "a" is being reconciled: not queued twice, not run concurrently
    assert len(q) == 1
    q.done("a")  # ...but once more afterwards
    assert len(q) == 2
    assert [await q.get(), await q.get()] == ["b", "a"]


async def test_delayed_add_keeps_the_earliest_wakeup_and_forget_cancels_it() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add_after("a", 0.05)
    q.add_after("a", 5.0)  # later: ignored
    await asyncio.wait_for(q.get(), 1.0)
    q.done("a")
    q.add_after("b", 0.02)
    q.forget("b")
    await asyncio.sleep(0.05)
    assert len(q) == 0


async def test_loop_retries_with_backoff_and_honours_temporary_error_delay() -> None:
    runs: list[str] = []

    async def reconcile(key: str) -> float | None:
        runs.append(key)
        if len(runs) == 1:
            raise RuntimeError("boom")
        if len(runs) == 2:
            raise kopf.TemporaryError("later", delay=0.01)
        return None

    loop = ReconcileLoop(reconcile, keys=lambda: [], workers=1, resync_seconds=3600, backoff_base=0.01)
    loop.start()
    try:
        loop.queue.add("k")
        await wait_until(lambda: len(runs) >= 3)
    finally:
        await loop.stop()
    assert runs == ["k", "k", "k"]


async def test_stuck_pass_is_abandoned_at_its_deadline_and_retried() -> None:
    """Issue 11: a pass hanging on a slow head is cut off; other keys keep reconciling meanwhile."""
    started: list[str] = []
    done: list[str] = []

    async def reconcile(key: str) -> float | None:
        started.append(key)
        if key == "slow" and started.count("slow") == 1:
            await asyncio.sleep(3600)
        done.append(key)
        return None

    loop = ReconcileLoop(
        reconcile, keys=lambda: [], workers=2, resync_seconds=3600, backoff_base=0.01, pass_timeout=0.1
    )
    loop.start()
    try:
        loop.queue.add("slow")
        await wait_until(lambda: "slow" in started)
        assert loop.stuck_for() > 0
        loop.queue.add("fast")
        await wait_until(lambda: "fast" in done)  # the other worker is free
        await wait_until(lambda: "slow" in done)  # abandoned at 0.1 s, retried, succeeded
    finally:
        await loop.stop()
    assert started.count("slow") == 2
    assert loop.stuck_for() == 0.0


async def test_stuck_for_reports_the_longest_running_pass() -> None:
    release = asyncio.Event()

    async def reconcile(key: str) -> float | None:
        await release.wait()
        return None

    loop = ReconcileLoop(reconcile, keys=lambda: [], workers=1, resync_seconds=3600)
    loop.start()
    try:
        loop.queue.add("k")
        await wait_until(lambda: loop.stuck_for() >= 0.04)  # grows while the pass runs
    finally:
        release.set()
        await loop.stop()


async def test_resync_requeues_every_known_key() -> None:
    seen: list[str] = []

    async def reconcile(key: str) -> float | None:
        seen.append(key)
        return None

    loop = ReconcileLoop(reconcile, keys=lambda: ["a", "b"], workers=1, resync_seconds=0.02)
    loop.start()
    try:
        await wait_until(lambda: {"a", "b"} <= set(seen))
    finally:
        await loop.stop()


def test_gate_never_waits() -> None:
    gate = Gate(2)
    assert gate.try_acquire() and gate.try_acquire()
    assert not gate.try_acquire()
    gate.release()
    assert gate.try_acquire()


def test_expectations_overlay_our_writes_until_the_cache_shows_them() -> None:
    exp = Expectations(ttl=60)
    key = ("LLMTrainingJob", "ns", "x")
    created = PodView(name="x-head", uid="")
    exp.created(key, created)
    assert exp.merge(key, []) == [created]  # the cache lags: our pod is there anyway
    seen = PodView(name="x-head", uid="u1")
    assert exp.merge(key, [seen]) == [seen]  # the cache caught up: no duplicate
    assert exp.pending(key) == 0
    exp.deleted(key, "u1")
    assert exp.merge(key, [seen]) == [replace(seen, deleting=True)]
    assert exp.merge(key, []) == []  # gone from the cache: expectation met
    assert exp.pending(key) == 0


def test_expectations_expire() -> None:
    exp = Expectations(ttl=0)
    key = ("LLMTrainingJob", "ns", "x")
    exp.created(key, PodView(name="p"))
    assert exp.merge(key, []) == []


async def test_ray_clients_are_pooled_per_head_and_closed_when_unused() -> None:
    pool = PooledRay()
    shared = Head(HeadEndpoints("http://127.0.0.1:8265", "http://127.0.0.1:8000", shared=True), "t")
    a, b = ("LLMDeployment", "ns", "a"), ("LLMDeployment", "ns", "b")
    first = pool.client(a, shared)
    assert pool.client(a, shared) is first  # the same connection pool pass after pass
    assert pool.client(b, shared) is first  # and for every resource on a shared head
    assert len(pool) == 1
    pool.forget(a)
    assert len(pool) == 1  # b still uses it
    rotated = Head(shared.endpoints, "t2")
    second = pool.client(b, rotated)
    assert second is not first  # a new token: a new client, the old one dropped
    assert second.http.base_url == first.http.base_url
    assert len(pool) == 1
    await pool.aclose()
    assert len(pool) == 0


async def test_liveness_fails_when_a_pass_is_stuck_past_the_threshold() -> None:
    import kopf

    from llmray.controllers.settings import Settings
    from llmray.operator_main import App, stuck_probe

    release = asyncio.Event()

    async def reconcile(key: str) -> float | None:
        await release.wait()
        return None

    app = App(settings=Settings(stuck_after=0.05))
    app.loop = ReconcileLoop(reconcile, keys=lambda: [], workers=1, resync_seconds=3600)  # type: ignore[arg-type]
    memo = kopf.Memo(app=app)
    assert stuck_probe(memo=memo) == 0.0
    app.loop.start()
    try:
        app.loop.queue.add("k")  # type: ignore[arg-type]
        loop = app.loop
        await wait_until(lambda: loop.stuck_for() > 0.06)
        with pytest.raises(kopf.PermanentError, match="running for"):
            stuck_probe(memo=memo)
    finally:
        release.set()
        await app.loop.stop()
