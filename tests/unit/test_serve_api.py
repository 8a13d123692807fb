"""The OpenAI HTTP app in-process over a scripted fake engine: status codes, shapes, slots."""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi.responses import StreamingResponse

from llmray_workloads.serve.api import OpenAIServer, create_app, merge_streams
from llmray_workloads.serve.config import MODEL_VERSION_HEADER, ApiSettings
from llmray_workloads.serve.engine import (
    EngineError,
    EngineOverloadedError,
    GenerationChunk,
    GenerationStream,
    SamplingParams,
)

pytestmark = pytest.mark.unit

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}


class FakeStream:
    """Emits ``max_tokens`` chunks 't0 ', 't1 ', ...; optionally fails after ``fail_after`` chunks."""

    def __init__(self, params: SamplingParams, fail_after: int | None = None) -> None:
        self.params, self.fail_after, self.cancelled = params, fail_after, False

    async def _chunks(self) -> AsyncIterator[GenerationChunk]:
        n = self.params.max_tokens
        for i in range(n):
            if self.fail_after is not None and i == self.fail_after:
                raise EngineError("generation failed: device lost")
            yield GenerationChunk(f"t{i} ", "length" if i == n - 1 else None, i + 1)

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._chunks()

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngine:
    max_model_len = 64
    vocab_size = 100

    def __init__(self) -> None:
        self.streams: list[FakeStream] = []
        self.params: list[SamplingParams] = []
        self.fail_after: int | None = None
        self.overloaded = False
        self.crash_encode = False
        self.encode_threads: set[int] = set()
        self.lora: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.encode_threads.add(threading.get_ident())
        if self.crash_encode:
            raise KeyError("bug")
        return [ord(c) % 100 for c in text]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if any(m["content"] == "bad-template" for m in messages):
            raise ValueError("roles must alternate")
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages))

    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: bool = True) -> GenerationStream:
        if self.overloaded:
            raise EngineOverloadedError("full")
        fake = FakeStream(params, self.fail_after)
        self.streams.append(fake)
        self.params.append(params)
        return fake

    def check_health(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"running": 0, "waiting": 0, "cancelled": 0}

    def adapters(self) -> list[str]:
        return list(self.lora)

    def shutdown(self) -> None:
        pass


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def server(engine: FakeEngine) -> OpenAIServer:
    settings = ApiSettings(
        served_model_name="m",
        max_prompt_tokens=32,
        max_tokens=20,
        max_ongoing_requests=2,
        max_request_bytes=4096,
    )
    return OpenAIServer(engine, settings, KEY)  # type: ignore[arg-type]


@pytest.fixture
async def http(server: OpenAIServer) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(server))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as client:
        yield client


def sse_data(body: str) -> list[Any]:
    events = [block for block in body.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


async def test_health_needs_no_key(http: httpx.AsyncClient) -> None:
    response = await http.get("/health", headers={"Authorization": ""})
    assert response.status_code == 200 and response.json()["status"] == "ok"


async def test_every_v1_route_needs_the_key(http: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/m"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
    ]:
        response = await http.request(method, path, headers={"Authorization": "Bearer nope"}, json={})
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"


async def test_models(http: httpx.AsyncClient) -> None:
    assert (await http.get("/v1/models")).json()["data"][0]["id"] == "m"
    assert (await http.get("/v1/models/m")).json()["id"] == "m"
    assert (await http.get("/v1/models/other")).status_code == 404


async def test_completion_choices_usage_and_params(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = {
        "model": "m",
        "prompt": ["ab", "cde"],
        "max_tokens": 3,
        "n": 2,
        "seed": 5,
        "stop": "x",
        "top_p": 0.5,
    }
    data = (await http.post("/v1/completions", json=body)).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "t0 t1 t2 " and c["finish_reason"] == "length" for c in data["choices"])
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    assert [p.seed for p in engine.params] == [5, 6, 5, 6]
    assert engine.params[0] == SamplingParams(max_tokens=3, temperature=1.0, top_p=0.5, seed=5, stop=("x",))


async def test_max_tokens_defaults_to_the_room_left(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    await http.post(
        "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x" * 20}]}
    )
    assert engine.params[0].max_tokens == 20  # the deployment limit (the context has room)
    body = {"model": "m", "messages": [{"role": "user", "content": "y"}], "max_completion_tokens": 4}
    await http.post("/v1/chat/completions", json=body)
    assert engine.params[1].max_tokens == 4


async def test_completion_stream_with_usage(http: httpx.AsyncClient) -> None:
    body = {
        "model": "m",
        "prompt": "hi",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await http.post("/v1/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_data(response.text)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["t0 ", "t1 ", "t2 "]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, "length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
    assert len({e["id"] for e in events}) == 1


async def test_chat_stream_shape(http: httpx.AsyncClient) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "stream": True,
        "n": 2,
    }
    events = sse_data((await http.post("/v1/chat/completions", json=body)).text)
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    for index in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert "".join(c["delta"].get("content", "") for c in mine) == "t0 t1 "
        assert mine[-1] == {"index": index, "delta": {}, "finish_reason": "length", "logprobs": None}
    assert all(e["object"] == "chat.completion.chunk" for e in events)


async def test_failure_mid_stream_is_reported_in_stream(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_after = 1
    body = {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True}
    events = sse_data((await http.post("/v1/completions", json=body)).text)
    assert events[0]["choices"][0]["text"] == "t0 "
    assert events[-1]["error"]["code"] == "engine_error"


async def test_failure_without_stream_is_a_500(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_after = 0
    response = await http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"


async def test_unexpected_exception_is_a_500_and_the_app_keeps_working(
    http: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.crash_encode = True
    response = await http.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    engine.crash_encode = False
    assert (await http.post("/v1/completions", json={"model": "m", "prompt": "hi"})).status_code == 200


async def test_chat_template_errors_are_the_clients(http: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "bad-template"}]}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and "alternate" in response.json()["error"]["message"]


async def test_full_replica_answers_503_with_retry_after(
    http: httpx.AsyncClient, server: OpenAIServer
) -> None:
    server.in_flight = server.settings.max_ongoing_requests
    response = await http.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "overloaded"
    server.in_flight = 0


async def test_engine_overload_answers_503_and_frees_the_slot(
    http: httpx.AsyncClient, server: OpenAIServer, engine: FakeEngine
) -> None:
    engine.overloaded = True
    response = await http.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert server.in_flight == 0


async def test_body_size_limit(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/completions", content=b'{"x": "' + b"a" * 5000 + b'"}')
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


async def test_slots_are_released_after_each_request(http: httpx.AsyncClient, server: OpenAIServer) -> None:
    for stream in (False, True):
        await http.post(
            "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2, "stream": stream}
        )
        assert server.in_flight == 0


async def test_abandoned_stream_cancels_generation_and_frees_the_slot(
    server: OpenAIServer, engine: FakeEngine
) -> None:
    job = server.completion_job(
        json.dumps({"model": "m", "prompt": "hi", "max_tokens": 5, "stream": True}).encode()
    )
    response = await server.respond(job)
    assert isinstance(response, StreamingResponse) and server.in_flight == 1
    body: Any = response.body_iterator
    await body.__anext__()
    await body.aclose()  # what Starlette does when the client goes away
    assert engine.streams[0].cancelled and server.in_flight == 0


async def test_stream_never_started_still_frees_the_slot(server: OpenAIServer) -> None:
    job = server.completion_job(json.dumps({"model": "m", "prompt": "hi", "stream": True}).encode())
    response = await server.respond(job)
    assert server.in_flight == 1
    del response
    gc.collect()
    assert server.in_flight == 0


async def test_merge_streams_interleaves_and_propagates_errors() -> None:
    streams = [FakeStream(SamplingParams(max_tokens=2)), FakeStream(SamplingParams(max_tokens=3))]
    seen = [(i, c.text) async for i, c in merge_streams(streams)]
    assert sorted(seen) == [(0, "t0 "), (0, "t1 "), (1, "t0 "), (1, "t1 "), (1, "t2 ")]
    failing = [
        FakeStream(SamplingParams(max_tokens=3)),
        FakeStream(SamplingParams(max_tokens=3), fail_after=1),
    ]
    with pytest.raises(EngineError):
        async for _ in merge_streams(failing):
            pass


async def test_tokenization_runs_off_the_event_loop(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    """A long prompt or chat template must not stall other requests' streams on the replica's loop."""
    assert (await http.post("/v1/completions", json={"model": "m", "prompt": "hi"})).status_code == 200
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    assert engine.encode_threads and threading.get_ident() not in engine.encode_threads


async def test_adapters_are_model_ids_listed_and_routed(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    """Each LoRA adapter is a model id: listed, accepted as ``model`` (passed to the engine as the
    sequence's adapter), and an unknown or removed one is an OpenAI-shaped 404."""
    engine.lora = ["sql", "poet"]
    assert [m["id"] for m in (await http.get("/v1/models")).json()["data"]] == ["m", "sql", "poet"]
    assert (await http.get("/v1/models/poet")).json()["id"] == "poet"
    for model, adapter in [("sql", "sql"), ("m", None)]:
        body = {"model": model, "prompt": "hi", "max_tokens": 2}
        assert (await http.post("/v1/completions", json=body)).status_code == 200
        assert engine.params[-1].adapter == adapter
    chat = {"model": "poet", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200
    assert engine.params[-1].adapter == "poet"
    engine.lora = ["poet"]  # sql removed live
    missing = await http.post("/v1/completions", json={"model": "sql", "prompt": "hi", "max_tokens": 2})
    assert missing.status_code == 404
    assert (
        missing.json()["error"]["code"] == "model_not_found" and missing.json()["error"]["param"] == "model"
    )
    assert (await http.get("/v1/models/sql")).status_code == 404


async def test_every_response_names_the_model_version(engine: FakeEngine) -> None:
    settings = ApiSettings(served_model_name="m", max_tokens=20, model_version="20261129-1-ab")
    app = create_app(OpenAIServer(engine, settings, KEY))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as client:
        body = {"model": "m", "prompt": "hi", "max_tokens": 2}
        plain = await client.post("/v1/completions", json=body)
        stream = await client.post("/v1/completions", json={**body, "stream": True})
        refused = await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    for response in (plain, stream, refused):
        assert response.headers[MODEL_VERSION_HEADER] == "20261129-1-ab"
    assert plain.status_code == stream.status_code == 200 and refused.status_code == 401


async def test_no_version_header_without_a_version(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/models")
    assert MODEL_VERSION_HEADER not in response.headers
