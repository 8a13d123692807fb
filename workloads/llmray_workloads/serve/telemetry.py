"""Serving telemetry: Prometheus metrics through Ray's metrics agent, and stats shared by replicas.

Three threads touch it, each cheaply:

- the engine thread adds to :class:`EngineCounters` once per step (a lock and a list append;
  inter-token latency is one observation per decode step, which every running sequence shares);
- the event loop adds to :class:`RequestCounts` once per request;
- the replica's reporter thread (:class:`ReplicaReporter`) wakes once a second, drains both,
  feeds the Ray metrics (:data:`llmray.api.telemetry.SERVING_METRICS`) and this replica's
  :class:`RollingWindow`, and pushes the window's :class:`ReplicaSummary` to the application's
  :class:`StatsBoard` actor.

Why one named actor per application: any replica may answer ``GET /llmray/stats``, so the figures
of all replicas must meet somewhere; Serve handles route to one replica and cannot broadcast. The
actor is created by the first replica with ``get_if_exists`` and owned by it (not detached): it
dies with the application, and if its owner is scaled away the next push recreates it. It keeps
one summary per replica (stale ones dropped), each of bounded size, so its memory is bounded.
When the board cannot be reached the route answers this replica's own figures.
"""

from __future__ import annotations

import logging
import statistics
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from llmray.api.telemetry import RAY_METRIC_PREFIX, SERVING_METRICS, ServingStats

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
"""Stats cover the last minute."""
PUSH_INTERVAL_S = 1.0
"""How often a replica publishes its metrics and summary."""
STALE_AFTER_S = 5.0
"""A summary older than this belongs to a replica that is gone (or wedged): it no longer counts."""
TTFT_SAMPLES_PER_S = 16
"""TTFT samples a window keeps per second (a bounded, uniform-in-time subsample)."""
BOARD_TIMEOUT_S = 2.0
"""Deadline of every call to the stats board."""

TTFT_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ITL_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]

REQUESTS = "ray_llmray_serve_requests_total"
TTFT = "ray_llmray_serve_time_to_first_token_seconds"
ITL = "ray_llmray_serve_inter_token_latency_seconds"
GENERATED = "ray_llmray_serve_generated_tokens_total"
RUNNING = "ray_llmray_serve_running_sequences"
WAITING = "ray_llmray_serve_waiting_sequences"
BATCH = "ray_llmray_serve_batch_size"
CACHE = "ray_llmray_serve_cache_usage_ratio"
GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
"""Routes whose requests count in requests/s."""
assert {REQUESTS, TTFT, ITL, GENERATED, RUNNING, WAITING, BATCH, CACHE} == set(SERVING_METRICS)


def declared_name(scraped: str) -> str:
    """The name to declare with ``ray.util.metrics`` (Ray's agent adds the ``ray_`` prefix)."""
    return scraped.removeprefix(RAY_METRIC_PREFIX)


# ---- what the engine and the API record -------------------------------------------------------


Adapter = str | None
"""The LoRA adapter (its served model id) a figure belongs to; None: the base model."""


@dataclass
class EngineSample:
    """What the engine did since the previous drain (per adapter), plus its current batch."""

    ttft: list[tuple[Adapter, float]] = field(default_factory=list)
    itl: list[tuple[Adapter, float]] = field(default_factory=list)
    tokens: Counter[Adapter] = field(default_factory=Counter)
    batch: int = 0


class EngineCounters:
    """Per-step figures from the engine thread, drained by the reporter thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sample = EngineSample()

    def first_tokens(self, latencies: list[tuple[Adapter, float]]) -> None:
        """Time to first token of sequences whose prefill finished in this step."""
        with self._lock:
            self._sample.ttft.extend(latencies)
            for adapter, _ in latencies:
                self._sample.tokens[adapter] += 1

    def decode_step(self, interval: float | None, tokens: Counter[Adapter], batch: int) -> None:
        """One decode step: ``interval`` since the previous one (None after idling), tokens per adapter.

        The interval is every sequence's inter-token latency: one observation per adapter in the batch.
        """
        with self._lock:
            if interval is not None:
                self._sample.itl.extend((adapter, interval) for adapter in tokens)
            self._sample.tokens.update(tokens)
            self._sample.batch = batch

    def idle(self) -> None:
        with self._lock:
            self._sample.batch = 0

    def drain(self) -> EngineSample:
        with self._lock:
            sample, self._sample = self._sample, EngineSample(batch=self._sample.batch)
        return sample


class SampleSource(Protocol):
    """Where the reporter drains engine figures from: :class:`EngineCounters`, or the engine process."""

    def drain(self) -> EngineSample: ...


RequestKey = tuple[Adapter, str, int]
"""(adapter the request named or None, route template, status code)."""


class RequestCounts:
    """Requests by (adapter, route, status code) since the previous drain."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[RequestKey] = Counter()

    def add(self, route: str, status: int, adapter: Adapter = None) -> None:
        with self._lock:
            self._counts[(adapter, route, status)] += 1

    def drain(self) -> Counter[RequestKey]:
        with self._lock:
            counts, self._counts = self._counts, Counter()
        return counts


# ---- the rolling window and its aggregation (pure) ----------------------------------------------


@dataclass
class ReplicaSummary:
    """One replica's last minute, as pushed to the board (small: at most ~1000 floats)."""

    replica: str
    at: float
    """Wall-clock time of the summary (compared across replicas of one cluster)."""
    requests: int
    span_s: float
    """Seconds the request count covers (the window, or less right after start)."""
    ttft: list[float]
    running: int
    waiting: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplicaSummary:
        return cls(**data)


class RollingWindow:
    """Request counts and TTFT samples of the last ``window_s`` seconds in one-second buckets.

    Memory is bounded: ``window_s`` buckets of one count and at most ``samples_per_s`` TTFTs.
    """

    def __init__(
        self, started: float, window_s: float = WINDOW_S, samples_per_s: int = TTFT_SAMPLES_PER_S
    ) -> None:
        self.started = started
        self.window_s = window_s
        self.samples_per_s = samples_per_s
        self._buckets: deque[tuple[int, list[int], list[float]]] = deque()

    def _bucket(self, now: float) -> tuple[list[int], list[float]]:
        second = int(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append((second, [0], []))
        self._prune(now)
        _, count, samples = self._buckets[-1]
        return count, samples

    def _prune(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.window_s:
            self._buckets.popleft()

    def add(self, now: float, requests: int, ttft: Iterable[float]) -> None:
        count, samples = self._bucket(now)
        count[0] += requests
        for value in ttft:
            if len(samples) >= self.samples_per_s:
                break
            samples.append(value)

    def summary(self, replica: str, now: float, wall: float, running: int, waiting: int) -> ReplicaSummary:
        self._prune(now)
        span = max(1.0, min(self.window_s, now - self.started))
        return ReplicaSummary(
            replica=replica,
            at=wall,
            requests=sum(b[1][0] for b in self._buckets),
            span_s=span,
            ttft=[v for b in self._buckets for v in b[2]],
            running=running,
            waiting=waiting,
        )


def aggregate(
    summaries: Iterable[ReplicaSummary], now: float, stale_after: float = STALE_AFTER_S
) -> ServingStats:
    """The deployment's figures: rates and queues summed, TTFT p50 over every replica's samples.

    Summaries older than ``stale_after`` (replicas gone or wedged) are left out. The p50 is over
    the union of each replica's time-uniform subsample, which weighs replicas by their traffic.
    """
    fresh = [s for s in summaries if now - s.at <= stale_after]
    samples = [v for s in fresh for v in s.ttft]
    return ServingStats(
        requests_per_second=round(sum(s.requests / s.span_s for s in fresh if s.span_s > 0), 3),
        ttft_p50_seconds=round(statistics.median(samples), 4) if samples else None,
        running=sum(s.running for s in fresh),
        waiting=sum(s.waiting for s in fresh),
        replicas=len(fresh),
    )


class StatsBoard:
    """The application's meeting point: the latest summary of each replica (a Ray actor)."""

    def __init__(self, stale_after: float = STALE_AFTER_S) -> None:
        self.stale_after = stale_after
        self._latest: dict[str, ReplicaSummary] = {}

    def push(self, summary: dict[str, Any]) -> None:
        item = ReplicaSummary.from_dict(summary)
        self._latest[item.replica] = item
        cutoff = time.time() - 3 * self.stale_after
        for key in [k for k, s in self._latest.items() if s.at < cutoff]:
            del self._latest[key]

    def stats(self) -> dict[str, Any]:
        return aggregate(self._latest.values(), time.time(), self.stale_after).model_dump(by_alias=True)


# ---- Ray side (imports ray lazily) ----------------------------------------------------------------


BOARD_NAMESPACE = "llmray"
"""Ray namespace of the boards: fixed, so every replica finds the same one whoever deployed the app
(named actors otherwise land in the deploying job's namespace)."""


def board_name(app_name: str) -> str:
    return f"llmray-stats:{app_name}"


class ServingMetrics:
    """The ``ray.util.metrics`` objects of one replica, tagged with the model id (adapters their own)."""

    def __init__(self, model: str) -> None:
        from ray.util.metrics import Counter as RayCounter
        from ray.util.metrics import Gauge, Histogram

        self.model = model
        self.tags = {"model": model}
        self.requests = RayCounter(
            declared_name(REQUESTS), "Requests by route and status code", ("model", "route", "status")
        )
        self.ttft = Histogram(declared_name(TTFT), "Time to first token", TTFT_BOUNDARIES, ("model",))
        self.itl = Histogram(
            declared_name(ITL),
            "Interval between decode steps (inter-token latency)",
            ITL_BOUNDARIES,
            ("model",),
        )
        self.generated = RayCounter(declared_name(GENERATED), "Generated tokens", ("model",))
        self.gauges = {
            name: Gauge(declared_name(name), description, ("model",))
            for name, description in (
                (RUNNING, "Sequences prefilling or decoding"),
                (WAITING, "Sequences queued for admission"),
                (BATCH, "Sequences in the last decode step"),
                (CACHE, "Tokens in the KV cache over its most (maxNumSeqs x maxModelLen)"),
            )
        }

    def _tags(self, adapter: Adapter) -> dict[str, str]:
        return {"model": adapter or self.model}

    def record(self, sample: EngineSample, requests: Counter[RequestKey], load: dict[str, float]) -> None:
        for (adapter, route, status), count in requests.items():
            self.requests.inc(count, tags={**self._tags(adapter), "route": route, "status": str(status)})
        for adapter, value in sample.ttft:
            self.ttft.observe(value, tags=self._tags(adapter))
        for adapter, value in sample.itl:
            self.itl.observe(value, tags=self._tags(adapter))
        for adapter, tokens in sample.tokens.items():
            if tokens:
                self.generated.inc(tokens, tags=self._tags(adapter))
        for name in (RUNNING, WAITING, CACHE):
            self.gauges[name].set(load.get(name, 0.0), tags=self.tags)
        self.gauges[BATCH].set(sample.batch, tags=self.tags)


class ReplicaReporter:
    """The replica's telemetry thread: metrics, rolling window, and pushes to the stats board.

    ``load()`` returns the engine's current figures keyed by metric name (RUNNING, WAITING, CACHE).
    Every failure is logged and survived: telemetry never takes a replica down.
    """

    def __init__(
        self,
        replica: str,
        app_name: str,
        model: str,
        engine: SampleSource,
        requests: RequestCounts,
        load: Callable[[], dict[str, float]],
        interval: float = PUSH_INTERVAL_S,
        metrics: Callable[[str], ServingMetrics] = ServingMetrics,
    ) -> None:
        self.replica, self.app_name = replica, app_name
        self.engine, self.requests, self.load = engine, requests, load
        self.interval = interval
        self.window = RollingWindow(time.monotonic())
        self._metrics: ServingMetrics | None = None
        self._make_metrics = metrics
        self._model = model
        self._board: Any = None
        self._push_failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmray-telemetry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def local_stats(self) -> ServingStats:
        """This replica alone (the fallback when the board cannot answer); at most one tick old."""
        with self._lock:
            load = self.load()
            now = time.monotonic()
            summary = self.window.summary(
                self.replica, now, time.time(), int(load.get(RUNNING, 0)), int(load.get(WAITING, 0))
            )
        return aggregate([summary], summary.at)

    async def stats(self) -> ServingStats:
        """Figures of every replica of the application, or this replica's own if that fails."""
        import asyncio

        try:
            board = self._get_board()
            raw = await asyncio.wait_for(asyncio.wrap_future(board.stats.remote().future()), BOARD_TIMEOUT_S)
            stats = ServingStats.model_validate(raw)
            if stats.replicas > 0:
                return stats
        except Exception as exc:
            logger.warning("stats board unavailable (%s); answering this replica's figures", exc)
            self._forget_board_if_dead(exc)
        return self.local_stats()

    def tick(self) -> ReplicaSummary:
        """Drain the counters into the metrics and the window; return this replica's summary."""
        with self._lock:
            sample = self.engine.drain()
            requests = self.requests.drain()
            load = self.load()
            now = time.monotonic()
            generation = sum(n for (_, route, _), n in requests.items() if route in GENERATION_ROUTES)
            self.window.add(now, generation, [value for _, value in sample.ttft])
            summary = self.window.summary(
                self.replica, now, time.time(), int(load.get(RUNNING, 0)), int(load.get(WAITING, 0))
            )
        try:
            if self._metrics is None:
                self._metrics = self._make_metrics(self._model)
            self._metrics.record(sample, requests, load)
        except Exception:
            logger.warning("could not export serving metrics", exc_info=True)
        return summary

    def _get_board(self) -> Any:
        if self._board is None:
            ray: Any = sys.modules.get("ray")  # a replica has imported ray; a test process may not
            if ray is None or not ray.is_initialized():  # outside Ray: never start a cluster here
                raise RuntimeError("not running inside Ray")
            actor: Any = ray.remote(StatsBoard)
            self._board = actor.options(
                name=board_name(self.app_name),
                namespace=BOARD_NAMESPACE,
                get_if_exists=True,
                num_cpus=0,
                max_restarts=0,
            ).remote()
        return self._board

    def _push(self, summary: ReplicaSummary) -> None:
        import ray

        try:
            ray.get(self._get_board().push.remote(summary.to_dict()), timeout=BOARD_TIMEOUT_S)
            self._push_failures = 0
        except Exception as exc:
            if self._push_failures == 0:  # once per streak: a lost board is not worth a log line a second
                logger.warning("could not push serving stats to the board: %s", exc)
            self._push_failures += 1
            self._forget_board_if_dead(exc)

    def _forget_board_if_dead(self, exc: BaseException) -> None:
        """Drop the handle only when the board is gone, so the next call recreates it.

        A slow board (just starting, a loaded node) keeps its handle: a named actor that is not
        detached is garbage-collected when its owner drops the last handle, so dropping it on a
        timeout would kill a healthy board and start a create-timeout-kill loop.
        """
        if self._board is None:
            return
        from ray.exceptions import RayActorError

        if isinstance(exc, RayActorError):
            self._board = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._push(self.tick())
            except Exception:
                logger.warning("serving telemetry tick failed", exc_info=True)
