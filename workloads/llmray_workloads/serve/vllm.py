"""The ``vllm`` engine: Ray Serve LLM (``LLMConfig`` + ``build_openai_app``) on GPUs.

Ray Serve LLM brings vLLM's batching, paged KV cache and its own OpenAI ingress; we translate the
spec and put :class:`VllmGuard` (an ASGI middleware) in front of that ingress: it checks the API key
(``spec.apiKeySecretRef``) and enforces ``spec.limits.maxTokens`` before a request reaches vLLM;
``spec.limits.maxPromptTokens`` caps vLLM's ``max_model_len`` (prompt + completion), so vLLM itself
refuses longer prompts. The config is built as a plain dict (pure, testable without vLLM) and
validated by ``LLMConfig`` only where ``ray.serve.llm`` imports (it needs vLLM installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from llmray.api.common import is_object_store
from llmray.api.runtime import ServeAppArgs

from . import protocol as p
from .config import (
    MAX_REQUEST_BYTES,
    MAX_SURGE_PERCENT,
    ApiKeyMissingError,
    autoscaling_config,
    model_source,
    resolve_api_key,
    served_model_name,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


def vllm_engine_kwargs(args: ServeAppArgs) -> dict[str, Any]:
    """vLLM engine arguments from ``spec.engineArgs``; ``extra`` is passed through and wins."""
    engine = args.spec.engine_args
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": engine.tensor_parallel_size,
        "dtype": engine.dtype,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "max_num_seqs": engine.max_num_seqs,
    }
    limits = args.spec.limits
    # A prompt beyond maxPromptTokens cannot fit (vLLM refuses it); the guard caps max_tokens.
    budget = limits.max_prompt_tokens + limits.max_tokens
    kwargs["max_model_len"] = min(engine.max_model_len or budget, budget)
    if args.adapters:  # vLLM's LoRA support; Ray Serve LLM loads the adapters themselves
        kwargs["enable_lora"] = True
        kwargs["max_loras"] = min(engine.max_loras, len(args.adapters))
        kwargs["max_lora_rank"] = engine.max_lora_rank
    kwargs.update(engine.extra.kwargs())  # an allowlist (spec.engineArgs.extra is a closed schema)
    return kwargs


def vllm_lora(args: ServeAppArgs) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """Ray Serve LLM's ``lora_config`` for ``args.adapters``, and adapter name -> Serve LLM model id.

    Ray Serve LLM (2.60) loads LoRA adapters dynamically from one object-store folder
    (``dynamic_lora_loading_path``, s3:// or gs://) under model ids ``<base>:<folder>``, fetching
    ``<path>/<folder>`` on first use. So every adapter must live directly under one folder; the
    guard maps the adapter's name (what clients send) to that id.
    """
    if not args.adapters:
        return None, {}
    parents = {a.source.rstrip("/").rsplit("/", 1)[0] for a in args.adapters}
    if len(parents) != 1:
        raise ValueError(
            "engine vllm loads every adapter from one folder (Ray Serve LLM's dynamic_lora_loading_path); "
            f"spec.adapters[].uri are under {sorted(parents)}"
        )
    base = served_model_name(args)
    ids = {a.name: f"{base}:{a.source.rstrip('/').rsplit('/', 1)[1]}" for a in args.adapters}
    config = {"dynamic_lora_loading_path": parents.pop(), "max_num_adapters_per_replica": len(ids)}
    return config, ids


@dataclass(frozen=True)
class GuardSettings:
    """What :class:`VllmGuard` enforces (no secret: the key is read from the env in the replica)."""

    api_key_env: str | None
    max_tokens: int
    max_request_bytes: int = MAX_REQUEST_BYTES
    adapters: tuple[tuple[str, str], ...] = ()
    """(adapter name, Ray Serve LLM model id): a request's ``model`` is rewritten from one to the other."""


def guard_settings(args: ServeAppArgs) -> GuardSettings:
    """Guard settings from the Serve app args (``api_key_env`` set by the operator with a key)."""
    _, ids = vllm_lora(args)
    return GuardSettings(
        api_key_env=args.api_key_env, max_tokens=args.spec.limits.max_tokens, adapters=tuple(ids.items())
    )


class VllmGuard:
    """ASGI middleware in front of Ray Serve LLM's OpenAI ingress.

    - API key: every request needs ``Authorization: Bearer <key>`` when a key is configured; a
      configured key that is missing in the replica's environment fails closed (503).
    - Limits: on the generation endpoints the JSON body is read (at most ``max_request_bytes``),
      ``max_tokens``/``max_completion_tokens`` above the limit is refused, and an absent one is set
      to the limit, so no request asks vLLM for more.
    Errors have OpenAI's JSON shape.
    """

    def __init__(
        self, app: ASGIApp, settings: GuardSettings, environ: MutableMapping[str, str] | None = None
    ):
        self.app = app
        self.settings = settings
        self._environ = environ if environ is not None else os.environ
        self._key: str | None = None

    def _api_key(self) -> str | None:
        if self._key is None and self.settings.api_key_env is not None:
            self._key = resolve_api_key(self.settings.api_key_env, None, self._environ)
        return self._key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        try:
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []
            }
            try:
                key = self._api_key()
            except ApiKeyMissingError as exc:
                raise p.ApiError(
                    503, f"server misconfigured: {exc}", "server_error", None, "api_key_missing"
                ) from None
            p.check_api_key(headers.get("authorization"), key)
            if scope.get("method") == "POST" and scope.get("path") in GENERATION_PATHS:
                body = self._apply_limits(await self._limited_body(receive, headers))
                receive = _replay(body)
                raw_headers = [
                    (k, v) for k, v in scope.get("headers") or [] if k.lower() != b"content-length"
                ]
                scope = {**scope, "headers": [*raw_headers, (b"content-length", str(len(body)).encode())]}
        except p.ApiError as error:
            await _send_error(send, error)
            return
        await self.app(scope, receive, send)

    async def _limited_body(self, receive: Receive, headers: dict[str, str]) -> bytes:
        limit = self.settings.max_request_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise p.ApiError(413, f"request body larger than {limit} bytes", code="request_too_large")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message.get("type") != "http.request":
                break
            chunk = message.get("body", b"") or b""
            size += len(chunk)
            if size > limit:
                raise p.ApiError(413, f"request body larger than {limit} bytes", code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks)

    def _apply_limits(self, raw: bytes) -> bytes:
        body = p.parse_json_object(raw)
        limit = self.settings.max_tokens
        asked = False
        for param in ("max_tokens", "max_completion_tokens"):
            value = body.get(param)
            if value is None:
                continue
            asked = True
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise p.bad_request(f"{param} must be a positive integer", param)
            if value > limit:
                raise p.bad_request(
                    f"{param} {value} exceeds this deployment's limit of {limit} (spec.limits.maxTokens)",
                    param,
                    "max_tokens_exceeded",
                )
        if not asked:
            body["max_tokens"] = limit
        model = body.get("model")
        for name, model_id in self.settings.adapters:
            if model == name:
                body["model"] = model_id
        return json.dumps(body).encode()


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _send_error(send: Send, error: p.ApiError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def vllm_llm_config(args: ServeAppArgs) -> dict[str, Any]:
    """The ``LLMConfig`` (as a dict) for one model served by Ray Serve LLM."""
    spec = args.spec
    uri = model_source(args)
    # Ray Serve LLM downloads bucket models itself (pyarrow.fs, AWS_ENDPOINT_URL_S3 and the
    # credentials the operator exports to the pods).
    source: str | dict[str, str] = {"bucket_uri": uri} if is_object_store(uri) else uri
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": served_model_name(args), "model_source": source},
        "engine_kwargs": vllm_engine_kwargs(args),
        "deployment_config": {
            "autoscaling_config": autoscaling_config(spec.autoscaling),
            "max_ongoing_requests": spec.limits.max_ongoing_requests,
            "max_queued_requests": max(1, spec.limits.max_queued_requests),
            "max_surge_percent": MAX_SURGE_PERCENT,
        },
    }
    lora, _ = vllm_lora(args)
    if lora is not None:
        config["lora_config"] = lora
    return config


def vllm_available() -> bool:
    """Whether vLLM is installed (``ray.serve.llm`` needs it); checked without importing either."""
    return importlib.util.find_spec("vllm") is not None


def guarded_ingress_app(settings: GuardSettings) -> Any:
    """The FastAPI app Ray Serve LLM's ingress is mounted on, with :class:`VllmGuard` outermost."""
    try:  # Ray's own app (metrics lifespan, OpenAI-shaped exception handling)
        from ray.llm._internal.serve.core.ingress.ingress import init

        app = init()
    except ImportError:  # pragma: no cover - a Ray without it
        from fastapi import FastAPI

        app = FastAPI()
    app.add_middleware(VllmGuard, settings=settings)  # added last: runs first
    return app


def build_vllm_app(args: ServeAppArgs) -> Any:
    """The Ray Serve LLM OpenAI application for ``args``, behind :class:`VllmGuard`.

    Built like ``ray.serve.llm.build_openai_app`` (one LLM server deployment, OpenAI ingress), but
    with our FastAPI app under the ingress so the guard sees every request first.
    """
    if not vllm_available():
        raise RuntimeError("engine vllm needs vLLM in the runtime image (ray.serve.llm requires it)")
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.server.builder import build_llm_deployment
    from ray.serve.llm import LLMConfig
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    from ray import serve

    if os.environ.get("RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING", "0") not in ("", "0"):
        raise RuntimeError("engine vllm: RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING bypasses the API key guard")
    config = LLMConfig(**vllm_llm_config(args))
    server = build_llm_deployment(config)
    ingress_cls = make_fastapi_ingress(OpenAiIngress, app=guarded_ingress_app(guard_settings(args)))
    options = OpenAiIngress.get_deployment_options([config])
    deployment: Any = serve.deployment(ingress_cls, **options)
    return deployment.bind(
        llm_deployments={config.model_id: server},
        model_cards={config.model_id: to_model_metadata(config.model_id, config)},
    )
