"""A level-based work queue for the reconcilers (client-go's workqueue, in asyncio).

Why not Kopf's ``@kopf.timer`` / ``@kopf.on.update`` alone: Kopf timers and daemons always put a
finalizer on the resource (it could then not be deleted while the operator is down), and Kopf has
no way to wake a parent's handler when a child changes. So Kopf does what it is best at -- the
watches (with server-side label selectors), its in-memory indexes, events, probes -- and every
watch event only *enqueues* the resource's key here. The queue then guarantees:

- one reconcile at a time per key, and a key queued while it is being reconciled runs once more
  afterwards (bursts of events collapse into one pass);
- retries with per-key exponential backoff on errors (``kopf.TemporaryError`` sets its own delay);
- a periodic resync of every known key, so drift is repaired even without events;
- a deadline per pass: a pass stuck on a slow API or Ray head is abandoned and retried with
  backoff, and :meth:`ReconcileLoop.stuck_for` lets the liveness probe fail if one still hangs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

import kopf
from prometheus_client import Counter, Gauge, Histogram

K = TypeVar("K", bound=Hashable)

logger = logging.getLogger("llmray.controllers")

RECONCILES = Counter("llmray_reconciles", "Reconcile passes", ["kind", "result"])
RECONCILE_SECONDS = Histogram(
    "llmray_reconcile_seconds",
    "Duration of one reconcile pass",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUEUE_DEPTH = Gauge("llmray_queue_depth", "Keys waiting to be reconciled")
QUEUE_OLDEST = Gauge(
    "llmray_queue_oldest_seconds",
    "Seconds the longest-waiting key has waited for a worker (0 when none waits): a growing value "
    "means the workers cannot keep up",
)
_QUEUES: weakref.WeakSet[WorkQueue[Any]] = weakref.WeakSet()
QUEUE_OLDEST.set_function(lambda: max((q.oldest_wait() for q in list(_QUEUES)), default=0.0))


class PassTimeout(Exception):
    """A reconcile pass ran past its deadline and was abandoned."""


class Gate:
    """At most ``slots`` holders at once, and nobody ever waits: a full gate says no.

    Bounds how many passes talk to Ray heads at once; a pass that finds it full does its
    Kubernetes work, skips Ray and comes back soon, so slow heads cannot take every worker.
    """

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self.held = 0

    def try_acquire(self) -> bool:
        if self.held >= self.slots:
            return False
        self.held += 1
        return True

    def release(self) -> None:
        self.held = max(0, self.held - 1)


class WorkQueue(Generic[K]):
    """Deduplicating queue with per-key exclusivity and delayed adds."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._since: dict[K, float] = {}
        """Keys in the queue, and since when (monotonic) they wait for a worker."""
        _QUEUES.add(self)

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting key has been in the queue (0 when it is empty)."""
        return time.monotonic() - min(self._since.values()) if self._since else 0.0

    def add(self, key: K) -> None:
        """Queue ``key`` now (no-op if it is already waiting)."""
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._put(key)

    def add_after(self, key: K, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds; an earlier pending wake-up wins."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()

        def fire() -> None:
            self._timers.pop(key, None)
            self.add(key)

        self._timers[key] = (due, loop.call_later(delay, fire))

    def forget(self, key: K) -> None:
        """Drop pending delayed wake-ups of ``key`` (its resource is gone)."""
        pending = self._timers.pop(key, None)
        if pending is not None:
            pending[1].cancel()

    async def get(self) -> K:
        key = await self._queue.get()
        QUEUE_DEPTH.dec()
        self._since.pop(key, None)
        self._processing.add(key)
        self._dirty.discard(key)
        return key

    def done(self, key: K) -> None:
        """Mark ``key`` processed; if it was re-added meanwhile, queue it again."""
        self._processing.discard(key)
        if key in self._dirty:
            self._put(key)

    def _put(self, key: K) -> None:
        self._queue.put_nowait(key)
        self._since.setdefault(key, time.monotonic())
        QUEUE_DEPTH.inc()

    def __len__(self) -> int:
        return self._queue.qsize()


Reconcile = Callable[[K], Awaitable[float | None]]
"""Reconcile one key; return seconds until it should run again (None: on the next event/resync)."""


class ReconcileLoop(Generic[K]):
    """Runs a reconcile function over a work queue with ``workers`` concurrent keys."""

    def __init__(
        self,
        reconcile: Reconcile[K],
        *,
        keys: Callable[[], Iterable[K]],
        workers: int = 8,
        resync_seconds: float = 15.0,
        backoff_base: float = 1.0,
        backoff_max: float = 120.0,
        pass_timeout: float | None = None,
        label: Callable[[K], str] = str,
    ) -> None:
        self.queue: WorkQueue[K] = WorkQueue()
        self._reconcile = reconcile
        self._keys = keys
        self._workers = workers
        self._resync = resync_seconds
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._failures: dict[K, int] = {}
        self._label = label
        self._pass_timeout = pass_timeout
        self._tasks: list[asyncio.Task[None]] = []
        self._halted: list[asyncio.Task[None]] = []
        self._started: dict[K, float] = {}
        """Keys being reconciled now, and since when (monotonic)."""

    def start(self) -> None:
        """Start the workers and the resync loop (in the running event loop)."""
        if self._tasks:
            return
        for i in range(self._workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"llmray-worker-{i}"))
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="llmray-resync"))

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def halt(self) -> None:
        """Stop consuming now (leadership lost): cancel the workers and the resync; the queue
        keeps its keys, so :meth:`start` later resumes where it stopped."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        self._halted = tasks
        self._started.clear()

    async def stop(self) -> None:
        self.halt()
        await asyncio.gather(*self._halted, return_exceptions=True)
        self._halted = []

    def stuck_for(self) -> float:
        """Seconds the longest pass now running has been running (0 when none runs)."""
        if not self._started:
            return 0.0
        return time.monotonic() - min(self._started.values())

    async def run_one(self, key: K) -> float | None:
        """One pass of ``key`` under the per-pass deadline."""
        if self._pass_timeout is None:
            return await self._reconcile(key)
        try:
            async with asyncio.timeout(self._pass_timeout):
                return await self._reconcile(key)
        except TimeoutError:
            raise PassTimeout(f"pass did not finish within {self._pass_timeout:g}s; abandoned") from None

    def backoff(self, key: K) -> float:
        """Next retry delay of ``key``: base * 2^failures, capped, with 10% jitter."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = min(self._backoff_max, self._backoff_base * (2**n))
        return delay * random.uniform(0.9, 1.1)

    async def _resync_loop(self) -> None:
        while True:
            # Jittered so a fleet of resources does not reconcile in lockstep.
            await asyncio.sleep(self._resync * random.uniform(0.9, 1.1))
            for key in list(self._keys()):
                self.queue.add(key)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            started = time.monotonic()
            self._started[key] = started
            kind = self._label(key)
            try:
                again = await self.run_one(key)
            except asyncio.CancelledError:
                self.queue.done(key)
                raise
            except kopf.TemporaryError as exc:
                RECONCILES.labels(kind, "retry").inc()
                delay = exc.delay if exc.delay is not None else self.backoff(key)
                logger.info("reconcile %s: %s (retry in %.1fs)", key, exc, delay)
                self.queue.add_after(key, delay)
            except PassTimeout as exc:
                RECONCILES.labels(kind, "timeout").inc()
                delay = self.backoff(key)
                logger.warning("reconcile %s: %s (retry in %.1fs)", key, exc, delay)
                self.queue.add_after(key, delay)
            except kopf.PermanentError as exc:
                RECONCILES.labels(kind, "permanent-error").inc()
                logger.warning("reconcile %s: %s (no retry until it changes)", key, exc)
                self._failures.pop(key, None)
            except Exception:
                RECONCILES.labels(kind, "error").inc()
                delay = self.backoff(key)
                logger.exception("reconcile %s failed (retry in %.1fs)", key, delay)
                self.queue.add_after(key, delay)
            else:
                RECONCILES.labels(kind, "ok").inc()
                self._failures.pop(key, None)
                if again is not None:
                    self.queue.add_after(key, again)
            finally:
                self._started.pop(key, None)
                RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - started)
            self.queue.done(key)
