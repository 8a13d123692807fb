"""Multi-LoRA on a real local Ray: adapters deployed the way the operator deploys them, changed live.

The application config comes from the operator's own :func:`serve_app_config` and is written with
its Serve client (declarative ``PUT /api/serve/applications/``), so this checks the whole path:
spec.adapters -> the deployment's ``user_config`` -> Serve's lightweight update -> the running
replica's ``reconfigure()`` -> the engine. One replica, one CPU; all traffic is loopback.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmray.api.deployment import LLMDeploymentSpec
from llmray.api.runtime import AdapterSource
from llmray.builders.model import adapter_statuses, resolve_adapters
from llmray.controllers.decisions import deployed_adapters, serve_app_config
from llmray.ray import RayClient
from tests.ray_cluster import LocalRay, free_port
from tests.waiting import async_wait_for

pytestmark = [pytest.mark.ray, pytest.mark.asyncio(loop_scope="session")]

APP = "llmray-lora"
PREFIX = "/lora"
BASE = "tiny-base"
TIMEOUT = 240


@pytest.fixture(scope="module")
def folders() -> dict[str, Path]:
    """The tiny model and two adapters of it (stable folders: the model build is cached)."""
    from llmray_workloads.tiny import build_tiny_adapter, build_tiny_model

    root = Path(tempfile.gettempdir()) / "llmray-lora-ray-tests"
    base = build_tiny_model(root / "base")
    return {
        "base": base,
        "sql": build_tiny_adapter(base, root / "sql", seed=1),
        "poet": build_tiny_adapter(base, root / "poet", seed=2),
        "broken": root / "no-such-adapter",
    }


def spec_with(folders: dict[str, Path], adapters: list[str]) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate(
        {
            "model": {"uri": f"file://{folders['base']}", "name": BASE},
            "engineArgs": {"maxNumSeqs": 8, "batchWaitTimeoutMs": 5},
            "resourcesPerReplica": {"cpu": "1", "memory": "1Gi"},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
            "adapters": [{"name": name, "uri": f"file://{folders[name]}"} for name in adapters],
        }
    )


def app_config(spec: LLMDeploymentSpec) -> dict[str, Any]:
    resolved = resolve_adapters(spec, {}, [], BASE)
    sources = [AdapterSource(name=a.name, source=a.uri[len("file://") :]) for a in resolved if a.uri]
    return serve_app_config(
        app_name=APP,
        route_prefix=PREFIX,
        resource_name="lora",
        spec=spec,
        model_path=None,
        api_key=None,
        api_key_in_pods=True,
        adapters=sources,
    )


@pytest.fixture
async def ray(local_ray: LocalRay) -> AsyncIterator[RayClient]:
    async with RayClient(local_ray.dashboard_url, local_ray.token) as client:
        yield client


async def replicas(local_ray: LocalRay) -> list[tuple[str, int, str]]:
    """(actor id, pid, state) of each replica of the app's deployment, from Serve's REST API."""
    async with httpx.AsyncClient(headers=local_ray.auth_headers, timeout=10) as http:
        details = (await http.get(f"{local_ray.dashboard_url}/api/serve/applications/")).json()
    app = details["applications"].get(APP) or {}
    deployment = (app.get("deployments") or {}).get("LLMServer") or {}
    return [(r["actor_id"], r["pid"], r["state"]) for r in deployment.get("replicas") or []]


async def serve_base(local_ray: LocalRay) -> str:
    async with httpx.AsyncClient(headers=local_ray.auth_headers, timeout=10) as http:
        details = (await http.get(f"{local_ray.dashboard_url}/api/serve/applications/")).json()
    return f"http://127.0.0.1:{details['http_options']['port']}{PREFIX}/v1"


async def model_ids(base: str) -> list[str]:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{base}/models")
    response.raise_for_status()
    return [m["id"] for m in response.json()["data"]]


async def complete(base: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "Ray is", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.post(f"{base}/completions", json=body)


async def test_adapter_listed_answered_and_removed_live(
    ray: RayClient, local_ray: LocalRay, folders: dict[str, Path]
) -> None:
    defaults = {"http_options": {"host": "127.0.0.1", "port": free_port()}}
    both = spec_with(folders, ["sql", "poet"])
    try:
        assert await ray.serve.put_application(APP, app_config(both), instance_defaults=defaults)

        async def running() -> bool:
            app = await ray.serve.get_application(APP)
            return app is not None and app.running

        await async_wait_for(running, timeout=TIMEOUT, what=f"Serve application {APP} to run")
        base = await serve_base(local_ray)
        assert await model_ids(base) == [BASE, "poet", "sql"]
        answers = {}
        for model in (BASE, "sql", "poet"):
            response = await complete(base, model)
            assert response.status_code == 200, response.text
            answers[model] = response.json()["choices"][0]["text"]
        assert len(set(answers.values())) == 3, answers  # each adapter really changes the model

        # The operator's view: both adapters Ready (Serve runs a config that has them).
        app = await ray.serve.get_application(APP)
        resolved = resolve_adapters(both, {}, [], BASE)
        listed = frozenset(await model_ids(base))
        states = adapter_statuses(
            resolved, deployed_adapters(app), running=app is not None and app.running, listed=listed
        )
        assert [(a.name, a.state) for a in states] == [("sql", "Ready"), ("poet", "Ready")]

        before = await replicas(local_ray)
        assert len(before) == 1 and before[0][2] == "RUNNING"

        # Remove poet and add an adapter that cannot load: a user_config change only, applied to
        # the running replica; the broken one is left out, everything else keeps serving.
        after_change = spec_with(folders, ["sql", "broken"])
        assert await ray.serve.put_application(APP, app_config(after_change))

        async def poet_gone() -> bool:
            return "poet" not in await model_ids(base)

        await async_wait_for(poet_gone, timeout=TIMEOUT, what="poet to leave /v1/models")
        gone = await complete(base, "poet")
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "model_not_found"
        still = await complete(base, "sql")
        assert still.status_code == 200 and still.json()["choices"][0]["text"] == answers["sql"]
        assert (await complete(base, "broken")).status_code == 404
        await async_wait_for(running, timeout=TIMEOUT, what=f"Serve application {APP} to settle")
        after = await replicas(local_ray)
        assert [(a, p) for a, p, _ in after] == [(a, p) for a, p, _ in before]  # reconfigured, not restarted
        app = await ray.serve.get_application(APP)
        states = adapter_statuses(
            resolve_adapters(after_change, {}, [], BASE),
            deployed_adapters(app),
            running=app is not None and app.running,
            listed=frozenset(await model_ids(base)),
        )
        assert [(a.name, a.state) for a in states] == [("sql", "Ready"), ("broken", "Failed")]
        # An unchanged config sends no PUT (the reconcile loop does not redeploy).
        assert not await ray.serve.put_application(APP, app_config(after_change))
    finally:
        await ray.serve.delete_application(APP)
