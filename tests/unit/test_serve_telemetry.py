"""Serving telemetry without Ray: the rolling window, aggregation across replicas, the stats route."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llmray.api.telemetry import SERVING_STATS_PATH, ServingStats
from llmray_workloads.serve.api import OpenAIServer, create_app
from llmray_workloads.serve.config import ApiSettings
from llmray_workloads.serve.telemetry import (
    BATCH,
    CACHE,
    RUNNING,
    WAITING,
    EngineCounters,
    EngineSample,
    ReplicaReporter,
    ReplicaSummary,
    RequestCounts,
    RequestKey,
    RollingWindow,
    StatsBoard,
    aggregate,
)
from tests.unit.test_serve_api import AUTH, KEY, FakeEngine

pytestmark = pytest.mark.unit


def summary(
    replica: str, at: float, requests: int, span: float, ttft: list[float], run: int = 0
) -> ReplicaSummary:
    return ReplicaSummary(replica, at, requests, span, ttft, running=run, waiting=run // 2)


def test_window_counts_the_last_minute_and_caps_samples() -> None:
    window = RollingWindow(started=1000.0, window_s=60, samples_per_s=3)
    window.add(1000.2, 2, [0.1, 0.2, 0.3, 0.4, 0.5])  # only 3 samples kept for this second
    window.add(1030.0, 1, [0.9])
    s = window.summary("r", 1030.5, wall=5.0, running=1, waiting=2)
    assert (s.requests, s.ttft, s.span_s) == (3, [0.1, 0.2, 0.3, 0.9], 30.5)
    later = window.summary("r", 1075.0, wall=6.0, running=0, waiting=0)  # first second left the window
    assert (later.requests, later.ttft, later.span_s) == (1, [0.9], 60)


def test_window_span_is_at_least_one_second_right_after_start() -> None:
    window = RollingWindow(started=10.0)
    window.add(10.1, 5, [])
    assert window.summary("r", 10.2, 0.0, 0, 0).span_s == 1.0


def test_aggregate_sums_rates_and_queues_and_merges_ttft() -> None:
    stats = aggregate(
        [
            summary("a", 100.0, 60, 60.0, [0.1, 0.2, 0.3], run=4),  # 1 req/s
            summary("b", 99.0, 30, 10.0, [0.5], run=2),  # 3 req/s
            summary("gone", 90.0, 600, 60.0, [9.0], run=8),  # stale: left out
        ],
        now=100.5,
        stale_after=5.0,
    )
    assert stats == ServingStats(
        requests_per_second=4.0, ttft_p50_seconds=0.25, running=6, waiting=3, replicas=2
    )


def test_aggregate_of_nothing() -> None:
    assert aggregate([], now=0.0) == ServingStats(replicas=0, ttft_p50_seconds=None)


def test_board_keeps_the_latest_summary_per_replica_and_drops_old_ones() -> None:
    import time

    board = StatsBoard(stale_after=5.0)
    now = time.time()
    board.push(summary("a", now - 1, 10, 10.0, [0.1]).to_dict())
    board.push(summary("a", now, 20, 10.0, [0.3]).to_dict())  # replaces a's first summary
    board.push(summary("b", now, 10, 10.0, [0.5]).to_dict())
    board.push(summary("old", now - 100, 10, 10.0, []).to_dict())  # pruned at once
    assert set(board._latest) == {"a", "b"}
    stats = ServingStats.model_validate(board.stats())
    assert (stats.requests_per_second, stats.ttft_p50_seconds, stats.replicas) == (3.0, 0.4, 2)


def test_counters_drain_and_keep_the_current_batch() -> None:
    counters = EngineCounters()
    counters.first_tokens([(None, 0.2), ("sql", 0.3)])
    counters.decode_step(None, Counter({None: 1, "sql": 1}), 2)
    counters.decode_step(0.01, Counter({None: 1, "sql": 1}), 2)
    sample = counters.drain()
    assert sample.ttft == [(None, 0.2), ("sql", 0.3)]
    assert sample.itl == [(None, 0.01), ("sql", 0.01)]  # one observation per adapter in the step
    assert (sample.tokens, sample.batch) == (Counter({None: 3, "sql": 3}), 2)
    assert counters.drain() == EngineSample(batch=2)
    counters.idle()
    assert counters.drain().batch == 0
    requests = RequestCounts()
    requests.add("/v1/completions", 200)
    requests.add("/v1/completions", 200)
    requests.add("/v1/completions", 200, "sql")
    assert requests.drain() == Counter(
        {(None, "/v1/completions", 200): 2, ("sql", "/v1/completions", 200): 1}
    )
    assert requests.drain() == Counter()


class RecordingMetrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self.calls: list[tuple[EngineSample, Counter[RequestKey], dict[str, float]]] = []

    def record(self, sample: EngineSample, requests: Counter[RequestKey], load: dict[str, float]) -> None:
        self.calls.append((sample, requests, load))


async def test_reporter_exports_and_falls_back_to_its_own_figures_outside_ray() -> None:
    counters, requests = EngineCounters(), RequestCounts()
    load = {RUNNING: 3.0, WAITING: 1.0, CACHE: 0.25}
    reporter = ReplicaReporter("r1", "app", "m", counters, requests, lambda: load, metrics=RecordingMetrics)  # type: ignore[arg-type]
    counters.first_tokens([(None, 0.4)])
    counters.decode_step(0.02, Counter({None: 3}), 3)
    requests.add("/v1/completions", 200)
    requests.add("/v1/models", 200)  # not a generation request: not in requests/s
    tick = reporter.tick()
    assert (tick.requests, tick.ttft, tick.running, tick.waiting) == (1, [0.4], 3, 1)
    metrics: Any = reporter._metrics
    assert metrics.model == "m"
    ((sample, counts, seen_load),) = metrics.calls
    assert (sample.tokens, sample.itl, sample.batch) == (Counter({None: 4}), [(None, 0.02)], 3)
    assert counts == Counter({(None, "/v1/completions", 200): 1, (None, "/v1/models", 200): 1})
    assert seen_load == load and BATCH not in seen_load
    stats = await reporter.stats()  # no Ray here: the board is unreachable, so this replica alone
    assert stats == ServingStats(
        requests_per_second=1.0, ttft_p50_seconds=0.4, running=3, waiting=1, replicas=1
    )


@pytest.fixture
def server() -> OpenAIServer:
    settings = ApiSettings(served_model_name="m", max_prompt_tokens=32, max_tokens=20, max_ongoing_requests=2)
    return OpenAIServer(FakeEngine(), settings, KEY)  # type: ignore[arg-type]


@pytest.fixture
async def http(server: OpenAIServer) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(server))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as client:
        yield client


async def test_stats_route_needs_the_key_and_answers_the_aggregate(
    server: OpenAIServer, http: httpx.AsyncClient
) -> None:
    unauthorized = await http.get(SERVING_STATS_PATH, headers={"Authorization": "Bearer nope"})
    assert unauthorized.status_code == 401
    assert (await http.get(SERVING_STATS_PATH)).status_code == 503  # no stats source wired
    figures = ServingStats(requests_per_second=2.5, ttft_p50_seconds=0.1, running=1, waiting=0, replicas=2)

    async def source() -> ServingStats:
        return figures

    server.stats = source
    response = await http.get(SERVING_STATS_PATH)
    assert response.status_code == 200
    assert response.json() == {
        "requestsPerSecond": 2.5,
        "ttftP50Seconds": 0.1,
        "running": 1,
        "waiting": 0,
        "replicas": 2,
    }
    assert ServingStats.model_validate(response.json()) == figures


async def test_requests_are_counted_by_route_template_and_status(
    server: OpenAIServer, http: httpx.AsyncClient
) -> None:
    server.requests.drain()
    await http.get("/v1/models/m")
    await http.get("/v1/models/nope")
    await http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
    await http.get("/no/such/path")
    await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert server.requests.drain() == Counter(
        {
            (None, "/v1/models/{model_id:path}", 200): 1,
            (None, "/v1/models/{model_id:path}", 404): 1,
            (None, "/v1/completions", 200): 1,
            (None, "other", 404): 1,
            (None, "/v1/models", 401): 1,
        }
    )


async def test_generation_requests_are_counted_per_adapter(
    server: OpenAIServer, http: httpx.AsyncClient
) -> None:
    engine: Any = server.engine
    engine.lora = ["sql"]
    server.requests.drain()
    for model in ("sql", "m", "gone"):
        await http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
    chat = {"model": "sql", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    await http.post("/v1/chat/completions", json=chat)
    assert server.requests.drain() == Counter(
        {
            ("sql", "/v1/completions", 200): 1,
            (None, "/v1/completions", 200): 1,
            (None, "/v1/completions", 404): 1,  # an unknown model id is no label value
            ("sql", "/v1/chat/completions", 200): 1,
        }
    )


async def test_the_ray_token_opens_only_the_read_only_routes() -> None:
    """The operator reads stats and the model list with the cluster's Ray token, never generates."""
    settings = ApiSettings(served_model_name="m", max_prompt_tokens=32, max_tokens=20, max_ongoing_requests=2)
    server = OpenAIServer(FakeEngine(), settings, KEY, stats_token="ray-token")  # type: ignore[arg-type]

    async def source() -> ServingStats:
        return ServingStats(replicas=1)

    server.stats = source
    transport = httpx.ASGITransport(app=create_app(server))
    ray_auth = {"Authorization": "Bearer ray-token"}
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=ray_auth) as client:
        assert (await client.get(SERVING_STATS_PATH)).status_code == 200
        assert (await client.get("/v1/models")).status_code == 200
        assert (await client.get("/v1/models/m")).status_code == 200
        generate = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
        assert generate.status_code == 401
        assert (await client.get(SERVING_STATS_PATH, headers=AUTH)).status_code == 200  # the key still works
        wrong = await client.get(SERVING_STATS_PATH, headers={"Authorization": "Bearer other"})
        assert wrong.status_code == 401
