"""Serving topology on a real two-node Ray cluster: model-version rollouts and per-node proxies.

Its own cluster, shaped like an LLMDeployment's pods: a head with no CPUs (controller and a proxy,
never a replica) and one worker node (the replicas) whose proxy binds its own port (Ray's
``RAY_SERVE_WORKER_PROXY_HTTP_PORT``: both nodes share 127.0.0.1 here, while in Kubernetes every pod
has its own IP and port 8000). The application is deployed the way the operator does it: the
config from :func:`llmray.controllers.decisions.serve_app_config`, written with the operator's
Serve client and instance options (``proxy_location: EveryNode``).

All traffic is loopback; request loops are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmray.api.deployment import LLMDeploymentSpec
from llmray.controllers.decisions import model_rollout, serve_app_config
from llmray.controllers.deployment import SERVE_INSTANCE_DEFAULTS
from llmray.ray import RayClient
from llmray.ray.serve import ServeApplication
from llmray_workloads.serve.config import MODEL_VERSION_HEADER
from tests.ray_cluster import (
    LocalRay,
    free_port,
    start_local_ray,
    start_local_worker,
    stop_local_ray,
    stop_local_ray_process,
)
from tests.waiting import restore_environ, wait_for

pytestmark = pytest.mark.ray

APP = "roll"
MODEL = "tiny"
LOOP_MAX_REQUESTS = 2_000
LOOP_MAX_SECONDS = 300.0


@dataclass
class TwoNodes:
    ray: LocalRay
    head_port: int
    worker_port: int
    model_dir: Path
    sources: dict[str, Path]
    deployed: dict[str, str] = field(default_factory=dict)

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/{APP}/v1"


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_client(ray: LocalRay, call: Any) -> Any:
    async with RayClient(ray.dashboard_url, ray.token) as client:
        return await call(client)


def get_app(cluster: TwoNodes) -> ServeApplication | None:
    return _run(_with_client(cluster.ray, lambda c: c.serve.get_application(APP)))  # type: ignore[no-any-return]


def serve_details(cluster: TwoNodes) -> dict[str, Any]:
    return _run(_with_client(cluster.ray, lambda c: c.serve.details()))  # type: ignore[no-any-return]


def publish_version(cluster: TwoNodes, version: str) -> None:
    """Write a new export into the same output folder, the way a training job's driver does."""
    from llmray_workloads.train.export import publish, staging_dir

    token = f"{version}-{time.time_ns()}"
    staging = staging_dir(cluster.model_dir, token)
    shutil.copytree(cluster.sources[version], staging)
    publish(staging, cluster.model_dir, version)


def deploy(cluster: TwoNodes, version: str) -> bool:
    """PUT the operator's config for ``version`` (Serve starts with the operator's instance options)."""
    spec = LLMDeploymentSpec.model_validate(
        {
            "model": {"fromTrainingJob": "ft", "name": MODEL},
            "engineArgs": {"maxNumSeqs": 8, "batchWaitTimeoutMs": 5},
            "resourcesPerReplica": {"cpu": "1", "memory": "512Mi"},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
            "limits": {"maxOngoingRequests": 8, "maxQueuedRequests": 64},
        }
    )
    config = serve_app_config(
        app_name=APP,
        route_prefix=f"/{APP}",
        resource_name=APP,
        spec=spec,
        model_path=str(cluster.model_dir),
        api_key=None,
        api_key_in_pods=True,
        model_version=version,
    )
    defaults = {**SERVE_INSTANCE_DEFAULTS, "http_options": {"host": "127.0.0.1", "port": cluster.head_port}}
    written: bool = _run(
        _with_client(cluster.ray, lambda c: c.serve.put_application(APP, config, instance_defaults=defaults))
    )
    cluster.deployed["version"] = version
    return written


def complete(client: httpx.Client, base: str, *, stream: bool = False) -> httpx.Response:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": stream}
    response = client.post(f"{base}/completions", json=body)
    if stream and response.status_code == 200:
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-200:]
    return response


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    """Head (0 CPUs) + worker node (4 CPUs, own proxy port) on 127.0.0.1; the driver connected."""
    from llmray_workloads.tiny import build_tiny_model

    base = Path(tempfile.gettempdir())
    sources = {
        "v1": build_tiny_model(base / "llmray-tiny-rollout-v1", seed=0),
        "v2": build_tiny_model(base / "llmray-tiny-rollout-v2", seed=1),
    }
    # A driver process keeps the first Ray token it read: after another module's cluster, this
    # process can only connect to a head that uses that same token.
    head = start_local_ray(num_cpus=0, token=os.environ.get("RAY_AUTH_TOKEN"))
    worker_port = free_port()
    saved = {k: os.environ.get(k) for k in [*head.env, "RAY_ADDRESS"]}
    os.environ.update(head.env)
    os.environ["RAY_ADDRESS"] = head.gcs_address
    worker = start_local_worker(head, 4, {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(worker_port)})
    # Imported only now: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 at import time, and only then
    # does the driver keep 127.0.0.1 instead of resolving it to the machine's interface address.
    from ray._private import ray_constants

    import ray as ray_api

    try:
        assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before its env: not loopback-only"
        if ray_api.is_initialized():  # another module's connection (the session head) must not be reused
            ray_api.shutdown()
        ray_api.init(address=head.gcs_address, log_to_driver=False)
        wait_for(
            lambda: len([n for n in ray_api.nodes() if n["Alive"]]) == 2,
            timeout=120,
            what="the worker node to join",
        )
        yield TwoNodes(head, free_port(), worker_port, tmp_path_factory.mktemp("rollout") / "model", sources)
    finally:
        if ray_api.is_initialized():
            ray_api.shutdown()
        stop_local_ray_process(worker)
        stop_local_ray(head)
        restore_environ(saved)


@pytest.fixture(scope="module")
def deployed(cluster: TwoNodes) -> TwoNodes:
    """The app serving v1 (unless a test already rolled it further), answering on the head's proxy."""
    if not cluster.deployed:
        publish_version(cluster, "v1")
        deploy(cluster, "v1")
    with httpx.Client(timeout=30) as client:
        wait_for(
            lambda: complete(client, cluster.url(cluster.head_port)).status_code == 200,
            timeout=240,
            what="the application to answer on the head's proxy",
            interval=1.0,
        )
    return cluster


@dataclass
class RequestLoop:
    """Sequential requests in a thread (alternately streamed) until stopped; every outcome kept."""

    base: str
    outcomes: list[tuple[float, str, str]] = field(default_factory=list)
    """(start time, "200" / status / error, model version header)."""
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        deadline = time.monotonic() + LOOP_MAX_SECONDS
        with httpx.Client(timeout=60) as client:
            for i in range(LOOP_MAX_REQUESTS):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                start = time.monotonic()
                try:
                    response = complete(client, self.base, stream=i % 2 == 1)
                    outcome = str(response.status_code)
                    version = response.headers.get(MODEL_VERSION_HEADER, "")
                except (httpx.HTTPError, AssertionError) as exc:
                    outcome, version = repr(exc), ""
                self.outcomes.append((start, outcome, version))

    def failures(self) -> list[tuple[float, str, str]]:
        return [o for o in self.outcomes if o[1] != "200"]

    def versions_since(self, since: float) -> list[str]:
        return [v for t, _, v in self.outcomes if t >= since]


def test_retrain_into_the_same_path_rolls_out_with_zero_failed_requests(deployed: TwoNodes) -> None:
    cluster = deployed
    assert cluster.deployed["version"] == "v1"
    loops = [RequestLoop(cluster.url(cluster.head_port)) for _ in range(2)]
    threads = [threading.Thread(target=loop.run, daemon=True) for loop in loops]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(loop.outcomes for loop in loops), timeout=60, what="the loops to start")
        assert {v for loop in loops for v in loop.versions_since(0)} == {"v1"}

        # The training job exports a new model into the same folder; the operator puts its version.
        publish_version(cluster, "v2")
        rollout_started = time.monotonic()
        assert deploy(cluster, "v2")
        running: list[int] = []  # replicas RUNNING at each look that lists the deployment's replicas

        def rolled_out() -> bool:
            app = get_app(cluster)
            if app is not None and any(d.replica_states for d in app.deployments.values()):
                running.append(app.running_replicas)  # (none listed while Serve rebuilds the app)
            return model_rollout("v1", "v2", app, just_written=False).serving == "v2"

        wait_for(
            rolled_out,
            timeout=300,
            what="Serve to run the v2 config (the operator's rollout decision)",
            interval=0.5,
        )
        rolled_out = time.monotonic()
        wait_for(
            lambda: all(loop.versions_since(rolled_out)[-3:] == ["v2"] * 3 for loop in loops),
            timeout=120,
            what="answers from v2 only",
        )
    finally:
        for loop in loops:
            loop.stop.set()
        for thread in threads:
            thread.join(timeout=120)
    outcomes = [o for loop in loops for o in loop.outcomes]
    during = [o for o in outcomes if rollout_started <= o[0] < rolled_out]
    assert [o for loop in loops for o in loop.failures()] == []
    # Surge: the new replica starts next to the old one, so capacity never dropped to zero.
    assert len(running) >= 3 and min(running) >= 1, running
    assert len(during) >= 2, "no request ran while the new version was rolling out"
    assert {o[2] for o in during} <= {"v1", "v2"}
    assert "v1" in {o[2] for o in during}, "the old version did not keep serving while v2 loaded"


def test_worker_proxy_serves_when_the_head_proxy_is_gone(deployed: TwoNodes) -> None:
    import ray as ray_api

    cluster = deployed
    details = serve_details(cluster)
    assert details.get("proxy_location") == "EveryNode"
    head_node = details["controller_info"]["node_id"]
    with httpx.Client(timeout=30) as client:
        # The replica runs on the worker node (the head has no CPUs), so Serve gives it a proxy.
        wait_for(
            lambda: client.get(f"http://127.0.0.1:{cluster.worker_port}/-/healthz").status_code == 200,
            timeout=120,
            what="the worker node's proxy to be healthy",
        )
        assert complete(client, cluster.url(cluster.worker_port)).status_code == 200
        proxies = serve_details(cluster)["proxies"]
        assert len(proxies) == 2 and head_node in proxies

        head_proxy = ray_api.get_actor(proxies[head_node]["actor_name"], namespace="serve")
        ray_api.kill(head_proxy, no_restart=True)

        def head_proxy_gone() -> bool:
            try:
                client.get(f"http://127.0.0.1:{cluster.head_port}/-/healthz", timeout=2)
            except httpx.TransportError:
                return True
            return False

        wait_for(head_proxy_gone, timeout=30, what="the head's proxy to stop answering", interval=0.05)
        answers = [complete(client, cluster.url(cluster.worker_port), stream=i % 2 == 1) for i in range(10)]
    assert [r.status_code for r in answers] == [200] * 10
    assert {r.headers.get(MODEL_VERSION_HEADER) for r in answers} == {cluster.deployed["version"]}
