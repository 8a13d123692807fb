"""RayClient against a fake head (httpx.MockTransport): auth, retries, error mapping, idempotent
submit, log tail fallback, Serve read-modify-write (also under concurrency)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from llmray.ray import (
    RayAPIError,
    RayAuthError,
    RayClient,
    RayHeadUnavailable,
    RayNotFound,
    RetryPolicy,
)

pytestmark = pytest.mark.unit

TOKEN = "s3cret-token"
FAST = RetryPolicy(attempts=3, backoff_s=0.0)
Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, retry: RetryPolicy = FAST) -> RayClient:
    return RayClient("http://head:8265", TOKEN, retry=retry, transport=httpx.MockTransport(handler))


def job(sid: str, status: str = "RUNNING", **extra: Any) -> dict[str, Any]:
    return {"submission_id": sid, "status": status, "entrypoint": "echo", **extra}


async def test_sends_bearer_token_and_reads_version() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(200, json={"ray_version": "2.60.0"})

    async with client(handler) as ray:
        assert await ray.version() == "2.60.0"
    assert seen == [f"Bearer {TOKEN}"]


async def test_no_token_sends_no_header() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert "authorization" not in request.headers
        return httpx.Response(200, json={"ray_version": "x"})

    async with RayClient("http://head:8265", None, transport=httpx.MockTransport(handler)) as ray:
        await ray.version()


async def test_retries_5xx_then_succeeds() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503 if calls < 3 else 200, json=job("j"))

    async with client(handler) as ray:
        assert (await ray.jobs.get("j")).submission_id == "j"
    assert calls == 3


async def test_5xx_exhausted_raises_api_error_with_status_and_body() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(500, text="Traceback...\nKeyError: boom")

    async with client(handler) as ray:
        with pytest.raises(RayAPIError) as info:
            await ray.jobs.get("j")
    assert calls == 3
    assert info.value.status == 500 and "KeyError: boom" in info.value.body
    assert "HTTP 500: KeyError: boom" in str(info.value)


async def test_connection_refused_is_head_unavailable_after_retries() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("connection refused", request=request)

    async with client(handler) as ray:
        with pytest.raises(RayHeadUnavailable, match="http://head:8265") as info:
            await ray.jobs.list()
    assert calls == 3
    assert TOKEN not in str(info.value)


async def test_timeout_is_head_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    async with client(handler) as ray:
        with pytest.raises(RayHeadUnavailable, match="ReadTimeout"):
            await ray.cluster.status()


@pytest.mark.parametrize(("status", "text"), [(401, "Missing authentication token"), (403, "Invalid token")])
async def test_auth_errors_are_not_retried(status: int, text: str) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status, text=f"Unauthorized: {text}")

    async with client(handler) as ray:
        with pytest.raises(RayAuthError) as info:
            await ray.jobs.get("j")
    assert calls == 1 and info.value.status == status
    assert TOKEN not in str(info.value)


async def test_not_found_and_find() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="Job nope does not exist")

    async with client(handler) as ray:
        with pytest.raises(RayNotFound):
            await ray.jobs.get("nope")
        assert await ray.jobs.find("nope") is None


async def test_non_json_answer_is_an_api_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>proxy login</html>")

    async with client(handler) as ray:
        with pytest.raises(RayAPIError, match="not JSON"):
            await ray.jobs.get("j")


# --- jobs --------------------------------------------------------------------------------------


class FakeJobs:
    """A fake Jobs API keeping jobs in a dict; answers duplicates like Ray 2.60 (HTTP 500)."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.posts = 0
        self.log_file_calls = 0
        self.full_log_calls = 0
        self.logs = "".join(f"line {i}\n" for i in range(500))
        self.state_api_ok = True

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/api/jobs/":
            self.posts += 1
            body = json.loads(request.content)
            sid = body["submission_id"]
            if sid in self.jobs:
                return httpx.Response(500, text=f"ValueError: Job with submission_id {sid} already exists.")
            self.jobs[sid] = job(sid, "PENDING", metadata=body.get("metadata"), driver_node_id="n1")
            return httpx.Response(200, json={"job_id": sid, "submission_id": sid})
        if path == "/api/v0/logs/file":
            self.log_file_calls += 1
            if not self.state_api_ok:
                return httpx.Response(500, text="Could not find a log file.")
            lines = int(request.url.params["lines"])
            assert request.url.params["node_id"] == "n1"
            return httpx.Response(200, text="".join(self.logs.splitlines(keepends=True)[-lines:]))
        sid = path.split("/")[3]
        if sid not in self.jobs:
            return httpx.Response(404, text=f"Job {sid} does not exist")
        if path.endswith("/logs"):
            self.full_log_calls += 1
            return httpx.Response(200, json={"logs": self.logs})
        if path.endswith("/stop"):
            was_running = self.jobs[sid]["status"] in ("PENDING", "RUNNING")
            self.jobs[sid]["status"] = "STOPPED"
            return httpx.Response(200, json={"stopped": was_running})
        return httpx.Response(200, json=self.jobs[sid])


async def test_submit_is_idempotent() -> None:
    fake = FakeJobs()
    async with client(fake) as ray:
        first = await ray.jobs.submit("python x.py", submission_id="ns-job-0", metadata={"k": "v"})
        second = await ray.jobs.submit("python x.py", submission_id="ns-job-0")
    assert first.created and not second.created
    assert first.job.submission_id == second.job.submission_id == "ns-job-0"
    assert len(fake.jobs) == 1
    assert fake.posts == 2  # the "already exists" 500 is final, not retried


async def test_submit_body_omits_unset_fields() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            bodies.append(json.loads(request.content))
            return httpx.Response(200, json={"submission_id": "s"})
        return httpx.Response(200, json=job("s"))

    async with client(handler) as ray:
        await ray.jobs.submit("e", submission_id="s", entrypoint_num_cpus=0.5, entrypoint_resources={"x": 1})
    assert bodies == [
        {
            "entrypoint": "e",
            "submission_id": "s",
            "entrypoint_num_cpus": 0.5,
            "entrypoint_resources": {"x": 1},
        }
    ]


async def test_stop_and_tail() -> None:
    fake = FakeJobs()
    async with client(fake) as ray:
        await ray.jobs.submit("e", submission_id="s")
        assert await ray.jobs.tail("s", lines=2) == "line 498\nline 499\n"
        assert fake.log_file_calls == 1
        fake.state_api_ok = False  # no log file (yet): nothing, and never the whole log instead
        assert await ray.jobs.tail("s", lines=1, driver_node_id="n1") == ""
        assert fake.log_file_calls == 2  # not retried
        assert fake.full_log_calls == 0
        assert await ray.jobs.stop("s") is True
        assert await ray.jobs.stop("s") is False
        with pytest.raises(RayNotFound):
            await ray.jobs.stop("other")


async def test_tail_of_a_job_without_driver_node_is_empty_and_never_reads_the_whole_log() -> None:
    fake = FakeJobs()
    async with client(fake) as ray:
        await ray.jobs.submit("e", submission_id="s")
        fake.jobs["s"]["driver_node_id"] = None
        assert await ray.jobs.tail("s", lines=1) == ""
        assert await ray.jobs.logs("s") == fake.logs  # the whole log only when asked for
    assert fake.log_file_calls == 0 and fake.full_log_calls == 1


async def test_list_skips_non_submission_drivers() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[job("a", "SUCCEEDED"), {"job_id": "01000000", "status": "RUNNING"}])

    async with client(handler) as ray:
        assert [j.submission_id for j in await ray.jobs.list()] == ["a"]


# --- serve -------------------------------------------------------------------------------------


class FakeServe:
    """A fake Serve REST API: GET reports what the last PUT deployed; PUT replaces everything."""

    def __init__(self, delay: float = 0.0) -> None:
        self.apps: dict[str, dict[str, Any]] = {}
        self.http_options: dict[str, Any] | None = None
        self.puts: list[dict[str, Any]] = []
        self.delay = delay

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(self.delay)
        if request.method == "PUT":
            body = json.loads(request.content)
            self.puts.append(body)
            if self.http_options is None:
                self.http_options = body.get("http_options", {"host": "0.0.0.0", "port": 8000})
            self.apps = {a["name"]: a for a in body["applications"]}
            return httpx.Response(200)
        if self.http_options is None:
            return httpx.Response(200, json={"controller_info": {}, "applications": {}})
        return httpx.Response(
            200,
            json={
                "controller_info": {"node_id": "n"},
                "http_options": self.http_options,
                "proxy_location": "EveryNode",
                "applications": {
                    name: {
                        "name": name,
                        "status": "RUNNING",
                        "source": "declarative",
                        "deployed_app_config": cfg,
                    }
                    for name, cfg in self.apps.items()
                },
            },
        )


def mock_client(handler: Any) -> RayClient:
    return RayClient("http://serve-head:8265", TOKEN, retry=FAST, transport=httpx.MockTransport(handler))


async def test_put_application_read_modify_write() -> None:
    fake = FakeServe()
    async with mock_client(fake) as ray:
        defaults = {"http_options": {"host": "127.0.0.1", "port": 8123}}
        assert await ray.serve.put_application("a", {"import_path": "m:a"}, instance_defaults=defaults)
        assert await ray.serve.put_application("b", {"import_path": "m:b", "route_prefix": "/b"})
        assert set(fake.apps) == {"a", "b"}
        assert fake.puts[1]["http_options"] == {"host": "127.0.0.1", "port": 8123}  # carried over
        # unchanged config: no PUT
        assert not await ray.serve.put_application("a", {"import_path": "m:a"})
        assert len(fake.puts) == 2
        # update a, keep b
        assert await ray.serve.put_application("a", {"import_path": "m:a2"})
        assert fake.apps["a"]["import_path"] == "m:a2" and "b" in fake.apps
        # delete a, keep b; deleting again is a no-op
        assert await ray.serve.delete_application("a")
        assert set(fake.apps) == {"b"}
        assert not await ray.serve.delete_application("a")
        app = await ray.serve.get_application("b")
        assert app is not None and app.running
        assert await ray.serve.get_application("a") is None


async def test_concurrent_puts_on_one_head_keep_both_apps() -> None:
    fake = FakeServe(delay=0.01)  # slow answers widen the read-modify-write race window
    async with mock_client(fake) as r1, mock_client(fake) as r2:
        await asyncio.gather(
            r1.serve.put_application("x", {"import_path": "m:x", "route_prefix": "/x"}),
            r2.serve.put_application("y", {"import_path": "m:y", "route_prefix": "/y"}),
        )
    assert set(fake.apps) == {"x", "y"}


async def test_tail_does_not_swallow_auth_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, text="Invalid token")

    async with client(handler) as ray:
        with pytest.raises(RayAuthError):
            await ray.jobs.tail("s", driver_node_id="n1")


def test_every_error_has_a_status_reason() -> None:
    from llmray.ray import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.RayError)]
    reasons = [c.status_reason for c in classes]
    assert len(classes) >= 8 and len(set(reasons)) == len(reasons)
    assert all(r.isidentifier() and r[0].isupper() for r in reasons)
