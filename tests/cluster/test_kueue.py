"""LLMTrainingJobs queued by a real Kueue (v0.17, ``kueue`` fixture) and the real operator subprocess.

One ClusterQueue has GPU quota for one job; two WorkloadPriorityClasses. Job A (low) is admitted and
its pods appear (workers on the GPU flavor's nodes); job B (high) preempts A: A's Ray job is
stopped, its pods go, it says preempted and queued, B runs; B deleted: A is admitted again and
resumes as attempt 1; A succeeds: its Workload is Finished. A job on a queue without quota stays
Queued with Kueue's own message and no pods.

The operator runs in shared-head mode against a stub of Ray's Jobs REST API on 127.0.0.1 (kwok pods
run nothing), so attempts, stops and successes are observable.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.kueue import GROUP, VERSION, Kueue
from tests.kube import Kube, apply_yaml, wait_for

from .test_operator_fixtures import (
    apply,
    condition,
    crds_fixture,  # noqa: F401 - fixture
    operator_factory_fixture,  # noqa: F401 - fixture
    pods_of,
    status_of,
)
from .test_operator_rbac import _chart_rbac, _token_kubeconfig

pytestmark = pytest.mark.cluster

API = f"{GROUP}/{VERSION}"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


class JobsStub:
    """Ray's Jobs REST API, in memory, on 127.0.0.1: submit, get, stop (what training uses)."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?")[0].rstrip("/")
                sid = path.removeprefix("/api/jobs/")
                if path.startswith("/api/jobs/") and sid in stub.jobs:
                    self._send(200, stub.jobs[sid])
                elif path == "/api/jobs":
                    self._send(200, list(stub.jobs.values()))
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                path = self.path.split("?")[0].rstrip("/")
                if path == "/api/jobs":
                    sid = body["submission_id"]
                    if sid in stub.jobs:
                        self._send(400, {"error": f"Job with submission_id {sid} already exists"})
                        return
                    stub.jobs[sid] = {
                        "submission_id": sid,
                        "status": "RUNNING",
                        "metadata": body.get("metadata"),
                    }
                    self._send(200, {"submission_id": sid})
                elif (
                    path.endswith("/stop")
                    and path.removeprefix("/api/jobs/").removesuffix("/stop") in stub.jobs
                ):
                    stub.jobs[path.removeprefix("/api/jobs/").removesuffix("/stop")]["status"] = "STOPPED"
                    self._send(200, {"stopped": True})
                else:
                    self._send(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def of(self, job: str) -> dict[str, str]:
        """submission id -> status of ``job``'s Ray jobs."""
        return {
            sid: j["status"]
            for sid, j in dict(self.jobs).items()
            if (j.get("metadata") or {}).get("llmray.io/name") == job
        }


@pytest.fixture
def jobs_stub() -> Iterator[JobsStub]:
    stub = JobsStub()
    stub.thread.start()
    yield stub
    stub.server.shutdown()
    stub.server.server_close()


@pytest.fixture
def queues(kueue: Kueue, namespace: str) -> Iterator[dict[str, str]]:
    """Flavors (cpu/memory anywhere; GPUs on the GPU pool), a ClusterQueue with 2 GPUs (one job) that
    preempts lower priorities, one with no GPU quota, a LocalQueue on each, two priority classes."""
    kube = kueue.kube
    s = uuid.uuid4().hex[:6]
    n = {
        "any": f"any-{s}", "gpu": f"gpu-{s}", "cq": f"cq-{s}", "empty": f"empty-{s}",
        "low": f"low-{s}", "high": f"high-{s}",
    }  # fmt: skip

    def cq(name: str, gpus: str) -> dict[str, Any]:
        return {
            "apiVersion": API,
            "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory"],
                        "flavors": [
                            {
                                "name": n["any"],
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "100"},
                                    {"name": "memory", "nominalQuota": "1000Gi"},
                                ],
                            }
                        ],
                    },
                    {
                        "coveredResources": ["nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": n["gpu"],
                                "resources": [{"name": "nvidia.com/gpu", "nominalQuota": gpus}],
                            }
                        ],
                    },
                ],
            },
        }

    apply_yaml(
        kube,
        [
            {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": n["any"]}},
            {
                "apiVersion": API,
                "kind": "ResourceFlavor",
                "metadata": {"name": n["gpu"]},
                "spec": {"nodeLabels": {"llmray.io/node-pool": "gpu"}},
            },
            cq(n["cq"], "2"),
            cq(n["empty"], "0"),
            {
                "apiVersion": API,
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": n["low"]},
                "value": 100,
            },
            {
                "apiVersion": API,
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": n["high"]},
                "value": 1000,
            },
        ],
    )
    apply_yaml(
        kube,
        [
            {
                "apiVersion": API,
                "kind": "LocalQueue",
                "metadata": {"name": "team"},
                "spec": {"clusterQueue": n["cq"]},
            },
            {
                "apiVersion": API,
                "kind": "LocalQueue",
                "metadata": {"name": "none"},
                "spec": {"clusterQueue": n["empty"]},
            },
        ],
        namespace=namespace,
    )

    def active(name: str) -> bool:
        obj = json.loads(kube.kubectl("get", f"clusterqueues.{GROUP}", name, "-o", "json").stdout)
        return any(
            c["type"] == "Active" and c["status"] == "True"
            for c in obj.get("status", {}).get("conditions") or []
        )

    wait_for(lambda: active(n["cq"]) and active(n["empty"]), timeout=60, what="ClusterQueues Active")
    try:
        yield n
    finally:
        kube.kubectl(
            "delete", "llmtrainingjobs.llmray.io", "--all", "-n", namespace, "--timeout=60s", check=False
        )
        kube.kubectl("delete", f"workloads.{GROUP}", "--all", "-n", namespace, "--timeout=60s", check=False)
        kube.kubectl(
            "delete", f"localqueues.{GROUP}", "team", "none", "-n", namespace, "--timeout=60s", check=False
        )
        kube.kubectl("delete", f"clusterqueues.{GROUP}", n["cq"], n["empty"], "--timeout=60s", check=False)
        kube.kubectl("delete", f"resourceflavors.{GROUP}", n["any"], n["gpu"], "--timeout=60s", check=False)
        kube.kubectl("delete", f"workloadpriorityclasses.{GROUP}", n["low"], n["high"], check=False)


def job(name: str, queue: str, priority: str | None = None) -> dict[str, Any]:
    labels = {QUEUE_LABEL: queue, **({PRIORITY_LABEL: priority} if priority else {})}
    return {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "model": {"uri": "file:///models/tiny"},
            "dataset": {"uri": "file:///data/facts.jsonl", "format": "chat"},
            "workers": {"replicas": 1, "resources": {"cpu": "1", "memory": "2Gi", "gpu": 2}},
            "head": {"resources": {"cpu": "1", "memory": "2Gi"}},
            "output": {"uri": "file:///out/x"},
        },
    }


def workload_of(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    api = client.CustomObjectsApi(kube.api_client)
    items = api.list_namespaced_custom_object(
        GROUP, VERSION, namespace, "workloads", label_selector=f"app.kubernetes.io/instance={name}"
    )["items"]
    assert len(items) == 1, [i["metadata"]["name"] for i in items]
    return dict(items[0])


def wl_true(wl: dict[str, Any], type_: str) -> dict[str, Any] | None:
    cond = next((c for c in wl.get("status", {}).get("conditions") or [] if c["type"] == type_), None)
    return cond if cond is not None and cond["status"] == "True" else None


def running(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    status = status_of(kube, "LLMTrainingJob", namespace, name)
    pods = pods_of(kube, namespace, name)
    return status if status.get("phase") == "Running" and status.get("jobId") and len(pods) == 2 else None


def test_held_admitted_preempted_resumed_finished(
    kube: Kube,
    namespace: str,
    queues: dict[str, str],
    operator_factory: Any,
    jobs_stub: JobsStub,
    tmp_path: Path,
) -> None:
    # authenticated as the chart's ServiceAccount with only the chart's RBAC (Kueue rules included)
    apply(kube, _chart_rbac(kube, namespace), namespace)
    kubeconfig = _token_kubeconfig(kube, namespace, tmp_path / "sa.kubeconfig")
    op = operator_factory(
        namespace,
        "--ray-dashboard-url",
        jobs_stub.url,
        "--ray-serve-url",
        jobs_stub.url,
        kubeconfig=kubeconfig,
    ).start()
    try:
        # A (low) is admitted: its pods appear, the workers on the GPU flavor's nodes
        apply(kube, job("a", "team", queues["low"]), namespace)
        a = wait_for(lambda: running(kube, namespace, "a"), timeout=90, what="job a Running")
        assert a["attempt"] == 0 and a["queue"]["clusterQueue"] == queues["cq"]
        assert condition(a, "Admitted")["status"] == "True"
        (worker,) = pods_of(kube, namespace, "a", "worker")
        assert worker.spec.node_selector == {"llmray.io/node-pool": "gpu"}
        assert (pods_of(kube, namespace, "a", "head")[0].spec.node_selector or {}) == {}
        wl = workload_of(kube, namespace, "a")
        assert [(ps["name"], ps["count"]) for ps in wl["spec"]["podSets"]] == [("head", 1), ("workers", 1)]
        assert wl["spec"]["priority"] == 100

        # B (high) preempts A: A stops, its pods go, it is queued again; B runs
        apply(kube, job("b", "team", queues["high"]), namespace)

        def a_requeued() -> dict[str, Any] | None:
            status = status_of(kube, "LLMTrainingJob", namespace, "a")
            ok = (
                status.get("phase") == "Queued"
                and (status.get("queue") or {}).get("preemptions") == 1
                and not pods_of(kube, namespace, "a")
            )
            return status if ok else None

        a = wait_for(a_requeued, timeout=90, what="job a preempted and queued again")
        assert "preempted" in a["message"] and "queued again" in a["message"], a["message"]
        assert a["attempt"] == 1
        stopped = jobs_stub.of("a")
        assert list(stopped.values()) == ["STOPPED"], jobs_stub.jobs
        a0 = next(iter(stopped))
        wait_for(lambda: running(kube, namespace, "b"), timeout=90, what="job b Running")
        wl = workload_of(kube, namespace, "a")
        assert wl_true(wl, "Requeued") and not wl_true(wl, "QuotaReserved")
        reasons = {e.reason for e in client.CoreV1Api(kube.api_client).list_namespaced_event(
            namespace, field_selector="involvedObject.name=a").items}  # fmt: skip
        assert {"Admitted", "Preempted"} <= reasons, reasons

        # B goes away: A is admitted again and resumes as attempt 1
        kube.kubectl("delete", "llmtrainingjobs.llmray.io", "b", "-n", namespace, "--timeout=60s")
        a = wait_for(lambda: running(kube, namespace, "a"), timeout=90, what="job a Running again")
        assert a["attempt"] == 1 and a["jobId"] != a0
        assert jobs_stub.of("a")[a["jobId"]] == "RUNNING"

        # A succeeds: its Workload is Finished (quota released)
        jobs_stub.jobs[a["jobId"]]["status"] = "SUCCEEDED"
        wait_for(
            lambda: wl_true(workload_of(kube, namespace, "a"), "Finished"),
            timeout=60,
            what="a's Workload Finished",
        )
        assert status_of(kube, "LLMTrainingJob", namespace, "a")["phase"] == "Succeeded"
        log = op.log_path.read_text()
        assert " 403" not in log and "Forbidden" not in log, op.log_tail()
    finally:
        print(op.log_tail(80))


def test_job_on_a_queue_without_quota_stays_queued_with_kueues_message(
    kube: Kube, namespace: str, queues: dict[str, str], operator_factory: Any
) -> None:
    operator_factory(namespace).start()
    apply(kube, job("c", "none"), namespace)

    def pending() -> dict[str, Any] | None:
        status = status_of(kube, "LLMTrainingJob", namespace, "c")
        return status if "insufficient" in (condition(status, "Admitted").get("message") or "") else None

    status = wait_for(pending, timeout=60, what="job c says why Kueue does not admit it")
    assert status["phase"] == "Queued"
    assert condition(status, "Admitted")["status"] == "False"
    assert "insufficient" in status["message"]
    assert not pods_of(kube, namespace, "c")

    # a spec edit that changes the pod sets while queued replaces the Workload
    first = workload_of(kube, namespace, "c")["metadata"]["uid"]
    bigger = job("c", "none")
    bigger["spec"]["workers"]["replicas"] = 3
    apply(kube, bigger, namespace)

    def replaced() -> dict[str, Any] | None:
        try:
            wl = workload_of(kube, namespace, "c")
        except AssertionError:  # old and new side by side for a moment
            return None
        return wl if wl["metadata"]["uid"] != first else None

    wl = wait_for(replaced, timeout=60, what="job c's Workload replaced")
    assert [(ps["name"], ps["count"]) for ps in wl["spec"]["podSets"]] == [("head", 1), ("workers", 3)]
    assert not pods_of(kube, namespace, "c")


def test_unlabelled_job_waits_in_the_namespaces_default_local_queue(
    kube: Kube, namespace: str, queues: dict[str, str], operator_factory: Any, tmp_path: Path
) -> None:
    """Kueue's LocalQueueDefaulting, as the chart's ServiceAccount: a job without the queue label in a
    namespace with a LocalQueue named ``default`` (here on the ClusterQueue without GPU quota) is
    queued there, not run outside Kueue."""
    apply(kube, _chart_rbac(kube, namespace), namespace)
    kubeconfig = _token_kubeconfig(kube, namespace, tmp_path / "sa.kubeconfig")
    default = {"apiVersion": API, "kind": "LocalQueue", "metadata": {"name": "default"}}
    apply_yaml(kube, [{**default, "spec": {"clusterQueue": queues["empty"]}}], namespace=namespace)
    op = operator_factory(namespace, "--kueue-default-queue", kubeconfig=kubeconfig).start()
    try:
        unlabelled = job("d", "team")
        del unlabelled["metadata"]["labels"]
        apply(kube, unlabelled, namespace)

        def pending() -> dict[str, Any] | None:
            status = status_of(kube, "LLMTrainingJob", namespace, "d")
            return status if "insufficient" in (condition(status, "Admitted").get("message") or "") else None

        status = wait_for(pending, timeout=60, what="job d waits in LocalQueue default")
        assert status["phase"] == "Queued" and status["queue"]["name"] == "default"
        assert workload_of(kube, namespace, "d")["spec"]["queueName"] == "default"
        assert not pods_of(kube, namespace, "d")
        log = op.log_path.read_text()
        assert " 403" not in log and "Forbidden" not in log, op.log_tail()
    finally:
        kube.kubectl("delete", f"localqueues.{GROUP}", "default", "-n", namespace, check=False)
