"""The vLLM engine's guard: the Serve LLM app built for examples/deployment-vllm.yaml checks the API
key and enforces spec.limits before a request reaches vLLM (vLLM itself is not installed here: the
guard is exercised in front of a stand-in ASGI app that records what it receives)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmray.api.runtime import API_KEY_ENV, AdapterSource, ServeAppArgs
from llmray_workloads.serve.vllm import GuardSettings, VllmGuard, guard_settings, vllm_llm_config

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deployment-vllm.yaml"
KEY = "s3cret-key-from-the-secret"


def _example_args() -> ServeAppArgs:
    spec = next(d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d and d["kind"] == "LLMDeployment")[
        "spec"
    ]
    # what the operator sends: the key's variable is set because spec.apiKeySecretRef is
    return ServeAppArgs.model_validate({"name": "qwen-chat", "spec": spec, "apiKeyEnv": API_KEY_ENV})


class Recorder:
    """Stands in for Ray Serve LLM's ingress: answers 200 and keeps the bodies it got."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        if raw:
            self.bodies.append(json.loads(raw))
            assert int(dict(scope["headers"])[b"content-length"]) == len(raw)  # matches the rewritten body
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})


def _post(guard: VllmGuard, path: str, body: Any, key: str | None) -> httpx.Response:
    async def go() -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            if body is None:
                return await client.get(path, headers=headers)
            return await client.post(path, content=json.dumps(body), headers=headers)

    return asyncio.run(go())


def test_the_vllm_example_builds_a_guarded_app_that_checks_the_key() -> None:
    a = _example_args()
    settings = guard_settings(a)
    assert settings == GuardSettings(api_key_env=API_KEY_ENV, max_tokens=a.spec.limits.max_tokens)
    inner = Recorder()
    guard = VllmGuard(inner, settings, environ={API_KEY_ENV: KEY})
    chat = {"model": "qwen-chat", "messages": [{"role": "user", "content": "hi"}]}

    for key in (None, "wrong", KEY + "x"):
        resp = _post(guard, "/v1/chat/completions", chat, key)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert resp.headers["www-authenticate"] == "Bearer"
    assert _post(guard, "/v1/models", None, None).status_code == 401  # every route, not only generation
    assert inner.bodies == []

    ok = _post(guard, "/v1/chat/completions", chat, KEY)
    assert ok.status_code == 200
    assert inner.bodies[-1]["max_tokens"] == a.spec.limits.max_tokens  # absent: set to the limit
    assert _post(guard, "/v1/models", None, KEY).status_code == 200


def test_guard_enforces_max_tokens() -> None:
    inner = Recorder()
    guard = VllmGuard(inner, GuardSettings(api_key_env=None, max_tokens=64), environ={})
    base = {"model": "m", "prompt": "hi"}
    assert _post(guard, "/v1/completions", {**base, "max_tokens": 64}, None).status_code == 200
    assert inner.bodies[-1]["max_tokens"] == 64
    for param in ("max_tokens", "max_completion_tokens"):
        resp = _post(guard, "/v1/completions", {**base, param: 65}, None)
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert error["param"] == param and "spec.limits.maxTokens" in error["message"]
    assert _post(guard, "/v1/completions", {**base, "max_tokens": "9"}, None).status_code == 400
    assert _post(guard, "/v1/completions", ["not", "an", "object"], None).status_code == 400
    assert len(inner.bodies) == 1


def test_guard_bounds_the_body_and_fails_closed_without_the_key() -> None:
    small = VllmGuard(
        Recorder(), GuardSettings(api_key_env=None, max_tokens=8, max_request_bytes=64), environ={}
    )
    resp = _post(small, "/v1/completions", {"prompt": "x" * 100}, None)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    keyless = VllmGuard(Recorder(), GuardSettings(api_key_env=API_KEY_ENV, max_tokens=8), environ={})
    resp = _post(keyless, "/v1/models", None, "anything")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "api_key_missing"


def test_vllm_engine_kwargs_are_allowlisted_and_capped() -> None:
    kwargs = vllm_llm_config(_example_args())["engine_kwargs"]
    # min(maxModelLen 8192, maxPromptTokens 7168 + maxTokens 1024): the example's limits fill its context
    assert kwargs["max_model_len"] == 8192
    spec = _example_args().spec.model_copy(
        update={
            "limits": _example_args().spec.limits.model_copy(
                update={"max_prompt_tokens": 1000, "max_tokens": 24}
            )
        }
    )
    assert (
        vllm_llm_config(_example_args().model_copy(update={"spec": spec}))["engine_kwargs"]["max_model_len"]
        == 1024
    )
    assert "trust_remote_code" not in kwargs


def _lora_args(*uris: str) -> ServeAppArgs:
    args = _example_args()
    return args.model_copy(
        update={"adapters": [AdapterSource(name=f"a{i}", source=uri) for i, uri in enumerate(uris)]}
    )


def test_adapters_map_onto_ray_serve_llm_dynamic_lora() -> None:
    """Adapters become Serve LLM's lora_config (one object-store folder) plus vLLM's LoRA engine
    arguments; the guard rewrites the adapter's name to Serve LLM's ``<base>:<folder>`` model id."""
    args = _lora_args("s3://bucket/loras/sql-v3", "s3://bucket/loras/poet")
    config = vllm_llm_config(args)
    assert config["lora_config"] == {
        "dynamic_lora_loading_path": "s3://bucket/loras",
        "max_num_adapters_per_replica": 2,
    }
    kwargs = config["engine_kwargs"]
    assert kwargs["enable_lora"] is True and kwargs["max_loras"] == 2 and kwargs["max_lora_rank"] == 16
    assert "lora_config" not in vllm_llm_config(_example_args())
    assert "enable_lora" not in vllm_llm_config(_example_args())["engine_kwargs"]
    base = args.spec.model.name or args.name
    recorder = Recorder()
    guard = VllmGuard(recorder, guard_settings(args), environ={API_KEY_ENV: KEY})
    for model, sent in [("a0", f"{base}:sql-v3"), ("a1", f"{base}:poet"), (base, base)]:
        response = _post(guard, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1}, KEY)
        assert response.status_code == 200
        assert recorder.bodies[-1]["model"] == sent


def test_vllm_adapters_must_share_one_folder() -> None:
    with pytest.raises(ValueError, match="one folder"):
        vllm_llm_config(_lora_args("s3://bucket/a/x", "gs://other/b/y"))
