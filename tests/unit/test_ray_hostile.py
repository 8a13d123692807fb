"""Hostile Ray heads on loopback: every call ends by its deadline, memory stays bounded, the
event loop keeps running, and absurd numbers become decisions, not exceptions.

The head is a raw-socket server in threads (``hostile_head``): 200 MB bodies, gzip bombs, one byte
per second for ever, counts of 1e18 and ``Infinity``/``NaN`` in cluster status. Figures are printed
(run with ``-s``) so they can be quoted.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest

from llmray.autoscaling import WorkerState, decide
from llmray.ray import (
    NO_RETRY,
    GangDemand,
    RayAPIError,
    RayBadResponse,
    RayClient,
    RayDeadlineExceeded,
    RayHeadUnavailable,
    RayResponseTooLarge,
    ResourceDemand,
    RetryPolicy,
    pooled_client,
)
from llmray.ray.cluster import MAX_COUNT

from .hostile_head import MB, HostileHead, big_body, endless_headers, gzip_bomb, json_body, send, trickle

pytestmark = pytest.mark.unit

T = TypeVar("T")
DEADLINE = 2.0
SLACK = 0.75  # scheduling on a loaded 2-core machine; the point is "ends", not "ends at 2.000 s"
MEMORY_LIMIT = 10 * MB
GPU_WORKER = {"CPU": 8.0, "GPU": 1.0, "memory": 64.0 * 2**30}


@pytest.fixture
def head() -> Any:
    with HostileHead() as h:
        yield h


def ray(head: HostileHead, **kwargs: Any) -> RayClient:
    kwargs.setdefault("deadline_s", DEADLINE)
    kwargs.setdefault("retry", RetryPolicy(attempts=3, backoff_s=0.05))
    return RayClient(head.url, "token", **kwargs)


class Ticker:
    """A task that counts 10 ms ticks: if a call blocks the event loop, the count stalls."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.ticks += 1

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def measured(call: Callable[[], Awaitable[T]]) -> tuple[BaseException | T, float, int, int]:
    """Run ``call``; return (result or exception, seconds, peak bytes allocated meanwhile, ticks)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    start = time.monotonic()
    outcome: BaseException | T
    async with Ticker() as ticker:
        try:
            outcome = await call()
        except Exception as exc:
            outcome = exc
    elapsed = time.monotonic() - start
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return outcome, elapsed, peak, ticker.ticks


def report(what: str, elapsed: float, peak: int, ticks: int) -> None:
    print(f"\n[hostile] {what}: {elapsed:.2f} s, peak +{peak / MB:.2f} MiB, {ticks} loop ticks")


def assert_loop_ran(elapsed: float, ticks: int) -> None:
    # 10 ms ticks: at least a third of them must have run (a blocked loop gets ~0).
    assert ticks >= max(1, int(elapsed / 0.01 / 3)), f"event loop stalled: {ticks} ticks in {elapsed:.2f}s"


def timed(call: Callable[[], T]) -> tuple[T, float]:
    """``call()`` and the CPU seconds it took (this process's CPU time: other jobs on a shared
    machine do not count), the best of three runs."""
    best = math.inf
    for _ in range(3):
        start = time.process_time()
        result = call()
        best = min(best, time.process_time() - start)
    return result, best


# --- deadlines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("in_headers", [False, True], ids=["body", "status-line"])
async def test_trickling_head_is_cut_off_at_the_deadline(head: HostileHead, in_headers: bool) -> None:
    head.routes["/api/cluster_status"] = trickle(in_headers=in_headers)
    async with ray(head) as client:
        outcome, elapsed, peak, ticks = await measured(client.cluster.status)
    report(f"trickle in {'status line' if in_headers else 'body'}", elapsed, peak, ticks)
    assert isinstance(outcome, RayDeadlineExceeded) and isinstance(outcome, RayHeadUnavailable)
    assert outcome.status_reason == "RayHeadTimeout" and "within 2s" in str(outcome)
    assert "token" not in str(outcome)
    assert DEADLINE - 0.1 <= elapsed < DEADLINE + SLACK
    assert_loop_ran(elapsed, ticks)


async def test_eight_trickling_heads_at_once_end_together_and_the_loop_runs(head: HostileHead) -> None:
    """The issue's failure: 8 stuck heads held every reconcile worker for ever."""
    head.routes["/api/cluster_status"] = trickle()
    clients = [ray(head) for _ in range(8)]

    async def all_of_them() -> list[Any]:
        return await asyncio.gather(*(c.cluster.status() for c in clients), return_exceptions=True)

    outcome, elapsed, peak, ticks = await measured(all_of_them)
    for c in clients:
        await c.aclose()
    report("8 trickling heads concurrently", elapsed, peak, ticks)
    assert isinstance(outcome, list) and all(isinstance(o, RayDeadlineExceeded) for o in outcome)
    assert elapsed < DEADLINE + SLACK
    assert_loop_ran(elapsed, ticks)


async def test_submit_has_its_own_longer_deadline_but_still_one(head: HostileHead) -> None:
    head.routes["/api/jobs/"] = trickle()
    async with ray(head) as client:
        client.http.deadline_s = 1.0  # the default deadline does not apply to a submit...
        start = time.monotonic()
        task = asyncio.create_task(client.jobs.submit("e", submission_id="s"))
        await asyncio.sleep(1.5)
        assert not task.done()  # ...it has SUBMIT_DEADLINE_S (120 s): still waiting, not failed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert time.monotonic() - start < 3


# --- size caps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("declare_length", [False, True], ids=["streamed", "content-length"])
async def test_200_mb_answer_is_refused_at_the_cap_without_buffering(
    head: HostileHead, declare_length: bool
) -> None:
    head.routes["/api/cluster_status"] = big_body(200 * MB, declare_length=declare_length)
    async with ray(head) as client:
        outcome, elapsed, peak, ticks = await measured(client.cluster.status)
    report(f"200 MB body ({'declared' if declare_length else 'streamed'})", elapsed, peak, ticks)
    assert isinstance(outcome, RayResponseTooLarge), outcome
    assert outcome.limit == 4 * MB and outcome.status_reason == "RayResponseTooLarge"
    assert head.requests.count("/api/cluster_status") == 1  # not retried: it would be again
    assert peak < MEMORY_LIMIT
    assert elapsed < DEADLINE


async def test_gzip_bomb_is_refused_at_the_cap(head: HostileHead) -> None:
    head.routes["/nodes"] = gzip_bomb(200 * MB)  # ~200 KB on the wire, 200 MB inflated
    async with ray(head) as client:
        outcome, elapsed, peak, ticks = await measured(client.cluster.nodes)
    report("gzip bomb (200 MB inflated)", elapsed, peak, ticks)
    assert isinstance(outcome, RayResponseTooLarge)
    assert peak < MEMORY_LIMIT
    assert elapsed < DEADLINE


async def test_error_body_of_200_mb_is_read_only_to_its_first_64_kib(head: HostileHead) -> None:
    def huge_error(h: HostileHead, sock: Any) -> None:
        sock.sendall(b"HTTP/1.1 400 Bad\r\nConnection: close\r\n\r\n")
        for _ in range(200 * 16):
            sock.sendall(b"e" * (64 * 1024))

    head.routes["/api/jobs/x"] = huge_error
    async with ray(head) as client:
        outcome, elapsed, peak, _ = await measured(lambda: client.jobs.get("x"))
    assert type(outcome) is RayAPIError and "HTTP 400" in str(outcome)
    assert len(getattr(outcome, "body", "")) == 64 * 1024
    assert peak < MEMORY_LIMIT and elapsed < DEADLINE


async def test_endless_headers_are_refused_by_the_http_parser(head: HostileHead) -> None:
    head.routes["/api/cluster_status"] = endless_headers
    async with ray(head) as client:
        outcome, elapsed, peak, _ = await measured(client.cluster.status)
    report("endless header lines", elapsed, peak, 0)
    assert isinstance(outcome, RayHeadUnavailable)  # h11 refuses a header block over its limit
    assert peak < MEMORY_LIMIT and elapsed < DEADLINE + SLACK


async def test_log_tail_of_a_200_mb_log_keeps_only_its_end(head: HostileHead) -> None:
    lines = b"".join(b'LLMRAY_PROGRESS {"step": %d}\n' % i for i in range(2000))
    block = lines[: lines.rindex(b"\n", 0, 64 * 1024) + 1]  # whole lines, ~64 KiB
    head.routes["/api/v0/logs/file"] = big_body(200 * MB // len(block) * len(block), block=block)
    async with ray(head, deadline_s=60.0) as client:
        outcome, elapsed, peak, ticks = await measured(
            lambda: client.jobs.tail("s", lines=120, driver_node_id="n1")
        )
    report("log tail of a 200 MB log (head ignores lines=120)", elapsed, peak, ticks)
    assert isinstance(outcome, str), outcome
    assert outcome.endswith(block.decode().splitlines(keepends=True)[-1])
    assert len(outcome.splitlines()) == 120 and len(outcome.encode()) <= 64 * 1024
    assert "/api/jobs/s/logs" not in head.requests  # never the whole log
    assert peak < MEMORY_LIMIT
    assert_loop_ran(elapsed, ticks)


async def test_whole_log_is_capped(head: HostileHead) -> None:
    head.routes["/api/jobs/s/logs"] = big_body(200 * MB)
    async with ray(head) as client:
        outcome, _, peak, _ = await measured(lambda: client.jobs.logs("s", max_bytes=MB))
    assert isinstance(outcome, RayResponseTooLarge) and outcome.limit == MB
    assert peak < MEMORY_LIMIT


async def test_millions_of_tiny_json_values_are_refused_before_decoding(head: HostileHead) -> None:
    """4 MiB of ``[],`` is under the size cap but would decode to ~1.4 M lists (~90 MB)."""
    body = b"[" + b"[]," * (4 * MB // 3 - 2) + b"[]]"
    head.routes["/api/cluster_status"] = lambda h, sock: send(sock, 200, body)
    async with ray(head) as client:
        outcome, elapsed, peak, _ = await measured(client.cluster.status)
    report("4 MiB of empty JSON lists", elapsed, peak, 0)
    assert isinstance(outcome, RayBadResponse) and "JSON values" in str(outcome)
    assert peak < MEMORY_LIMIT


async def test_deeply_nested_and_huge_integer_json_are_bad_responses(head: HostileHead) -> None:
    nested = b"[" * 500_000 + b"]" * 500_000
    huge_int = b'{"submission_id": "x", "status": "RUNNING", "start_time": 1' + b"0" * 5000 + b"}"
    head.routes["/api/version"] = lambda h, sock: send(sock, 200, nested)
    head.routes["/api/jobs/x"] = lambda h, sock: send(sock, 200, huge_int)
    head.routes["/api/jobs/y"] = json_body([1, 2, 3])
    async with ray(head) as client:
        with pytest.raises(RayBadResponse, match="not JSON"):
            await client.version()
        with pytest.raises(RayBadResponse, match="not JSON"):
            await client.jobs.get("x")
        with pytest.raises(RayBadResponse, match="JSON object"):
            await client.jobs.get("y")


# --- untrusted numbers -------------------------------------------------------------------------

INF, NAN = math.inf, math.nan
HOSTILE_STATUS = {
    "data": {
        "clusterStatus": {
            "loadMetricsReport": {
                "resourceDemand": [
                    [{"CPU": 1}, 1e18],
                    [{"CPU": 1}, INF],
                    [{"CPU": 1}, "inf"],
                    [{"CPU": 1}, NAN],
                    [{"CPU": 1}, -5],
                    [{"GPU": INF}, 3],
                    [{"GPU": "inf"}, 3],
                    [{"CPU": NAN}, 2],
                    [{"CPU": -1, "GPU": 1}, 10**18],
                    [{"memory": 1e18}, 1],
                    [{"CPU": "1e400"}, 1],
                    *([{"CPU": 0.5, f"custom{i}": 1}, 10**18] for i in range(1000)),
                ],
                "pgDemand": [
                    [{"bundles": [[{"GPU": 1}, 1e18]], "strategy": "PACK"}, 1e18],
                    [{"bundles": [{"CPU": 0.0001}], "strategy": "STRICT_SPREAD"}, INF],
                    [{"bundles": [{"CPU": 0.0001}] * 50, "strategy": "PACK"}, 10**18],
                    [{"bundles": [[{"CPU": 1}, 10**18]], "strategy": "STRICT_PACK"}, 3],
                    [{"bundles": [{"GPU": NAN}], "strategy": "PACK"}, NAN],
                ],
                "requestDemand": [[{"CPU": 1}, 10**18]],
                "usage": {"CPU": [INF, NAN], "GPU": [1e18, -1]},
            },
            "autoscalerReport": {"idleNodes": list(range(100_000))},
        }
    }
}


async def test_hostile_cluster_status_parses_bounded_and_decides_fast(head: HostileHead) -> None:
    head.routes["/api/cluster_status"] = json_body(HOSTILE_STATUS)
    async with ray(head) as client:
        outcome, elapsed, peak, ticks = await measured(client.cluster.status)
    report("hostile cluster_status (1e18, Infinity, NaN, 1000 shapes)", elapsed, peak, ticks)
    assert not isinstance(outcome, BaseException), outcome
    status = outcome
    counts = [d.count for d in (*status.demand, *status.requested, *(g for g in status.gang_demand))]
    assert counts and all(0 < c <= MAX_COUNT for c in counts)
    assert len(status.demand) <= 256
    for d in status.demand:
        assert all(math.isfinite(v) and v > 0 for v in d.shape.values())
    assert {"GPU": 1e18} in [d.shape for d in status.demand]  # inf stays a (hopeless) demand
    assert all(math.isfinite(v) for v in (*status.total.values(), *status.used.values()))
    assert status.idle_nodes is not None and len(status.idle_nodes) <= 10_000

    workers = [WorkerState(f"w{i}", in_ray=True) for i in range(8)]
    demand = [*status.demand, *status.requested]
    for max_replicas in (16, 1024):
        run = functools.partial(
            decide, demand, GPU_WORKER, workers, min_replicas=0, max_replicas=max_replicas,
            idle_timeout_s=60, gangs=status.gang_demand,
        )  # fmt: skip
        decision, took = timed(run)
        print(f"\n[hostile] decide() on it, maxReplicas={max_replicas}: {took * 1000:.1f} ms CPU")
        print(f"[hostile]   reason: {decision.reason[:300]}")
        assert took < 0.05
        assert decision.desired <= max_replicas and decision.unmet > 0
        assert {"GPU": 1e18} in [dict(s) for s in decision.infeasible]
        assert len(decision.reason) < 1000 and "more" in decision.reason


@pytest.mark.parametrize("max_replicas", [4, 1024])
def test_decide_with_hostile_counts_directly_is_fast_and_exact_enough(max_replicas: int) -> None:
    tiny = {"CPU": 0.0001}
    demand = [
        ResourceDemand({"CPU": 1}, 10**18),
        ResourceDemand({"GPU": 1}, 10**18),
        ResourceDemand({"GPU": INF}, 10**18),
        ResourceDemand({"CPU": NAN}, 5),
        ResourceDemand({"CPU": -INF, "GPU": 1}, 1),
        ResourceDemand(tiny, -(10**18)),
        *(ResourceDemand({"CPU": 0.001 * (i + 1)}, 10**18) for i in range(200)),
    ]
    gangs = [
        GangDemand((ResourceDemand(tiny, 1),), "PACK", 10**18),
        GangDemand((ResourceDemand(tiny, 1),), "STRICT_SPREAD", 10**18),
        GangDemand((ResourceDemand({"GPU": 1}, 10**18),), "STRICT_PACK", 10**18),
        GangDemand((ResourceDemand({"GPU": 1}, 10**6),), "PACK", 2),
        GangDemand((ResourceDemand(tiny, 50), ResourceDemand({"CPU": 0.001}, 1)), "PACK", 10**18),
    ]
    decision, took = timed(
        lambda: decide(
            demand, GPU_WORKER, [], min_replicas=0, max_replicas=max_replicas, idle_timeout_s=60, gangs=gangs
        )
    )
    print(f"\n[hostile] decide() with 1e18 counts, maxReplicas={max_replicas}: {took * 1000:.1f} ms CPU")
    assert took < 0.05
    assert decision.add == max_replicas  # the pool fills up to its max, no further
    assert decision.unmet >= 10**18
    assert decision.remove == ()


# --- pooled clients ----------------------------------------------------------------------------


async def test_pooled_client_is_shared_and_sends_each_heads_own_token() -> None:
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers.get("authorization", "")))
        return httpx.Response(200, json={"ray_version": "2.60.0"})

    pool = pooled_client(transport=httpx.MockTransport(handler))
    try:
        for _ in range(2):  # two passes, two heads, one pool
            async with (
                RayClient("http://a:8265", "ta", client=pool, retry=NO_RETRY) as a,
                RayClient("http://b:8265", None, client=pool) as b,
            ):
                assert await a.version() == await b.version() == "2.60.0"
        assert not pool.is_closed  # closing a RayClient leaves the shared pool open
    finally:
        await pool.aclose()
    assert seen == [("a", "Bearer ta"), ("b", "")] * 2
    with pytest.raises(ValueError, match="either"):
        RayClient("http://a", None, client=pool, transport=httpx.MockTransport(handler))


async def test_streamed_mock_body_is_capped_too() -> None:
    """The cap holds for any transport that streams (here: an endless async generator)."""

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_Stream(endless()))

    async with RayClient(
        "http://h", None, transport=httpx.MockTransport(handler), max_body_bytes=MB, retry=NO_RETRY
    ) as client:
        with pytest.raises(RayResponseTooLarge):
            await client.cluster.status()


class _Stream(httpx.AsyncByteStream):
    def __init__(self, it: AsyncIterator[bytes]) -> None:
        self._it = it

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._it:
            yield chunk
