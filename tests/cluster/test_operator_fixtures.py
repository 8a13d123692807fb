"""Fixtures and helpers shared by the cluster tests (this module holds no tests; ``conftest.py``
registers its fixtures for every test under tests/cluster).

The operator runs as a real subprocess (``python -m llmray.cli operator``), exactly as users run
it, so tests can kill -9 it mid-reconcile and start it again. Its health endpoint sits on a free
loopback port; its log is attached to failures.
"""

from __future__ import annotations

import copy
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.kube import Kube, apply_yaml, wait_for
from tests.ray_cluster import free_port, serving_ok, stop_process

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
GROUP, VERSION = "llmray.io", "v1alpha1"
PLURALS = {"LLMTrainingJob": "llmtrainingjobs", "LLMDeployment": "llmdeployments"}


class Operator:
    """``llmray operator`` as a subprocess watching one namespace."""

    def __init__(
        self, kubeconfig: Path, namespace: str, log_path: Path, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.extra = extra
        self.env = env
        self.port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> Operator:
        self.starts += 1
        cmd = [
            sys.executable, "-m", "llmray.cli", "operator",
            "-n", self.namespace,
            "--kubeconfig", str(self.kubeconfig),
            "--liveness", f"http://127.0.0.1:{self.port}/healthz",
            "--resync", "5",
            "--metrics-port", str(self.metrics_port),
            # a stable key across restarts, as the chart mounts one: the derived Ray tokens (and so
            # the pods' template hashes) stay the same when the operator restarts
            "--auth-key-file", str(self._auth_key_file()),
            *self.extra,
        ]  # fmt: skip
        log = self.log_path.open("ab")
        log.write(f"\n===== start #{self.starts}: {' '.join(cmd)}\n".encode())
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        log.close()
        if wait:
            wait_for(self.healthy, timeout=60, what=f"operator health endpoint (log: {self.log_path})")
        return self

    def _auth_key_file(self) -> Path:
        path = self.log_path.with_name("auth-key")  # one per test: operators of a test share it
        if not path.exists():
            path.write_text(secrets.token_urlsafe(48))
        return path

    def healthy(self) -> bool:
        return serving_ok(self.proc, "operator", f"http://127.0.0.1:{self.port}/healthz", self.log_tail)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus metric's samples matching ``labels`` (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def kill(self) -> None:
        """SIGKILL: no cleanup, like a node loss or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        stop_process(self.proc)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture(scope="session", name="crds")
def crds_fixture(kube: Kube) -> None:
    """The llmray CRDs, applied from crds/ (the committed, generated YAML)."""
    apply_crds(kube)


def apply_crds(kube: Kube) -> None:
    """Apply crds/ (the committed, generated YAML) and wait until the API server serves them."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kube.wait_established(*(f"{plural}.{GROUP}" for plural in PLURALS.values()))


@pytest.fixture(name="operator_factory")
def operator_factory_fixture(kube: Kube, crds: None, tmp_path: Path) -> Iterator[Any]:
    """Build (not start) operators for a namespace; all are stopped at teardown, logs kept on failure."""
    made: list[Operator] = []

    def make(namespace: str, *extra: str, kubeconfig: Path | None = None, **kw: Any) -> Operator:
        op = Operator(
            kubeconfig or kube.kubeconfig, namespace, tmp_path / f"operator-{len(made)}.log", *extra, **kw
        )
        made.append(op)
        return op

    yield make
    for op in made:
        op.stop()
    for op in made:  # pytest shows teardown output only for failed tests
        print(f"--- operator log {op.log_path}\n{op.log_tail(120)}")


@pytest.fixture(name="operator")
def operator_fixture(operator_factory: Any, namespace: str) -> Operator:
    """A running operator watching the test namespace (5 s resync)."""
    op: Operator = operator_factory(namespace, "--unschedulable-timeout", "120")
    return op.start()


@pytest.fixture(name="pvc")
def pvc_fixture(kube: Kube, namespace: str) -> Iterator[Any]:
    """Make statically bound PersistentVolumeClaims (the cluster has no provisioner)."""
    core = client.CoreV1Api(kube.api_client)
    volumes: list[str] = []

    def make(claim: str) -> None:
        pv = f"{namespace}-{claim}"[:63]
        core.create_persistent_volume(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": pv, "labels": {"llmray.io/test": "true"}},
                "spec": {
                    "capacity": {"storage": "10Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "hostPath": {"path": f"/tmp/llmray-test/{pv}"},
                    "claimRef": {"namespace": namespace, "name": claim},
                },
            }
        )
        volumes.append(pv)
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "volumeName": pv,
                    "resources": {"requests": {"storage": "10Gi"}},
                },
            },
        )
        wait_for(
            lambda: core.read_namespaced_persistent_volume_claim(claim, namespace).status.phase == "Bound",
            timeout=60,
            what=f"PVC {claim} bound",
        )

    yield make
    for pv in volumes:
        core.delete_persistent_volume(pv)


# --- helpers ---------------------------------------------------------------------------------------


def example(name: str, kind: str | None = None) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]
    return [d for d in docs if kind is None or d["kind"] == kind]


def get_cr(kube: Kube, kind: str, namespace: str, name: str) -> dict[str, Any]:
    api = client.CustomObjectsApi(kube.api_client)
    obj: dict[str, Any] = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)
    return obj


def status_of(kube: Kube, kind: str, namespace: str, name: str) -> dict[str, Any]:
    return dict(get_cr(kube, kind, namespace, name).get("status") or {})


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def pods_of(kube: Kube, namespace: str, name: str, node_type: str | None = None) -> list[client.V1Pod]:
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by=llmray-operator"
    if node_type:
        selector += f",ray.io/node-type={node_type}"
    pods = client.CoreV1Api(kube.api_client).list_namespaced_pod(namespace, label_selector=selector).items
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def running_ready(pod: client.V1Pod) -> bool:
    ready = next((c for c in pod.status.conditions or [] if c.type == "Ready"), None)
    return pod.status.phase == "Running" and ready is not None and ready.status == "True"


def wait_phase(
    kube: Kube, kind: str, namespace: str, name: str, phase: str, timeout: float = 120
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        status = status_of(kube, kind, namespace, name)
        return status if status.get("phase") == phase else None

    return wait_for(probe, timeout=timeout, what=f"{kind} {namespace}/{name} phase {phase}")


def wait_reason(
    kube: Kube, kind: str, namespace: str, name: str, type_: str, reason: str, timeout: float = 30
) -> dict[str, Any]:
    """Wait until the resource's condition ``type_`` has ``reason``; return that condition."""

    def probe() -> dict[str, Any] | None:
        cond = condition(status_of(kube, kind, namespace, name), type_)
        return cond if cond.get("reason") == reason else None

    return wait_for(probe, timeout=timeout, what=f"{kind} {namespace}/{name}: {type_} reason {reason}")


def wait_cluster_ready(
    kube: Kube, kind: str, namespace: str, name: str, workers: int, timeout: float = 120
) -> dict[str, Any]:
    """Wait until head + ``workers`` pods are Running/Ready and the status says so."""

    def probe() -> dict[str, Any] | None:
        status = status_of(kube, kind, namespace, name)
        pods = pods_of(kube, namespace, name)
        ok = (
            condition(status, "RayClusterReady").get("status") == "True"
            and status.get("workers") == {"ready": workers, "desired": workers}
            and len(pods) == workers + 1
            and all(running_ready(p) for p in pods)
        )
        return status if ok else None

    return wait_for(
        probe, timeout=timeout, what=f"{kind} {namespace}/{name}: Ray cluster with {workers} workers ready"
    )


def events_for(kube: Kube, namespace: str, name: str) -> list[client.CoreV1Event]:
    events = client.CoreV1Api(kube.api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return list(events.items)


def apply(kube: Kube, docs: list[dict[str, Any]] | dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    return apply_yaml(kube, docs, namespace=namespace)


def owned_children(kube: Kube, namespace: str, name: str) -> dict[str, list[str]]:
    core = client.CoreV1Api(kube.api_client)
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by=llmray-operator"
    return {
        "pods": [p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector=selector).items],
        "services": [
            s.metadata.name for s in core.list_namespaced_service(namespace, label_selector=selector).items
        ],
        "secrets": [
            s.metadata.name for s in core.list_namespaced_secret(namespace, label_selector=selector).items
        ],
    }


def wait_gone(kube: Kube, namespace: str, name: str, timeout: float = 60) -> None:
    wait_for(
        lambda: not any(owned_children(kube, namespace, name).values()),
        timeout=timeout,
        what=f"no children of {name} left",
    )


def now() -> float:
    return time.monotonic()


def with_field(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Copy of ``obj`` with the dotted ``path`` set (``None``: removed)."""
    out = copy.deepcopy(obj)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return out


def dry_run(kube: Kube, manifest: dict[str, Any]) -> Any:
    """``kubectl create --dry-run=server`` of ``manifest``: what admission says, nothing stored."""
    return kube.kubectl(
        "create", "--dry-run=server", "-n", "default", "-o", "json", "-f", "-",
        input=yaml.safe_dump(manifest),
        check=False,
    )  # fmt: skip


def assert_refused(kube: Kube, manifest: dict[str, Any], expected: list[str]) -> None:
    """The API server refuses ``manifest``, and its answer contains every text of ``expected``."""
    proc = dry_run(kube, manifest)
    assert proc.returncode != 0, f"accepted: {yaml.safe_dump(manifest)}"
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in: {proc.stderr}"


def small_job(name: str, workers: int = 2) -> dict[str, Any]:
    """The tiny CPU training example with ``workers`` workers of 10m CPU (many fit on a kwok node)."""
    (job,) = example("training-tiny-cpu.yaml")
    job["metadata"]["name"] = name
    job["spec"]["workers"] = {"replicas": workers, "resources": {"cpu": "10m", "memory": "16Mi"}}
    job["spec"]["head"] = {"resources": {"cpu": "10m", "memory": "16Mi"}}
    return job


def assert_one_set(kube: Kube, namespace: str, name: str, workers: int) -> None:
    """Exactly one set of children: one head Service, one auth Secret, one head and ``workers``
    workers with distinct indexes, none of them terminating (nothing was made twice)."""
    children = owned_children(kube, namespace, name)
    assert children["services"] == [f"{name}-head"], children
    assert children["secrets"] == [f"{name}-ray-auth"], children
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by=llmray-operator"
    pods = client.CoreV1Api(kube.api_client).list_namespaced_pod(namespace, label_selector=selector).items
    assert all(p.metadata.deletion_timestamp is None for p in pods), sorted(p.metadata.name for p in pods)
    heads = [p for p in pods if p.metadata.labels["ray.io/node-type"] == "head"]
    worker_pods = [p for p in pods if p.metadata.labels["ray.io/node-type"] == "worker"]
    assert len(heads) == 1 and len(worker_pods) == workers, sorted(p.metadata.name for p in pods)
    assert len({p.metadata.labels["llmray.io/worker-index"] for p in worker_pods}) == workers
