"""The OpenAI-compatible HTTP app (FastAPI) over any :class:`~.engine.Engine`.

Independent of Ray: the Serve deployment mounts it as its ingress, and tests can drive it
in-process. Every answer is either a success built from the ``openai`` types or an OpenAI-shaped
error; an unexpected exception becomes a 500 for that request only. A stream whose client goes
away is cancelled, which cancels its sequences in the engine and frees their batch rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmray.api.telemetry import SERVING_STATS_PATH, ServingStats

from . import protocol as p
from .config import MODEL_VERSION_HEADER, ApiSettings
from .engine import (
    Engine,
    EngineError,
    EngineOverloadedError,
    GenerationChunk,
    GenerationStream,
    SamplingParams,
    UnknownAdapterError,
)
from .telemetry import RequestCounts

logger = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]


@dataclass(frozen=True)
class Job:
    """One request, validated: its sequences and how to answer."""

    kind: Kind
    model: str
    prompt_tokens: list[int]
    """Token count of each distinct prompt (for usage)."""
    sequences: list[tuple[list[int], SamplingParams]]
    stream: bool
    include_usage: bool


def sampling_params(
    req: p._SamplingFields, max_tokens: int, choice: int, adapter: str | None = None
) -> SamplingParams:
    """Engine parameters of choice ``choice`` of a request (seeded choices get distinct seeds);
    ``adapter``: the LoRA adapter the request's model names (None: the base model)."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=None if req.seed is None else (req.seed + choice) % (2**63),
        stop=p.stop_list(req.stop),
        ignore_eos=bool(req.ignore_eos),
        adapter=adapter,
    )


def error_response(error: p.ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=dict(error.headers or {}))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) more than ``limit`` bytes without buffering it all first."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise p.ApiError(413, f"request body larger than {limit} bytes", code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise p.ApiError(413, f"request body larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def merge_streams(streams: Sequence[GenerationStream]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Chunks of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: GenerationStream) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((index, chunk))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


StatsSource = Callable[[], Awaitable[ServingStats]]

#: Routes that also accept the cluster's Ray token (read-only introspection for the operator).
READ_ONLY_ROUTES = frozenset({SERVING_STATS_PATH, "/v1/models", "/v1/models/{model_id:path}"})


class OpenAIServer:
    """Request handling state of one replica: engine, limits, API key, in-flight count.

    ``requests`` counts every answer by route and status code (the replica's telemetry thread
    drains it); ``stats`` answers :data:`SERVING_STATS_PATH` (the deployment's aggregate; without
    one, the route answers 503). That route and the model list also accept ``stats_token``, the
    Ray cluster's own token: whoever holds it controls the whole cluster already, and it lets the
    operator read them without reading the user's API-key Secret.
    """

    def __init__(
        self,
        engine: Engine,
        settings: ApiSettings,
        api_key: str | None,
        stats: StatsSource | None = None,
        stats_token: str | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.api_key = api_key
        self.stats_token = stats_token or None
        self.created = int(time.time())
        self.in_flight = 0
        self.requests = RequestCounts()
        self.stats = stats
        # One thread does all validation + tokenization, off the event loop: a long prompt or a
        # chat template no longer stalls other requests' streams. One worker keeps the tokenizer
        # single-threaded (fast tokenizers may refuse concurrent use).
        self._prepare = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmray-tokenize")

    async def prepare(self, build: Callable[[bytes], Job], raw: bytes) -> Job:
        """Run ``build`` (:meth:`completion_job` or :meth:`chat_job`) on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare, build, raw)

    # ---- models ------------------------------------------------------------------------------

    def model_ids(self) -> list[str]:
        """The base model's served name, then every LoRA adapter the engine serves now."""
        return [self.settings.served_model_name, *self.engine.adapters()]

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base); 404 for an unknown model."""
        if model == self.settings.served_model_name:
            return None
        if model in self.engine.adapters():
            return model
        p.check_model(model, self.settings.served_model_name)  # raises the OpenAI-shaped 404
        return None

    # ---- validation: request -> Job (pure apart from tokenization) -------------------------

    def completion_job(self, raw: bytes) -> Job:
        req = p.parse_request(p.CompletionRequest, raw)
        adapter = self.adapter_for(req.model)
        p.check_completion_features(req)
        prompts = p.completion_prompts(req.prompt)
        n = req.n or 1
        self._check_choices(len(prompts) * n)
        encoded: list[list[int]] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = self.engine.encode(prompt)
            else:
                p.check_token_ids(prompt, self.engine.vocab_size, "prompt")
                ids = prompt
            self._check_prompt(len(ids), "prompt")
            encoded.append(ids)
        max_tokens = self._max_tokens(req.max_tokens, max(len(ids) for ids in encoded), "max_tokens")
        sequences = [(ids, sampling_params(req, max_tokens, j, adapter)) for ids in encoded for j in range(n)]
        return self._job("completion", req, [len(ids) for ids in encoded], sequences)

    def chat_job(self, raw: bytes) -> Job:
        req = p.parse_request(p.ChatRequest, raw)
        adapter = self.adapter_for(req.model)
        p.check_chat_features(req)
        n = req.n or 1
        self._check_choices(n)
        try:
            ids = self.engine.encode_chat(p.chat_messages(req))
        except EngineError:  # the engine's trouble (e.g. its process is gone), not the request's
            raise
        except Exception as exc:  # template errors (e.g. roles must alternate) are the client's to fix
            message = f"messages could not be formatted with the chat template: {exc}"
            raise p.bad_request(message, "messages") from None
        self._check_prompt(len(ids), "messages")
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._max_tokens(requested, len(ids), param)
        sequences = [(ids, sampling_params(req, max_tokens, j, adapter)) for j in range(n)]
        return self._job("chat", req, [len(ids)], sequences)

    def _job(
        self,
        kind: Kind,
        req: p._SamplingFields,
        prompt_tokens: list[int],
        sequences: list[tuple[list[int], SamplingParams]],
    ) -> Job:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Job(kind, req.model, prompt_tokens, sequences, bool(req.stream), include_usage)

    def _check_choices(self, count: int) -> None:
        if count > p.MAX_CHOICES:
            raise p.bad_request(f"at most {p.MAX_CHOICES} choices (prompts x n) per request", "n")

    def _check_prompt(self, count: int, param: str) -> None:
        p.check_prompt_tokens(
            count, limit=self.settings.max_prompt_tokens, max_model_len=self.engine.max_model_len, param=param
        )

    def _max_tokens(self, requested: int | None, prompt_tokens: int, param: str) -> int:
        return p.resolve_max_tokens(
            requested,
            prompt_tokens,
            max_model_len=self.engine.max_model_len,
            limit=self.settings.max_tokens,
            param=param,
        )

    # ---- execution ---------------------------------------------------------------------------

    def admit(self) -> _Lease:
        """Take one in-flight slot; 503 + Retry-After beyond ``maxOngoingRequests``."""
        if self.in_flight >= self.settings.max_ongoing_requests:
            raise p.overloaded(self.settings.retry_after_s, "too many requests in flight on this replica")
        self.in_flight += 1
        return _Lease(self)

    def submit(self, job: Job) -> list[GenerationStream]:
        streams: list[GenerationStream] = []
        try:
            for ids, params in job.sequences:
                streams.append(self.engine.submit(ids, params, stream=job.stream))
        except EngineOverloadedError as exc:
            for stream in streams:
                stream.cancel()
            raise p.overloaded(self.settings.retry_after_s, str(exc)) from None
        except UnknownAdapterError:  # removed between validation and submission
            for stream in streams:
                stream.cancel()
            p.check_model(job.model, self.settings.served_model_name)
            raise
        return streams

    async def respond(self, job: Job) -> Response:
        """Admit, run and answer one job (JSON or SSE)."""
        lease = self.admit()
        try:
            streams = self.submit(job)
        except BaseException:
            lease.release()
            raise
        if job.stream:
            return StreamingResponse(
                self._sse(job, streams, lease),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return JSONResponse(p.dump(await self._collect(job, streams)))
        finally:
            for stream in streams:
                stream.cancel()
            lease.release()

    async def _collect(self, job: Job, streams: list[GenerationStream]) -> Any:
        texts = [""] * len(streams)
        reasons: list[p.FinishReason] = ["length"] * len(streams)
        tokens = [0] * len(streams)
        try:
            async for index, chunk in merge_streams(streams):
                texts[index] += chunk.text
                tokens[index] = chunk.completion_tokens
                if chunk.finish_reason is not None:
                    reasons[index] = chunk.finish_reason
        except EngineError as exc:
            raise p.ApiError(500, str(exc), "server_error", None, "engine_error") from None
        rid, created = _request_id(job.kind), int(time.time())
        counts = p.usage(sum(job.prompt_tokens), sum(tokens))
        choices = list(zip(texts, reasons, strict=True))
        if job.kind == "chat":
            return p.chat_completion(rid, created, job.model, choices, counts)
        return p.completion(rid, created, job.model, choices, counts)

    async def _sse(self, job: Job, streams: list[GenerationStream], lease: _Lease) -> AsyncIterator[bytes]:
        rid, created = _request_id(job.kind), int(time.time())
        tokens = [0] * len(streams)
        try:
            if job.kind == "chat":
                for index in range(len(streams)):
                    yield p.sse_event(p.chat_chunk(rid, created, job.model, index, content="", role=True))
            async for index, chunk in merge_streams(streams):
                tokens[index] = chunk.completion_tokens
                for event in _chunk_events(job, rid, created, index, chunk):
                    yield p.sse_event(event)
            if job.include_usage:
                counts = p.usage(sum(job.prompt_tokens), sum(tokens))
                usage_event = (
                    p.chat_usage_chunk(rid, created, job.model, counts)
                    if job.kind == "chat"
                    else p.completion_usage_chunk(rid, created, job.model, counts)
                )
                yield p.sse_event(usage_event)
        except EngineError as exc:
            yield p.sse_error(p.ApiError(500, str(exc), "server_error", None, "engine_error"))
        finally:
            for stream in streams:
                stream.cancel()
            lease.release()
        yield p.SSE_DONE


class _Lease:
    """One in-flight slot. Released exactly once: explicitly, or when dropped unused.

    A streaming response whose client vanished before the body started never runs its
    generator's ``finally``; dropping the generator drops the lease, which frees the slot.
    """

    def __init__(self, server: OpenAIServer) -> None:
        self._server: OpenAIServer | None = server

    def release(self) -> None:
        if self._server is not None:
            self._server.in_flight -= 1
            self._server = None

    def __del__(self) -> None:
        self.release()


def _chunk_events(job: Job, rid: str, created: int, index: int, chunk: GenerationChunk) -> list[Any]:
    if job.kind == "completion":
        return [p.completion_chunk(rid, created, job.model, index, chunk.text, chunk.finish_reason)]
    events: list[Any] = []
    if chunk.text:
        events.append(p.chat_chunk(rid, created, job.model, index, content=chunk.text))
    if chunk.finish_reason is not None:
        events.append(p.chat_chunk(rid, created, job.model, index, finish_reason=chunk.finish_reason))
    return events


def _request_id(kind: Kind) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


Handler = Callable[[Request], Awaitable[Response]]


class ModelVersionHeader:
    """ASGI middleware: every response names the model version this replica loaded (a client or a
    test sees which version answered while a new one rolls out)."""

    def __init__(self, app: Any, version: str) -> None:
        self.app = app
        self.header = (MODEL_VERSION_HEADER.encode(), version.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_version(message: Any) -> None:
            if message.get("type") == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_version)


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI app: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/health``,
    and the deployment's stats on :data:`SERVING_STATS_PATH` (same API key)."""
    app = FastAPI(title="llmray OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    def check_stats_auth(authorization: str | None) -> None:
        if server.stats_token is not None:
            try:
                p.check_api_key(authorization, server.stats_token)
                return
            except p.ApiError:
                pass
        p.check_api_key(authorization, server.api_key)

    def guarded(handler: Handler, route: str, *, auth: bool = True) -> Handler:
        async def wrapper(request: Request) -> Response:
            response = await answer(request)
            # The adapter a valid generation request named (set once its job is built), else the base.
            server.requests.add(route, response.status_code, getattr(request.state, "adapter", None))
            return response

        async def answer(request: Request) -> Response:
            try:
                if auth and route in READ_ONLY_ROUTES:
                    check_stats_auth(request.headers.get("authorization"))
                elif auth:
                    p.check_api_key(request.headers.get("authorization"), server.api_key)
                return await handler(request)
            except p.ApiError as error:
                return error_response(error)
            except Exception:
                logger.exception("unhandled error serving %s", request.url.path)
                internal = p.ApiError(500, "internal server error", "server_error", None, "internal_error")
                return error_response(internal)

        return wrapper

    async def health(request: Request) -> Response:
        # Off the event loop: with the engine in its own process these are calls with a deadline.
        try:
            await asyncio.to_thread(server.engine.check_health)
        except Exception as exc:
            raise p.ApiError(503, f"unhealthy: {exc}", "server_error", None, "unhealthy") from None
        stats = await asyncio.to_thread(server.engine.stats)
        return JSONResponse({"status": "ok", "in_flight": server.in_flight, **stats})

    async def models(request: Request) -> Response:
        cards = [p.model_card(model_id, server.created) for model_id in server.model_ids()]
        return JSONResponse(p.model_list(cards))

    async def model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        server.adapter_for(model_id)
        return JSONResponse(p.dump(p.model_card(model_id, server.created)))

    async def completions(request: Request) -> Response:
        raw = await read_body(request, server.settings.max_request_bytes)
        job = await server.prepare(server.completion_job, raw)
        request.state.adapter = job.sequences[0][1].adapter if job.sequences else None
        return await server.respond(job)

    async def chat(request: Request) -> Response:
        raw = await read_body(request, server.settings.max_request_bytes)
        job = await server.prepare(server.chat_job, raw)
        request.state.adapter = job.sequences[0][1].adapter if job.sequences else None
        return await server.respond(job)

    async def stats(request: Request) -> Response:
        if server.stats is None:
            raise p.ApiError(503, "serving stats are not available", "server_error", None, "unavailable")
        figures = await server.stats()
        return JSONResponse(figures.model_dump(by_alias=True))

    routes: list[tuple[str, Handler, str, bool]] = [
        ("/health", health, "GET", False),
        ("/v1/models", models, "GET", True),
        ("/v1/models/{model_id:path}", model, "GET", True),
        ("/v1/completions", completions, "POST", True),
        ("/v1/chat/completions", chat, "POST", True),
        (SERVING_STATS_PATH, stats, "GET", True),
    ]
    for path, handler, method, auth in routes:
        # The route label is the template, never the raw path: bounded label values.
        app.add_api_route(path, guarded(handler, path, auth=auth), methods=[method])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        server.requests.add("other", exc.status_code)
        return error_response(p.ApiError(exc.status_code, message, "invalid_request_error", None, code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        server.requests.add("other", 400)
        return error_response(p.bad_request(str(exc)))

    if server.settings.model_version:
        app.add_middleware(ModelVersionHeader, version=server.settings.model_version)
    return app
