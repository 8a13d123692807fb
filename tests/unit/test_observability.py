"""Issue 14, operator side: metrics that move, serving stats in status, MFU, threshold conditions."""

from __future__ import annotations

import base64
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmray.api import deployment as deployment_api
from llmray.api import training as training_api
from llmray.api.runtime import ProgressReport
from llmray.api.telemetry import SERVING_STATS_PATH, ServingStats
from llmray.api.training import Progress
from llmray.builders.cluster import network_policy, operator_peer, training_cluster
from llmray.builders.common import Owner
from llmray.controllers import cluster as cluster_module
from llmray.controllers import runtime
from llmray.controllers.decisions import mfu_text, progress_status
from llmray.controllers.machines import queue_full, training_stalled
from llmray.controllers.settings import Settings
from llmray.controllers.topology import SharedHead
from llmray.metrics import RESOURCES, endpoint_label, status_class
from llmray.ray import NO_RETRY, RayBadResponse, RayHeadUnavailable, RayResponseTooLarge
from llmray.ray._http import RayHTTP
from llmray.ray.jobs import JobStatus
from llmray.ray.serving import fetch_serving_stats, serving_status, significant, steady_serving

from . import test_deployment_controller as dep
from . import test_training_controller as tr
from .fakes import World

pytestmark = pytest.mark.unit


def sample(name: str, **labels: str) -> float:
    """The value of one sample of the default registry, as a scraper would parse it (0 if absent)."""
    total = 0.0
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# --- Ray REST metrics --------------------------------------------------------------------------------


def http(handler: Any, base: str = "http://head:8265", token: str | None = "t") -> RayHTTP:
    return RayHTTP(base, token, retry=NO_RETRY, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/api/jobs/", "/api/jobs/"),
        ("/api/jobs/team-ft-0123456789-0", "/api/jobs/{id}"),
        ("/api/jobs/team-ft-0123456789-0/logs", "/api/jobs/{id}/logs"),
        ("/api/jobs/x/stop", "/api/jobs/{id}/stop"),
        ("/api/serve/applications/", "/api/serve/applications/"),
        ("/nodes?view=summary", "/nodes"),
        ("/llmray/stats", "/llmray/stats"),
        ("/some/other/a1b2c3", "other"),
    ],
)
def test_endpoint_labels_carry_no_ids(path: str, label: str) -> None:
    assert endpoint_label(path) == label


def test_status_class_is_bounded() -> None:
    assert [status_class(c) for c in (200, 404, 503, 999, -1)] == ["2xx", "4xx", "5xx", "invalid", "invalid"]


async def test_ray_calls_count_by_endpoint_and_outcome() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/missing"):
            return httpx.Response(404, text="no such job")
        return httpx.Response(200, json={"status": "RUNNING"})

    ok = sample("llmray_ray_requests_total", endpoint="/api/jobs/{id}", method="GET", outcome="2xx")
    bad = sample("llmray_ray_requests_total", endpoint="/api/jobs/{id}", method="GET", outcome="4xx")
    timed = sample("llmray_ray_request_seconds_count", endpoint="/api/jobs/{id}", method="GET")
    client = http(handler)
    await client.get_object("/api/jobs/abc")
    await client.get_object("/api/jobs/def")
    with pytest.raises(Exception):  # noqa: B017 - RayNotFound; the metric is what is tested
        await client.get_object("/api/jobs/missing")
    job = {"endpoint": "/api/jobs/{id}", "method": "GET"}
    assert sample("llmray_ray_requests_total", **job, outcome="2xx") == ok + 2
    assert sample("llmray_ray_requests_total", **job, outcome="4xx") == bad + 1
    assert sample("llmray_ray_request_seconds_count", **job) == timed + 3


async def test_unreachable_head_counts_as_unreachable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    before = sample("llmray_ray_requests_total", endpoint="/api/cluster_status", outcome="unreachable")
    with pytest.raises(RayHeadUnavailable):
        await http(handler).get_object("/api/cluster_status")
    after = sample("llmray_ray_requests_total", endpoint="/api/cluster_status", outcome="unreachable")
    assert after == before + 1


# --- the work queue ------------------------------------------------------------------------------------


async def test_queue_oldest_wait_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    queue: runtime.WorkQueue[str] = runtime.WorkQueue()
    queue.add("a")
    clock[0] += 30
    queue.add("b")
    clock[0] += 12
    assert queue.oldest_wait() == pytest.approx(42)
    assert sample("llmray_queue_oldest_seconds") >= 42
    assert await queue.get() == "a"
    assert queue.oldest_wait() == pytest.approx(12)  # b waits since 1030
    assert await queue.get() == "b"
    assert queue.oldest_wait() == 0.0


# --- children and resources per phase -----------------------------------------------------------------


async def test_children_created_and_deleted_are_counted_per_kind() -> None:
    created = sample("llmray_children_created_total", kind="LLMTrainingJob", child="Pod")
    deleted = sample("llmray_children_deleted_total", kind="LLMTrainingJob", child="Pod")
    world = World()
    key = world.kube.apply(tr.KIND, tr.NS, "ft", tr.spec())
    await world.reconcile(key)
    assert sample("llmray_children_created_total", kind="LLMTrainingJob", child="Pod") == created + 3
    assert sample("llmray_children_created_total", kind="LLMTrainingJob", child="Service") >= 1
    one = {"replicas": 1, "resources": {"cpu": "1", "memory": "2Gi"}}  # fewer pods, same template
    world.kube.apply(tr.KIND, tr.NS, "ft", tr.spec(workers=one))
    await world.reconcile(key)
    assert sample("llmray_children_deleted_total", kind="LLMTrainingJob", child="Pod") == deleted + 1


async def test_resources_per_phase_are_read_from_the_caches() -> None:
    world = World()
    await dep.up(world)
    key = world.kube.apply(tr.KIND, tr.NS, "ft", tr.spec())
    await world.reconcile(key)
    store = world.deps.store
    counts = store.phase_counts()
    assert counts[("LLMDeployment", "Deploying")] == 1
    assert counts[("LLMTrainingJob", "Provisioning")] == 1
    previous = RESOURCES.source
    RESOURCES.source = store.phase_counts
    try:
        assert sample("llmray_resources", kind="LLMDeployment", phase="Deploying") == 1
        assert sample("llmray_resources", kind="LLMDeployment", phase="Ready") == 0  # zeros are exported
        assert sample("llmray_resources", kind="LLMTrainingJob", phase="Provisioning") == 1
    finally:
        RESOURCES.source = previous


# --- serving stats -------------------------------------------------------------------------------------


async def test_stats_are_read_with_the_api_key_and_a_404_means_none() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.url.path == "/team/chat" + SERVING_STATS_PATH:
            return httpx.Response(200, json={"requestsPerSecond": 3.5, "ttftP50Seconds": 0.12, "waiting": 2})
        return httpx.Response(404, json={"error": {"message": "not found"}})

    stats = await fetch_serving_stats(http(handler, "http://127.0.0.1:8000/team/chat", "key-1"))
    assert stats == ServingStats(requests_per_second=3.5, ttft_p50_seconds=0.12, waiting=2)
    assert seen == ["Bearer key-1"]
    assert await fetch_serving_stats(http(handler, "http://127.0.0.1:8000/other")) is None


async def test_oversized_or_malformed_stats_are_refused() -> None:
    def big(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"waiting": 1, "pad": "' + b"x" * 100_000 + b'"}')

    def wrong(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"running": "many"})

    with pytest.raises(RayResponseTooLarge):
        await fetch_serving_stats(http(big, "http://127.0.0.1:8000"))
    with pytest.raises(RayBadResponse):
        await fetch_serving_stats(http(wrong, "http://127.0.0.1:8000"))


def test_untrusted_figures_are_bounded() -> None:
    hostile = ServingStats(
        requests_per_second=math.inf, ttft_p50_seconds=math.nan, running=-4, waiting=10**30
    )
    status = serving_status(hostile)
    assert (status.requests_per_second, status.ttft_p50_ms, status.running) == (0.0, None, 0)
    assert status.waiting == 10_000_000
    fine = serving_status(ServingStats(requests_per_second=2.3456, ttft_p50_seconds=0.0421, running=3))
    assert (fine.requests_per_second, fine.ttft_p50_ms, fine.running) == (2.3, 42, 3)
    assert serving_status(ServingStats(ttft_p50_seconds=1e9)).ttft_p50_ms == 3_600_000
    assert (significant(1234.5), significant(0.04567), significant(0.0)) == (1200.0, 0.046, 0.0)
    assert serving_status(ServingStats(ttft_p50_seconds=1.2345)).ttft_p50_ms == 1200


def _figures(rps: float, ttft: float | None = 0.2, running: int = 20, waiting: int = 0) -> Any:
    return serving_status(
        ServingStats(requests_per_second=rps, ttft_p50_seconds=ttft, running=running, waiting=waiting)
    )


def test_serving_figures_are_rewritten_on_real_change_only() -> None:
    shown = _figures(40.0)
    for jitter in (0.9, 1.1, 0.95, 1.15):  # a steady load: every poll differs a little
        steady = _figures(40.0 * jitter, ttft=0.2 * jitter, running=round(20 * jitter))
        assert steady != shown and steady_serving(shown, steady) is shown
    for moved in (
        _figures(80.0),
        _figures(40.0, ttft=0.5),
        _figures(40.0, running=40),
        _figures(40.0, waiting=1),
    ):
        assert steady_serving(shown, moved) is moved  # 2x, or a queue appears
    assert steady_serving(shown, _figures(0.0)).requests_per_second == 0.0  # idle again
    assert steady_serving(shown, _figures(40.0, ttft=None)).ttft_p50_ms is None
    assert steady_serving(None, shown) is shown and steady_serving(shown, None) is None
    # Compared with what status shows, not the last poll: a slow drift is written once it adds up.
    assert (
        steady_serving(shown, _figures(44.0)) is shown
        and steady_serving(shown, _figures(52.0)).requests_per_second == 52.0
    )


def route_url(world: World, name: str = "chat") -> str:
    return world.settings.topology.head(name, dep.NS).serve_url


@pytest.mark.parametrize(("running", "target"), [(0, 0), (1, 0), (0, 1)])
async def test_an_app_at_or_toward_zero_replicas_is_not_polled(running: int, target: int) -> None:
    """A stats poll is a request: at zero replicas Serve would start one for it (scale-from-zero),
    so an app Serve is taking to zero, or that has no replica yet, is never polled."""
    world = World()
    key = await dep.up(world, autoscaling={"minReplicas": 0, "maxReplicas": 1})
    world.head_of(key).set_app("chat", "RUNNING", running=running, target=target)
    world.ray.stats[route_url(world)] = ServingStats(requests_per_second=4.0)
    await world.reconcile(key)
    assert world.ray.stats_calls == []
    assert world.kube.status(key).get("serving", {}).get("requestsPerSecond", 0) == 0


async def test_deployment_status_mirrors_serving_and_raises_queue_full() -> None:
    world = World()
    key = await dep.up(world, limits={"maxQueuedRequests": 10})
    world.head_of(key).set_app("chat", "RUNNING")
    stats = ServingStats(requests_per_second=4.0, ttft_p50_seconds=0.25, running=2)
    world.ray.stats[route_url(world)] = stats
    await world.reconcile(key)
    status = world.kube.status(key)
    assert status["phase"] == "Ready"
    assert status["serving"] == {"requestsPerSecond": 4.0, "ttftP50Ms": 250, "running": 2, "waiting": 0}
    assert world.condition(key, "QueueFull")["status"] == "False"
    # Its own head: the cluster's Ray token opens the stats route.
    assert world.ray.stats_calls[-1] == (route_url(world), cluster_token(world))

    world.ray.stats[route_url(world)] = ServingStats(running=32, waiting=9)  # 9 >= 0.9 * 10
    await world.reconcile(key)
    cond = world.condition(key, "QueueFull")
    assert (cond["status"], cond["reason"]) == ("True", "Saturated")
    assert "9 requests waiting" in cond["message"] and "maxReplicas" in cond["message"]
    warnings = [(t, r) for n, t, r, _ in world.events if r == "Saturated"]
    assert warnings == [("Warning", "Saturated")]
    await world.reconcile(key)  # still full: no second Event
    assert world.reasons().count("Saturated") == 1

    world.ray.stats[route_url(world)] = ServingStats(waiting=1)
    await world.reconcile(key)
    assert world.condition(key, "QueueFull")["status"] == "False"
    assert world.reasons().count("BelowLimit") == 1  # the Normal "cleared" Event


async def test_a_steady_load_writes_no_status_and_a_doubled_one_does() -> None:
    """Under traffic the figures change on most polls; only a real change costs a status write."""
    world = World()
    key = await dep.up(world)
    world.head_of(key).set_app("chat", "RUNNING")
    url = route_url(world)
    world.ray.stats[url] = ServingStats(requests_per_second=40.0, ttft_p50_seconds=0.2, running=20)
    await world.reconcile(key)
    assert world.kube.status(key)["serving"]["requestsPerSecond"] == 40.0

    def writes() -> int:
        return sum(1 for c in world.kube.calls if c[0] == "patch_status")

    before = writes()
    for jitter in (1.04, 0.93, 1.12, 0.97, 1.08):
        world.ray.stats[url] = ServingStats(
            requests_per_second=40.0 * jitter, ttft_p50_seconds=0.2 * jitter, running=round(20 * jitter)
        )
        await world.reconcile(key)
    assert writes() == before and len(world.ray.stats_calls) >= 6  # polled every pass, written never
    world.ray.stats[url] = ServingStats(requests_per_second=80.0, ttft_p50_seconds=0.2, running=20)
    await world.reconcile(key)
    assert writes() == before + 1
    assert world.kube.status(key)["serving"]["requestsPerSecond"] == 80.0


async def test_no_stats_route_means_no_serving_status_and_no_condition() -> None:
    world = World()
    key = await dep.up(world)
    world.head_of(key).set_app("chat", "RUNNING")
    await world.reconcile(key)  # FakeRay answers None (404) for unknown routes
    status = world.kube.status(key)
    assert status["phase"] == "Ready" and "serving" not in status
    assert world.condition(key, "QueueFull") == {}


async def test_a_failing_stats_route_is_not_a_deployment_problem() -> None:
    world = World()
    key = await dep.up(world)
    world.head_of(key).set_app("chat", "RUNNING")
    world.ray.stats[route_url(world)] = ServingStats(requests_per_second=1.0)
    await world.reconcile(key)
    assert world.kube.status(key)["serving"]["requestsPerSecond"] == 1.0
    world.ray.stats[route_url(world)] = RayHeadUnavailable(route_url(world), "timed out")
    await world.reconcile(key)
    status = world.kube.status(key)
    assert status["phase"] == "Ready" and "serving" not in status  # stale figures are dropped


def cluster_token(world: World) -> str:
    """The Ray token the operator put in the cluster's ``<name>-ray-auth`` Secret."""
    data = world.kube.objects[("Secret", dep.NS, "chat-ray-auth")]
    raw = (data.get("data") or {}).get("auth_token") or ""
    token = base64.b64decode(raw).decode() if raw else (data.get("stringData") or {})["auth_token"]
    assert token
    return str(token)


async def test_own_head_stats_use_the_cluster_token_not_the_users_secret() -> None:
    world = World()
    world.kube.objects[("Secret", dep.NS, "chat-key")] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "chat-key", "namespace": dep.NS},
        "data": {"key": "c2VjcmV0"},  # "secret"
    }
    key = await dep.up(world, apiKeySecretRef={"name": "chat-key", "key": "key"})
    world.head_of(key).set_app("chat", "RUNNING")
    reads = [c for c in world.kube.calls if c[:2] == ("get", "Secret")]
    await world.reconcile(key)
    assert world.ray.stats_calls[-1] == (route_url(world), cluster_token(world))
    assert [c for c in world.kube.calls if c[:2] == ("get", "Secret")] == reads  # no Secret read


async def test_a_shared_head_stats_poll_reads_no_secret_of_its_own() -> None:
    """On a shared head the deploy step reads the app key; the poll uses that (even when it is
    empty) and never reads the user's Secret a second time."""
    world = World(Settings(topology=SharedHead("http://127.0.0.1:8265", "http://127.0.0.1:8000")))
    world.kube.objects[("Secret", dep.NS, "chat-key")] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "chat-key", "namespace": dep.NS},
        "data": {"key": ""},  # present but empty: the app has no key
    }
    key = await dep.up(world, apiKeySecretRef={"name": "chat-key", "key": "key"})
    world.head_of(key).set_app("team-chat", "RUNNING")
    reads = sum(1 for c in world.kube.calls if c[:2] == ("get", "Secret"))
    await world.reconcile(key)
    assert world.ray.stats_calls and world.ray.stats_calls[-1][1] is None
    assert sum(1 for c in world.kube.calls if c[:2] == ("get", "Secret")) == reads + 1  # the deploy's


# --- training: MFU and Stalled -------------------------------------------------------------------------


def test_mfu_text_bounds_the_report() -> None:
    assert [mfu_text(v) for v in (0.4123, 0.0, 1.0)] == ["41.2%", "0.0%", "100.0%"]
    assert [mfu_text(v) for v in (None, math.nan, math.inf, -0.1, 1.7)] == ["", "", "", "", ""]


def test_progress_report_carries_mfu_into_status() -> None:
    report = ProgressReport.model_validate(json.loads('{"step": 3, "totalSteps": 9, "mfu": 0.38}'))
    progress, _ = progress_status(report, Progress(), datetime.now(UTC))
    assert progress.mfu == "38.0%"
    line = '{"step": 3, "tokensPerSecond": Infinity, "mfu": NaN}'  # Python's json accepts these
    hostile = ProgressReport.model_validate(json.loads(line))
    progress, _ = progress_status(hostile, Progress(), datetime.now(UTC))
    assert (progress.mfu, progress.tokens_per_second) == ("", 0)


def test_mfu_column_shows_in_wide_output() -> None:
    column = next(c for c in training_api.PRINTER_COLUMNS if c["name"] == "MFU")
    assert column == {
        "name": "MFU",
        "type": "string",
        "jsonPath": ".status.progress.mfu",
        "priority": 1,
        "description": "model FLOPs utilisation",
    }
    names = [c["name"] for c in deployment_api.PRINTER_COLUMNS if c.get("priority") == 1]
    assert {"Req/s", "TTFT-ms", "Waiting"} <= set(names)


def test_training_stalled_thresholds() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    assert training_stalled("Provisioning", t0, t0 + timedelta(hours=1), 600) is None
    assert training_stalled("Running", None, t0, 600) is None
    quiet = training_stalled("Running", t0, t0 + timedelta(seconds=599), 600)
    assert quiet is not None and not quiet.active
    stalled = training_stalled("Running", t0, t0 + timedelta(seconds=725), 600)
    assert stalled is not None and stalled.active and stalled.reason == "NoProgress"
    assert "for more than 10m" in stalled.message and "12m" not in stalled.message
    later_still = training_stalled("Running", t0, t0 + timedelta(seconds=900), 600)
    assert later_still is not None and later_still.message == stalled.message  # no write every pass


def test_queue_full_thresholds() -> None:
    assert not queue_full(56, 64, 0.9).active
    assert queue_full(57, 64, 0.9).active  # int(64 * 0.9) = 57
    assert queue_full(1, 0, 0.9).active  # no queue allowed: anything waiting is turned away


def later(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Passes from now on run ``seconds`` in the future (the pass's clock is ``cluster.now``)."""
    start = datetime.now(UTC)
    monkeypatch.setattr(cluster_module, "now", lambda: start + timedelta(seconds=seconds))


async def test_stalled_job_gets_a_condition_and_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(Settings(stalled_after=600))
    key, uid = await tr.running_job(world)
    head = world.head_of(key)
    head.set_job(tr.sid(uid, 0), JobStatus.RUNNING)
    await world.reconcile(key)
    assert world.condition(key, "Stalled")["status"] == "False"
    later(monkeypatch, 601)
    await world.reconcile(key)  # no report since the submission, ten minutes ago
    cond = world.condition(key, "Stalled")
    assert (cond["status"], cond["reason"]) == ("True", "NoProgress")
    assert world.reasons().count("NoProgress") == 1
    head.logs[tr.sid(uid, 0)] = 'LLMRAY_PROGRESS {"step": 1, "totalSteps": 10}\n'
    await world.reconcile(key)  # a new report: progressing again
    assert world.condition(key, "Stalled")["status"] == "False"
    assert world.reasons().count("Progressing") == 1


async def test_finished_job_drops_the_stalled_condition(monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(Settings(stalled_after=600))
    key, uid = await tr.running_job(world)
    head = world.head_of(key)
    head.set_job(tr.sid(uid, 0), JobStatus.RUNNING)
    later(monkeypatch, 3600)
    await world.reconcile(key)
    assert world.condition(key, "Stalled")["status"] == "True"
    head.set_job(tr.sid(uid, 0), JobStatus.SUCCEEDED)
    await world.reconcile(key)
    assert world.phase(key) == "Succeeded"
    assert world.condition(key, "Stalled") == {}


# --- NetworkPolicy: the monitoring namespace may scrape Ray's metrics port --------------------------


def test_metrics_peer_may_scrape_only_the_metrics_port() -> None:
    owner = Owner(kind=tr.KIND, name="ft", namespace=tr.NS, uid="u1")
    cluster = training_cluster(owner, training_api.LLMTrainingJobSpec.model_validate(tr.spec()))
    peer = operator_peer("monitoring", "app.kubernetes.io/name=prometheus")
    rules = network_policy(cluster, None, peer)["spec"]["ingress"]
    scrape = [r for r in rules if r.get("from") == [peer]]
    assert scrape == [{"from": [peer], "ports": [{"port": 8080, "protocol": "TCP"}]}]
    assert not [r for r in network_policy(cluster, None)["spec"]["ingress"] if r.get("from") == [peer]]


def test_cli_flags_reach_the_settings() -> None:
    from llmray.cli import build_parser, settings_from_args

    def settings(*argv: str) -> Settings:
        return settings_from_args(build_parser().parse_args(["operator", *argv]), {})

    default = settings()
    assert (default.stalled_after, default.queue_full_ratio, default.metrics_peer) == (600.0, 0.9, None)
    custom = settings(
        "--stalled-after", "120", "--queue-full-ratio", "0.5",
        "--metrics-scraper-namespace", "monitoring", "--metrics-scraper-pod-labels", "app=prometheus",
    )  # fmt: skip
    assert (custom.stalled_after, custom.queue_full_ratio) == (120.0, 0.5)
    assert custom.metrics_peer == operator_peer("monitoring", "app=prometheus")


def test_ray_pods_expose_the_metrics_port_the_pod_monitor_scrapes() -> None:
    from llmray.builders.cluster import head_pod, worker_pod

    owner = Owner(kind=tr.KIND, name="ft", namespace=tr.NS, uid="u1")
    cluster = training_cluster(owner, training_api.LLMTrainingJobSpec.model_validate(tr.spec()))
    for pod in (head_pod(cluster, "a"), worker_pod(cluster, 0, "a")):
        container = pod["spec"]["containers"][0]
        assert {"name": "metrics", "containerPort": 8080} in [
            {"name": p["name"], "containerPort": p["containerPort"]} for p in container["ports"]
        ]
        command = " ".join(container.get("command", []) + container.get("args", []))
        assert "--metrics-export-port=8080" in command
        labels = pod["metadata"]["labels"]  # what charts/llmray/templates/monitoring.yaml selects
        assert labels["app.kubernetes.io/managed-by"] == "llmray-operator"
        assert labels["ray.io/node-type"] in ("head", "worker")


async def test_pooled_provider_polls_stats_over_the_shared_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmray.controllers import rayconn

    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        return httpx.Response(200, json={"running": 1})

    monkeypatch.setattr(
        rayconn, "pooled_client", lambda: httpx.AsyncClient(transport=httpx.MockTransport(handler))
    )
    provider = rayconn.PooledRay()
    try:
        stats = await provider.serving("http://127.0.0.1:8000/team/chat", "k").stats()
        assert stats == ServingStats(running=1)
        await provider.serving("http://127.0.0.1:8000/team/other", None).stats()
        assert seen == [
            ("http://127.0.0.1:8000/team/chat/llmray/stats", "Bearer k"),
            ("http://127.0.0.1:8000/team/other/llmray/stats", None),
        ]
    finally:
        await provider.aclose()
