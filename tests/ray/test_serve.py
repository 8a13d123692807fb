"""The serving workload on a real local Ray cluster: OpenAI API, protection, autoscaling.

Two applications share the session's Ray head and one Serve HTTP proxy on 127.0.0.1:
``tiny`` (API key on, small limits, one replica) for the API and hostile-input tests, and
``scale`` (1..2 replicas, short delays) for autoscaling. All traffic is loopback; every load loop
is bounded in count and time.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmray.api.runtime import ServeAppArgs
from tests.ray_cluster import LocalRay, free_port
from tests.waiting import wait_for

pytestmark = pytest.mark.ray

API_KEY = "test-key-0123456789"
KEY_ENV = "LLMRAY_TEST_API_KEY"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_PROMPT_TOKENS = 64
MAX_TOKENS = 400
MAX_ONGOING = 4
MAX_QUEUED = 4
MAX_NUM_SEQS = 16


def app_args(name: str, model_dir: Path, **spec: Any) -> ServeAppArgs:
    base: dict[str, Any] = {
        "model": {"uri": f"file://{model_dir}", "name": MODEL},
        "engine": "transformers",
        "engineArgs": {"maxNumSeqs": MAX_NUM_SEQS, "batchWaitTimeoutMs": 5},
        "resourcesPerReplica": {"cpu": "1", "memory": "1Gi"},
    }
    return ServeAppArgs.model_validate({"name": name, "spec": {**base, **spec}})


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The tiny model, in a stable folder: the builder is fingerprinted and atomic, so reruns reuse it."""
    from llmray_workloads.tiny import build_tiny_model

    return build_tiny_model(Path(tempfile.gettempdir()) / "llmray-tiny-serve-tests")


@pytest.fixture(scope="module")
def serve_url(local_ray: LocalRay, model_dir: Path) -> Iterator[str]:
    """Deploy ``tiny`` and ``scale``; yield the proxy's base URL; delete both apps afterwards."""
    from ray.serve.api import RunTarget

    import ray
    from llmray_workloads.serve.app import build_app_from
    from ray import serve

    ray.init(address=local_ray.gcs_address, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    tiny = app_args(
        "tiny",
        model_dir,
        limits={
            "maxPromptTokens": MAX_PROMPT_TOKENS,
            "maxTokens": MAX_TOKENS,
            "maxOngoingRequests": MAX_ONGOING,
            "maxQueuedRequests": MAX_QUEUED,
        },
    ).model_copy(update={"api_key_env": KEY_ENV})
    scale = app_args(
        "scale",
        model_dir,
        autoscaling={
            "minReplicas": 1,
            "maxReplicas": 2,
            "targetOngoingRequests": 1,
            "upscaleDelaySeconds": 1,
            "downscaleDelaySeconds": 2,
        },
        limits={"maxOngoingRequests": 8, "maxQueuedRequests": 32},
    )
    serve.run_many(
        [
            RunTarget(
                build_app_from(tiny, {"env_vars": {KEY_ENV: API_KEY}}), name="tiny", route_prefix="/tiny"
            ),
            RunTarget(build_app_from(scale), name="scale", route_prefix="/scale"),
        ]
    )
    http = httpx.get(
        f"{local_ray.dashboard_url}/api/serve/applications/", headers=local_ray.auth_headers, timeout=10
    )
    port = http.json()["http_options"]["port"]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for name in ("tiny", "scale"):
            serve.delete(name)


@pytest.fixture(scope="module")
def tiny(serve_url: str) -> str:
    return f"{serve_url}/tiny"


@pytest.fixture(scope="module")
def client(tiny: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def good_request(base: str) -> None:
    """A valid request must succeed (the replica is neither crashed nor wedged)."""
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    response = httpx.post(f"{base}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


# ---- Serve accepts what we build (need ray imported, so after local_ray exported the auth env) -----


@pytest.mark.parametrize(("up", "down"), [(0, 0), (1, 2), (10, 60), (3600, 86400)])
def test_autoscaling_config_is_valid_for_serve(local_ray: LocalRay, up: float, down: float) -> None:
    from ray.serve.config import AutoscalingConfig

    from llmray_workloads.serve.config import autoscaling_config

    spec = {
        "model": {"uri": "file:///m"},
        "autoscaling": {"upscaleDelaySeconds": up, "downscaleDelaySeconds": down},
    }
    AutoscalingConfig(
        **autoscaling_config(ServeAppArgs.model_validate({"name": "a", "spec": spec}).spec.autoscaling)
    )


def test_deployment_options_are_accepted_by_serve(local_ray: LocalRay) -> None:
    from llmray_workloads.serve.config import deployment_options
    from ray import serve

    @serve.deployment
    class Probe:
        pass

    deployment: Any = Probe
    spec = ServeAppArgs.model_validate({"name": "a", "spec": {"model": {"uri": "file:///m"}}}).spec
    deployment.options(**deployment_options(spec))


def test_example_serve_config_is_valid_and_builds(local_ray: LocalRay) -> None:
    """examples/serve-config-tiny.yaml is a valid Serve config whose args build the application."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from llmray_workloads.serve.app import build_app

    path = Path(__file__).resolve().parents[2] / "examples" / "serve-config-tiny.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = config.applications
    assert app.import_path == "llmray_workloads.serve.app:build_app"
    assert app.args is not None
    assert build_app(app.args) is not None


# ---- the official client -------------------------------------------------------------------


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "llmray"


def test_completion(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=7, extra_body={"ignore_eos": True}
    )
    assert result.object == "text_completion"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + 7


def test_completion_n_and_batch_of_prompts(client: openai.OpenAI) -> None:
    result = client.completions.create(model=MODEL, prompt=["a b", "c d"], max_tokens=3, n=2, seed=1)
    assert sorted(c.index for c in result.choices) == [0, 1, 2, 3]


def test_chat(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        max_tokens=5,
        temperature=0,
    )
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert isinstance(result.choices[0].message.content, str)
    assert result.usage is not None and 1 <= result.usage.completion_tokens <= 5


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def once() -> str:
        r = client.completions.create(
            model=MODEL, prompt="Once upon", max_tokens=12, temperature=1.0, seed=42
        )
        return r.choices[0].text

    assert once() == once()


def test_stop_string_cuts_output(client: openai.OpenAI) -> None:
    def complete(**kwargs: Any) -> Any:
        return client.completions.create(
            model=MODEL, prompt="abc", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}, **kwargs
        ).choices[0]

    full = complete().text
    stop = full[5:8]
    assert len(stop) == 3
    cut = complete(stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_streaming_completion_and_chat(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="stream me",
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    events = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
        )
    )
    assert events[0].choices[0].delta.role == "assistant"
    assert events[-1].choices[0].finish_reason in {"stop", "length"}
    text = "".join(e.choices[0].delta.content or "" for e in events)
    assert isinstance(text, str)


def test_raw_sse_ends_with_done(tiny: str) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{tiny}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        json.loads(line.removeprefix("data: "))


# ---- protection ----------------------------------------------------------------------------


def test_api_key_required(tiny: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(f"{tiny}/v1/models", headers=headers, timeout=30)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    assert httpx.post(f"{tiny}/v1/completions", json=body, timeout=30).status_code == 401
    assert httpx.get(f"{tiny}/v1/models", headers=AUTH, timeout=30).status_code == 200
    assert httpx.post(f"{tiny}/v1/completions", json=body, headers=AUTH, timeout=30).status_code == 200


def _completion(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}).encode()


def _chat(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


C, CHAT = "/v1/completions", "/v1/chat/completions"
HOSTILE: list[tuple[str, str, str, bytes, int, str | None]] = [
    ("truncated-json", "POST", C, b'{"model": "tiny", "prompt": ', 400, "invalid_json"),
    ("empty-body", "POST", C, b"", 400, "invalid_json"),
    ("array-body", "POST", C, b"[1, 2, 3]", 400, "invalid_json"),
    ("string-body", "POST", CHAT, b'"hello"', 400, "invalid_json"),
    ("binary-garbage", "POST", C, b"\xff\xfe\x00\x81garbage", 400, "invalid_json"),
    ("nan-temperature", "POST", C, b'{"model":"tiny","prompt":"hi","temperature":NaN}', 400, "invalid_json"),
    ("deep-nesting", "POST", C, b"[" * 200_000 + b"]" * 200_000, 400, "invalid_json"),
    ("max-tokens-string", "POST", C, _completion(max_tokens="5"), 400, "invalid_value"),
    ("max-tokens-negative", "POST", C, _completion(max_tokens=-1), 400, "invalid_value"),
    ("max-tokens-huge", "POST", C, _completion(max_tokens=10**30), 400, None),
    ("max-tokens-over-limit", "POST", C, _completion(max_tokens=MAX_TOKENS + 1), 400, "max_tokens_exceeded"),
    ("temperature-too-high", "POST", C, _completion(temperature=5), 400, "invalid_value"),
    ("top-p-zero", "POST", C, _completion(top_p=0), 400, "invalid_value"),
    ("n-too-large", "POST", C, _completion(n=100), 400, "invalid_value"),
    ("stream-not-bool", "POST", C, _completion(stream="yes"), 400, "invalid_value"),
    ("prompt-number", "POST", C, _completion(prompt=5), 400, "invalid_value"),
    ("prompt-empty-list", "POST", C, _completion(prompt=[]), 400, "invalid_value"),
    ("prompt-bad-token-ids", "POST", C, _completion(prompt=[1, 2, 10**9]), 400, "invalid_value"),
    ("prompt-too-long", "POST", C, _completion(prompt="word " * 500), 400, "context_length_exceeded"),
    ("too-many-stops", "POST", C, _completion(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
    ("logprobs-unsupported", "POST", C, _completion(logprobs=3), 400, "unsupported_parameter"),
    ("missing-model", "POST", C, b'{"prompt": "hi"}', 400, "invalid_value"),
    ("unknown-model", "POST", C, _completion(model="gpt-9"), 404, "model_not_found"),
    ("chat-empty-messages", "POST", CHAT, _chat(messages=[]), 400, "invalid_value"),
    ("chat-messages-not-list", "POST", CHAT, _chat(messages="hi"), 400, "invalid_value"),
    (
        "chat-bad-role",
        "POST",
        CHAT,
        _chat(messages=[{"role": "wizard", "content": "x"}]),
        400,
        "invalid_value",
    ),
    (
        "chat-content-int",
        "POST",
        CHAT,
        _chat(messages=[{"role": "user", "content": 7}]),
        400,
        "invalid_value",
    ),
    (
        "chat-image-part",
        "POST",
        CHAT,
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "invalid_value",
    ),
    ("chat-tools", "POST", CHAT, _chat(tools=[{"type": "function"}]), 400, "unsupported_parameter"),
    ("chat-unknown-model", "POST", CHAT, _chat(model="nope"), 404, "model_not_found"),
    ("body-too-large", "POST", C, b'{"prompt": "' + b"a" * (2 << 20) + b'"}', 413, "request_too_large"),
    ("wrong-method", "GET", C, b"", 405, "method_not_allowed"),
    ("unknown-path", "POST", "/v1/embeddings", _completion(), 404, "not_found"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_request(
    tiny: str, method: str, path: str, body: bytes, status: int, code: str | None
) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.request(method, f"{tiny}{path}", content=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    good_request(tiny)


def test_prompt_too_long_names_the_limit(tiny: str) -> None:
    response = httpx.post(f"{tiny}{C}", content=_completion(prompt="word " * 500), headers=AUTH, timeout=60)
    assert response.status_code == 400
    assert str(MAX_PROMPT_TOKENS) in response.json()["error"]["message"]
    assert "maxPromptTokens" in response.json()["error"]["message"]


def _health(base: str) -> dict[str, Any]:
    response = httpx.get(f"{base}/health", timeout=30)
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def _long_stream_body() -> dict[str, Any]:
    return {"model": MODEL, "prompt": "go", "max_tokens": MAX_TOKENS, "stream": True, "ignore_eos": True}


def test_disconnect_cancels_generation(tiny: str) -> None:
    before = _health(tiny)["cancelled"]

    def open_and_drop(_: int) -> None:
        with httpx.stream(
            "POST", f"{tiny}{C}", json=_long_stream_body(), headers=AUTH, timeout=60
        ) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # generation has started; now hang up

    with ThreadPoolExecutor(MAX_ONGOING) as pool:
        list(pool.map(open_and_drop, range(MAX_ONGOING)))

    def freed() -> dict[str, Any] | None:
        health = _health(tiny)
        done = (
            health["cancelled"] >= before + MAX_ONGOING
            and health["in_flight"] == 0
            and health["running"] == 0
        )
        return health if done else None

    wait_for(freed, timeout=30, what="the dropped streams to be cancelled and their slots freed")
    good_request(tiny)


def test_overload_gets_503_with_retry_after(tiny: str) -> None:
    """With every slot busy and the queue full, further requests are refused at once with Retry-After."""
    burst = MAX_QUEUED + 12
    limits = httpx.Limits(max_connections=burst, max_keepalive_connections=burst)
    with (
        httpx.Client(headers=AUTH, timeout=120, limits=limits) as http,
        ThreadPoolExecutor(MAX_ONGOING + burst) as pool,
        ExitStack() as stack,
    ):
        list(pool.map(lambda _: http.get(f"{tiny}/v1/models"), range(burst)))  # open the connections
        # Occupy every maxOngoingRequests slot of the (single) replica with requests that run for
        # seconds: together they fill the engine's batch exactly, so all of them start at once.
        hold = {**_long_stream_body(), "n": MAX_NUM_SEQS // MAX_ONGOING}
        drained: list[Future[str]] = []
        for _ in range(MAX_ONGOING):
            response = stack.enter_context(http.stream("POST", f"{tiny}{C}", json=hold))
            assert response.status_code == 200
            lines = response.iter_lines()
            next(lines)  # generating now
            drained.append(pool.submit(_last_line, lines))
        start = threading.Barrier(burst)

        def call(_: int) -> tuple[int, str | None]:
            start.wait(timeout=30)
            response = http.post(f"{tiny}{C}", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            return response.status_code, response.headers.get("retry-after")

        results = list(pool.map(call, range(burst)))
        assert all(future.result(timeout=120) == "data: [DONE]" for future in drained)
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    # At most maxQueuedRequests wait for a slot; the rest are refused without waiting.
    assert statuses.count(503) >= burst - MAX_QUEUED, statuses
    assert all(retry == "1" for status, retry in results if status == 503)
    good_request(tiny)


def _last_line(lines: Iterator[str]) -> str:
    return [line for line in lines if line][-1]


# ---- autoscaling -----------------------------------------------------------------------------


def _replicas(app: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[app].deployments["LLMServer"]
    return {str(state): count for state, count in status.replica_states.items()}


def _load(
    base: str, stop: threading.Event, *, clients: int, per_client: int, seconds: float
) -> Callable[[], int]:
    """Start bounded background load; return a join() giving the number of requests sent."""
    deadline = time.monotonic() + seconds
    sent = [0] * clients

    def loop(i: int) -> None:
        body = {"model": MODEL, "prompt": "load", "max_tokens": 64, "ignore_eos": True}
        with httpx.Client(timeout=60) as http:
            while not stop.is_set() and sent[i] < per_client and time.monotonic() < deadline:
                http.post(f"{base}/v1/completions", json=body)
                sent[i] += 1

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()

    def join() -> int:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
        return sum(sent)

    return join


def test_autoscaling_up_under_load_and_back_down(serve_url: str) -> None:
    base = f"{serve_url}/scale"
    wait_for(lambda: _replicas("scale").get("RUNNING") == 1, timeout=60, what="scale to start at 1 replica")
    stop = threading.Event()
    join = _load(base, stop, clients=6, per_client=2000, seconds=120)
    try:
        started = time.monotonic()
        wait_for(
            lambda: _replicas("scale").get("RUNNING", 0) >= 2, timeout=120, what="a 2nd replica under load"
        )
        scaled_up_after = time.monotonic() - started
        # Whichever replica answers, the stats cover both (pushed to the app's board every second).
        from llmray.api.telemetry import SERVING_STATS_PATH, ServingStats

        def both_counted() -> ServingStats | None:
            answer = httpx.get(f"{base}{SERVING_STATS_PATH}", timeout=10)
            figures = ServingStats.model_validate(answer.json())
            return figures if figures.replicas == 2 and figures.requests_per_second > 0 else None

        wait_for(both_counted, timeout=30, what="the stats route to count both replicas", interval=0.5)
    finally:
        sent = join()
    assert sent > 0
    wait_for(
        lambda: _replicas("scale") == {"RUNNING": 1}, timeout=90, what="scale back to 1 replica after load"
    )
    assert scaled_up_after < 120


# ---- metrics and the stats route -----------------------------------------------------------


def test_request_loop_moves_metrics_and_the_stats_route(local_ray: LocalRay, tiny: str) -> None:
    """Requests show in Ray's metrics agent (scraped on loopback) and in ``GET /llmray/stats``."""
    from llmray.api.telemetry import SERVING_METRICS, SERVING_STATS_PATH, ServingStats
    from tests.ray_cluster import metric_sum, scrape_metrics

    requests, ttft = "ray_llmray_serve_requests_total", "ray_llmray_serve_time_to_first_token_seconds_count"
    labels = {"model": MODEL}
    before = scrape_metrics(local_ray.metrics_url)
    base_requests = metric_sum(before, requests, route="/v1/completions", status="200", **labels) or 0.0
    base_ttft = metric_sum(before, ttft, **labels) or 0.0
    loops = 6
    for i in range(loops):  # bounded: 6 short requests
        body = {"model": MODEL, "prompt": f"count {i}", "max_tokens": 4, "stream": i % 2 == 0}
        response = httpx.post(f"{tiny}/v1/completions", json=body, headers=AUTH, timeout=60)
        assert response.status_code == 200, response.text

    def moved() -> list[tuple[str, dict[str, str], float]] | None:
        now = scrape_metrics(local_ray.metrics_url)
        done = metric_sum(now, requests, route="/v1/completions", status="200", **labels) or 0.0
        first_tokens = metric_sum(now, ttft, **labels) or 0.0
        return now if done >= base_requests + loops and first_tokens >= base_ttft + loops else None

    samples = wait_for(moved, timeout=60, what="the request counter and TTFT histogram to move", interval=1)
    names = {name for name, _, _ in samples}
    for metric in SERVING_METRICS:  # every contract name is exported (histograms as _count etc.)
        assert metric in names or f"{metric}_count" in names, (metric, sorted(names))
    assert (metric_sum(samples, "ray_llmray_serve_generated_tokens_total", **labels) or 0) >= loops * 4

    assert httpx.get(f"{tiny}{SERVING_STATS_PATH}", timeout=10).status_code == 401

    def stats() -> ServingStats | None:
        answer = httpx.get(f"{tiny}{SERVING_STATS_PATH}", headers=AUTH, timeout=10)
        assert answer.status_code == 200, answer.text
        figures = ServingStats.model_validate(answer.json())
        return figures if figures.replicas == 1 and figures.requests_per_second > 0 else None

    figures = wait_for(stats, timeout=30, what="the stats route to count the requests", interval=1)
    assert figures.ttft_p50_seconds is not None and 0 < figures.ttft_p50_seconds < 30
    assert figures.requests_per_second <= loops  # at most `loops` requests over >= 1 s
    assert figures.running >= 0 and figures.waiting >= 0
    # The figures came through the application's board (not the one-replica fallback), which
    # holds the tiny app's replica only: the scale app has its own.
    import ray
    from llmray_workloads.serve.telemetry import BOARD_NAMESPACE, board_name

    board = ray.get_actor(board_name("tiny"), namespace=BOARD_NAMESPACE)
    on_board = ServingStats.model_validate(ray.get(board.stats.remote(), timeout=10))
    assert on_board.replicas == 1 and on_board.requests_per_second > 0
