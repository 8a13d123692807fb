"""Leader election: the pure decision (fake clock), the elector against an in-memory Lease API that
enforces resourceVersion like the API server, and the reconcile loop halting on lost leadership."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from llmray.controllers.runtime import ReconcileLoop
from llmray.leader import Decision, ElectionConfig, LeaderElector, LeaseRecord, decide

pytestmark = pytest.mark.unit

WALL = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def record(holder: str | None, rv: str = "1", duration: float = 15, transitions: int = 3) -> LeaseRecord:
    return LeaseRecord(holder, duration, "2026-01-01T11:00:00.000000Z", transitions, rv)


def run_decide(observed: LeaseRecord | None, observed_at: float, now: float, me: str = "me") -> Decision:
    return decide(observed, observed_at=observed_at, now=now, wall=WALL, identity=me, lease_duration=15)


def test_acquires_when_no_lease_exists() -> None:
    d = run_decide(None, 0, 0)
    assert d.action == "acquire"
    assert d.spec == {
        "holderIdentity": "me",
        "leaseDurationSeconds": 15,
        "renewTime": "2026-01-01T12:00:00.000000Z",
        "acquireTime": "2026-01-01T12:00:00.000000Z",
        "leaseTransitions": 0,
    }


def test_renews_its_own_lease_keeping_acquire_time_and_transitions() -> None:
    d = run_decide(record("me"), observed_at=0, now=100)  # even when "expired": it is ours
    assert d.action == "renew"
    assert d.spec is not None
    assert d.spec["acquireTime"] == "2026-01-01T11:00:00.000000Z"
    assert d.spec["leaseTransitions"] == 3
    assert d.spec["renewTime"] == "2026-01-01T12:00:00.000000Z"


def test_stands_by_while_another_holder_is_unexpired_then_takes_over() -> None:
    other = record("other", duration=15)
    assert run_decide(other, observed_at=10, now=10).action == "standby"
    assert run_decide(other, observed_at=10, now=24.9).action == "standby"
    d = run_decide(other, observed_at=10, now=25.0)
    assert d.action == "acquire"
    assert d.spec is not None and d.spec["holderIdentity"] == "me" and d.spec["leaseTransitions"] == 4


def test_uses_the_lease_own_duration_not_ours() -> None:
    assert run_decide(record("other", duration=60), observed_at=0, now=30).action == "standby"
    assert run_decide(record("other", duration=5), observed_at=0, now=6).action == "acquire"


def test_acquires_a_released_lease_at_once() -> None:
    assert run_decide(record(None), observed_at=0, now=0).action == "acquire"


def test_lease_record_parses_the_api_shape() -> None:
    lease = {
        "metadata": {"resourceVersion": "42"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15, "leaseTransitions": 2},
    }
    assert LeaseRecord.of(lease) == LeaseRecord("a", 15.0, None, 2, "42")
    assert LeaseRecord.of({"metadata": {}}).holder is None


def test_config_refuses_timings_that_could_overlap_two_leaders() -> None:
    with pytest.raises(ValueError, match="renew-deadline"):
        ElectionConfig("l", "ns", "me", lease_duration=10, renew_deadline=10, retry_period=2)


# --- the elector against a fake API server --------------------------------------------------------


class FakeLeases:
    """Lease storage with the API server's optimistic concurrency (409 on a stale resourceVersion)."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 0
        self.down = False
        self.writes = 0
        self.api_client = self

    def sanitize_for_serialization(self, obj: Any) -> Any:
        return obj

    def _check(self) -> None:
        if self.down:
            raise ApiException(status=503, reason="Service Unavailable")

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> dict[str, Any]:
        self._check()
        if self.lease is None:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.lease)

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        self.writes += 1
        self.lease = {"metadata": {"name": "l", "resourceVersion": str(self.rv)}, "spec": dict(body["spec"])}
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace: str, body: dict[str, Any], **_: Any) -> dict[str, Any]:
        self._check()
        if self.lease is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        return self._store(body)

    def replace_namespaced_lease(
        self, name: str, namespace: str, body: dict[str, Any], **_: Any
    ) -> dict[str, Any]:
        self._check()
        assert self.lease is not None
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")
        return self._store(body)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def elector(api: FakeLeases, clock: Clock, identity: str, log: list[str]) -> LeaderElector:
    cfg = ElectionConfig("l", "ns", identity, lease_duration=15, renew_deadline=10, retry_period=2)
    e = LeaderElector(
        client.ApiClient(),
        cfg,
        on_started=lambda: log.append(f"{identity}+"),
        on_stopped=lambda: log.append(f"{identity}-"),
        clock=clock,
    )
    e.api = api  # type: ignore[assignment]
    return e


async def test_exactly_one_of_two_candidates_leads_and_the_standby_takes_over_after_expiry() -> None:
    api, clock, log = FakeLeases(), Clock(), []
    a, b = elector(api, clock, "a", log), elector(api, clock, "b", log)
    await a.step()
    await b.step()
    assert (a.leading, b.leading) == (True, False)
    for _ in range(10):  # a renews every retry period; b never gets it
        clock.now += 2
        await a.step()
        await b.step()
        assert (a.leading, b.leading) == (True, False)
    # a dies (no more renewals): b waits one lease duration from the last change it saw
    died = clock.now
    while not b.leading:
        clock.now += 0.5
        await b.step()
        assert clock.now - died < 20
    assert 15 <= clock.now - died <= 15.5
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == "b"
    assert api.lease["spec"]["leaseTransitions"] == 1
    # a comes back (e.g. a paused process): it sees b holding and stays standby / stops
    await a.step()
    assert (a.leading, b.leading) == (False, True)
    assert log == ["a+", "a-", "b+"] or log == ["a+", "b+", "a-"]


async def test_racing_writers_only_one_wins_on_resource_version() -> None:
    api, clock, log = FakeLeases(), Clock(), []
    await elector(api, clock, "a", log).step()
    clock.now = 100.0  # both consider a's lease expired; a is gone
    a2, c = elector(api, clock, "x", log), elector(api, clock, "y", log)
    # Both read the same record, then both write: the second write carries a stale resourceVersion.
    seen_x, seen_y = await a2._read(), await c._read()
    assert seen_x == seen_y
    a2._seen = c._seen = (seen_x.identity if seen_x else (), 0.0)
    real_read = api.read_namespaced_lease
    api.read_namespaced_lease = lambda *a_, **k: copy.deepcopy(stale)  # type: ignore[method-assign]
    stale = real_read("l", "ns")
    assert await a2.try_once() is True
    assert await c.try_once() is False  # 409 Conflict: stays standby
    api.read_namespaced_lease = real_read  # type: ignore[method-assign]
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == "x"


async def test_create_race_loser_stays_standby() -> None:
    api, clock, log = FakeLeases(), Clock(), []
    a, b = elector(api, clock, "a", log), elector(api, clock, "b", log)
    real_read = api.read_namespaced_lease

    def not_found(*_: Any, **__: Any) -> Any:
        raise ApiException(status=404, reason="Not Found")

    api.read_namespaced_lease = not_found  # type: ignore[method-assign]
    assert await a.try_once() is True
    assert await b.try_once() is False  # 409 AlreadyExists
    api.read_namespaced_lease = real_read  # type: ignore[method-assign]


async def test_leader_stops_after_the_renew_deadline_without_the_api() -> None:
    api, clock, log = FakeLeases(), Clock(), []
    a = elector(api, clock, "a", log)
    await a.step()
    assert a.leading
    api.down = True
    clock.now += 9.9
    await a.step()
    assert a.leading  # within the renew deadline a failed renewal is retried
    clock.now += 0.2
    await a.step()
    assert not a.leading and log == ["a+", "a-"]


async def test_stop_releases_the_lease_so_a_standby_acquires_at_once() -> None:
    api, clock, log = FakeLeases(), Clock(), []
    a, b = elector(api, clock, "a", log), elector(api, clock, "b", log)
    await a.step()
    await b.step()
    await a.stop()
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] is None
    await b.step()
    assert b.leading


async def test_halted_loop_consumes_nothing_and_resumes_on_start() -> None:
    done: list[str] = []
    started = asyncio.Event()
    release = asyncio.Event()

    async def reconcile(key: str) -> None:
        started.set()
        await release.wait()
        done.append(key)

    loop: ReconcileLoop[str] = ReconcileLoop(reconcile, keys=lambda: [], workers=1, resync_seconds=3600)
    loop.queue.add("a")
    loop.start()
    await asyncio.wait_for(started.wait(), 1)
    loop.halt()  # leadership lost mid-pass: the pass is cancelled, nothing completes
    assert not loop.running
    release.set()
    loop.queue.add("b")
    await asyncio.sleep(0.05)
    assert done == []
    loop.start()
    await asyncio.wait_for(_until(lambda: done == ["b"]), 1)
    await loop.stop()


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.005)


def test_cli_flags_build_the_election_settings() -> None:
    from llmray.cli import build_parser, settings_from_args

    def settings(*argv: str, env: dict[str, str] | None = None) -> Any:
        args = build_parser().parse_args(["operator", *argv])
        return settings_from_args(args, env or {}).leader_election

    assert settings() is None  # off by default: the sandbox and the tests run one operator
    cfg = settings("--leader-elect", "--operator-namespace", "ops", env={"POD_NAME": "op-0"})
    assert cfg == ElectionConfig("llmray-operator", "ops", "op-0", 15.0, 10.0, 2.0)
    cfg = settings("--leader-elect", "--lease-name", "x", "--lease-namespace", "y", "--lease-duration", "30")
    assert (cfg.name, cfg.namespace, cfg.lease_duration) == ("x", "y", 30.0)
    assert cfg.identity  # hostname_pid outside a pod
    with pytest.raises(ValueError, match="lease-namespace"):
        settings("--leader-elect")
    with pytest.raises(ValueError, match="renew-deadline"):
        settings("--leader-elect", "--lease-namespace", "y", "--renew-deadline", "20")
