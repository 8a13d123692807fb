"""llmray.ray against a real token-auth Ray head on 127.0.0.1 (the session's ``local_ray``).

Job entrypoints run ``sys.executable``: the job driver's PATH need not contain this venv.
Application and resource names carry a ``llmray-rc`` prefix because other tests share the head.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmray.api.runtime import parse_progress
from llmray.autoscaling import decide, worker_offer
from llmray.ray import (
    JobStatus,
    RayAuthError,
    RayClient,
    RayHeadUnavailable,
    RetryPolicy,
    Submission,
    submission_id,
)
from tests.ray_cluster import LocalRay, free_port
from tests.waiting import async_wait_for

pytestmark = [pytest.mark.ray, pytest.mark.asyncio(loop_scope="session")]

REPO = Path(__file__).resolve().parents[2]
PY = shlex.quote(sys.executable)
GADGET = "llmray_rc_gadget"  # a custom resource no node has


@pytest.fixture
async def ray(local_ray: LocalRay) -> AsyncIterator[RayClient]:
    async with RayClient(local_ray.dashboard_url, local_ray.token) as client:
        yield client


def unique_id(name: str) -> str:
    return submission_id("llmray-rc", name, f"uid-{time.time_ns()}", 0)


async def submit(ray: RayClient, entrypoint: str, sid: str, **kwargs: Any) -> Submission:
    """Submit, retrying while a fresh head has no job agent yet ("No available agent", HTTP 500).

    Retrying is safe because submission is idempotent; that is also why ``created`` of the
    returned submission may be False when an earlier, timed-out attempt did create the job.
    """
    return await async_wait_for(
        lambda: ray.jobs.submit(entrypoint, submission_id=sid, **kwargs),
        timeout=180,
        what=f"the head to accept job {sid}",
        interval=2,
    )


async def wait_status(ray: RayClient, sid: str, *wanted: JobStatus, timeout: float = 120) -> JobStatus:
    async def probe() -> JobStatus | None:
        status = (await ray.jobs.get(sid)).status
        return status if status in wanted else None

    return await async_wait_for(probe, timeout=timeout, what=f"job {sid} to reach {wanted}", interval=0.5)


# --- jobs --------------------------------------------------------------------------------------


async def test_submit_twice_runs_once_and_logs_progress(ray: RayClient) -> None:
    sid = unique_id("progress")
    progress = json.dumps({"step": 3, "totalSteps": 10, "loss": 1.5})
    code = f"print('LLMRAY_PROGRESS ' + {progress!r})"
    entrypoint = f"{PY} -c {shlex.quote(code)}"
    first = await submit(ray, entrypoint, sid, metadata={"llmray.io/name": "progress"})
    second = await ray.jobs.submit(entrypoint, submission_id=sid)
    assert not second.created
    assert first.job.submission_id == second.job.submission_id == sid
    assert [j.submission_id for j in await ray.jobs.list()].count(sid) == 1

    assert await wait_status(ray, sid, JobStatus.SUCCEEDED, JobStatus.FAILED) is JobStatus.SUCCEEDED
    info = await ray.jobs.get(sid)
    assert info.metadata == {"llmray.io/name": "progress"}
    assert info.start_time and info.end_time and info.end_time >= info.start_time
    logs = await ray.jobs.logs(sid)
    assert "LLMRAY_PROGRESS" in logs
    tail = await ray.jobs.tail(sid, lines=5)
    report = parse_progress(tail)
    assert report is not None and report.step == 3 and report.loss == 1.5


async def test_stop_long_job(ray: RayClient) -> None:
    sid = unique_id("sleeper")
    await submit(ray, f"{PY} -c 'import time; time.sleep(600)'", sid)
    await wait_status(ray, sid, JobStatus.RUNNING)
    assert await ray.jobs.stop(sid) is True
    assert await wait_status(ray, sid, JobStatus.STOPPED, JobStatus.FAILED) is JobStatus.STOPPED
    assert (await ray.jobs.get(sid)).terminal


async def test_unknown_job(ray: RayClient) -> None:
    assert await ray.jobs.find("llmray-rc-does-not-exist") is None


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["wrong-token", None])
async def test_wrong_or_missing_token_is_an_auth_error(local_ray: LocalRay, token: str | None) -> None:
    async with RayClient(local_ray.dashboard_url, token) as client:
        with pytest.raises(RayAuthError) as info:
            await client.jobs.list()
    assert info.value.status in (401, 403)
    assert "authentication token" in info.value.body


async def test_head_down_is_unavailable_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    async with RayClient(url, "t", retry=RetryPolicy(attempts=3, backoff_s=0.1)) as client:
        with pytest.raises(RayHeadUnavailable, match=r"127\.0\.0\.1"):
            await client.jobs.get("x")
    assert time.monotonic() - started < 5


# --- serve -------------------------------------------------------------------------------------


def app_config(message: str, prefix: str) -> dict[str, object]:
    return {
        "import_path": "tests.ray.serve_dummy:build",
        "route_prefix": prefix,
        "args": {"message": message},
        "runtime_env": {"env_vars": {"PYTHONPATH": str(REPO)}},
    }


async def test_serve_read_modify_write_keeps_other_apps(ray: RayClient) -> None:
    a, b = "llmray-rc-a", "llmray-rc-b"
    # These options apply only if this PUT starts Serve (another test may have started it).
    defaults = {"http_options": {"host": "127.0.0.1", "port": free_port()}, "proxy_location": "HeadOnly"}
    try:
        assert await ray.serve.put_application(a, app_config("A", "/rc-a"), instance_defaults=defaults)
        assert await ray.serve.put_application(b, app_config("B", "/rc-b"))

        async def both_running() -> bool:
            apps = (await ray.serve.get_applications()).applications
            return all(name in apps and apps[name].running for name in (a, b))

        await async_wait_for(both_running, timeout=180, what="apps A and B RUNNING", interval=1)
        inst = await ray.serve.get_applications()
        assert inst.applications[a].running_replicas == inst.applications[a].target_replicas == 1
        assert inst.http_options["host"] == "127.0.0.1"
        base = f"http://127.0.0.1:{inst.http_options['port']}"
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{base}/rc-a")).text == "A"
            assert (await http.get(f"{base}/rc-b")).text == "B"
        # Same config again: nothing is written.
        assert not await ray.serve.put_application(b, app_config("B", "/rc-b"))

        assert await ray.serve.delete_application(a)

        async def a_gone() -> bool:
            apps = (await ray.serve.get_applications()).applications
            return a not in apps and b in apps

        await async_wait_for(a_gone, timeout=120, what="app A deleted, B kept", interval=1)
    finally:
        for name in (a, b):
            await ray.serve.delete_application(name)


# --- cluster status ----------------------------------------------------------------------------

DEMAND_DRIVER = f"""
import time
import ray
from ray.util.placement_group import placement_group

ray.init()

@ray.remote(num_cpus=64)
def big():
    return 1

@ray.remote(num_cpus=1, resources={{"{GADGET}": 1}})
def gadget():
    return 1

refs = [big.remote(), gadget.remote(), gadget.remote()]
pg = placement_group([{{"CPU": 32}}, {{"CPU": 32}}], strategy="STRICT_SPREAD")
print("demand created", flush=True)
time.sleep(600)
"""


async def test_cluster_status_reports_pending_demand(ray: RayClient, tmp_path: Path) -> None:
    script = tmp_path / "demand.py"
    script.write_text(DEMAND_DRIVER)
    sid = unique_id("demand")
    await submit(ray, f"{PY} {shlex.quote(str(script))}", sid)
    try:

        async def demand_seen() -> bool:
            status = await ray.cluster.status()
            shapes = {tuple(sorted(d.shape.items())): d.count for d in status.demand}
            gangs = [g for g in status.gang_demand if g.strategy == "STRICT_SPREAD"]
            return (
                shapes.get((("CPU", 64.0),)) == 1
                and shapes.get((("CPU", 1.0), (GADGET, 1.0))) == 2
                and any(g.bundles[0].shape == {"CPU": 32.0} for g in gangs)
            )

        await async_wait_for(
            demand_seen, timeout=120, what="the pending demand in cluster status", interval=1
        )
        status = await ray.cluster.status()
        assert status.reported and status.total["CPU"] >= 1

        # The autoscaler's view of it (only this test's demand: the head is shared): 32-CPU workers
        # with the gadget take the placement group (two workers, one bundle each) and both gadget
        # tasks (a third), never the 64-CPU task.
        ours = [d for d in status.demand if GADGET in d.shape or d.shape == {"CPU": 64.0}]
        gangs = [g for g in status.gang_demand if g.bundles[0].shape == {"CPU": 32.0}]
        offer = worker_offer("32", 0, None, {GADGET: 4})
        decision = decide(ours, offer, [], min_replicas=0, max_replicas=4, idle_timeout_s=60, gangs=gangs)
        assert decision.infeasible == ({"CPU": 64.0},)
        assert decision.add == 3  # 2 for the STRICT_SPREAD group + 1 for both gadget tasks

        nodes = await ray.cluster.nodes()
        assert any(n.is_head and n.alive for n in nodes)
    finally:
        await ray.jobs.stop(sid)
        await wait_status(ray, sid, JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED)
