"""Reconcile at scale: N resources on a cluster of a few hundred simulated GPU nodes.

Measures, for N resources (half LLMTrainingJobs with 2 GPU workers, half LLMDeployments with 1 GPU
worker; heads on CPU nodes):

- time from creating the N resources until every Ray pod is Running/Ready *and* every resource's
  status says so (RayClusterReady=True, workers ready == desired);
- the operator's peak RSS (VmHWM of the process);
- Kubernetes API requests per resource made by the operator (its client's counter, plus the Events
  it posted), at "all ready" and again after two idle resync periods (steady state should be ~0);
- the same children created directly with one client (same builders, same concurrency) as the
  baseline: time until all pods Running, and requests per resource -- the operator's overhead ratio.

Usage (starts its own control plane unless --kubeconfig is given):

    python benchmarks/reconcile_scale.py --resources 50 --gpu-nodes 300
    python benchmarks/reconcile_scale.py --resources 200 --gpu-nodes 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from llmray.api import LLMDeploymentSpec, LLMTrainingJobSpec  # noqa: E402
from llmray.builders import cluster as b  # noqa: E402
from llmray.builders.common import Owner  # noqa: E402

GROUP, VERSION = "llmray.io", "v1alpha1"
SMALL = {"cpu": "100m", "memory": "256Mi"}
GPU_WORKER = {"gpu": 1, "cpu": "4", "memory": "16Gi"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _training(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMTrainingJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"uri": "hf://tatsu-lab/alpaca", "format": "instruction"},
            "method": "lora",
            "workers": {"replicas": 2, "resources": GPU_WORKER},
            "head": {"resources": SMALL},
            "output": {"uri": f"s3://bench/{name}"},
        },
    }


def _deployment(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "engine": "vllm",
            "resourcesPerReplica": {"gpu": 1, "cpu": "2", "memory": "8Gi"},
            "workers": {"minReplicas": 1, "maxReplicas": 2, "resources": GPU_WORKER},
            "head": {"resources": SMALL},
        },
    }


def _resources(n: int) -> list[dict[str, Any]]:
    return [_training(f"train-{i}") if i % 2 == 0 else _deployment(f"serve-{i}") for i in range(n)]


def _expected_pods(objs: list[dict[str, Any]]) -> int:
    return sum(1 + (2 if o["kind"] == "LLMTrainingJob" else 1) for o in objs)


def _ensure_cluster(args: argparse.Namespace) -> str:
    if args.kubeconfig:
        return str(args.kubeconfig)
    env = {**os.environ, "GPU_NODES": str(args.gpu_nodes), "CPU_NODES": str(args.cpu_nodes)}
    env.setdefault("LLMRAY_CLUSTER_DIR", str(REPO / ".cache" / "bench-cluster"))
    out = subprocess.run(
        ["bash", str(REPO / "tests" / "cluster" / "cluster.sh"), "up"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    match = re.search(r"^export KUBECONFIG=(.+)$", out, re.MULTILINE)
    if not match:
        raise SystemExit(f"cluster.sh up printed no kubeconfig:\n{out}")
    return match.group(1).strip()


def _bin_dir() -> Path:
    out = subprocess.run(
        ["bash", str(REPO / "tests" / "cluster" / "build.sh")], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def _pods_ready(core: client.CoreV1Api, namespace: str) -> int:
    pods = core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/managed-by=llmray-operator"
    ).items
    n = 0
    for pod in pods:
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        n += pod.status.phase == "Running" and ready and pod.metadata.deletion_timestamp is None
    return n


def _statuses_ready(custom: client.CustomObjectsApi, namespace: str) -> int:
    n = 0
    for plural in ("llmtrainingjobs", "llmdeployments"):
        for obj in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]:
            status = obj.get("status") or {}
            cond = next((c for c in status.get("conditions") or [] if c["type"] == "RayClusterReady"), {})
            workers = status.get("workers") or {}
            n += cond.get("status") == "True" and workers.get("ready") == workers.get("desired") > 0
    return n


def _metric_series(port: int, name: str) -> dict[str, float]:
    """Every labelled series of one metric, keyed by its label text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    series = (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith(name + "{"))
    return {labels[len(name) :]: float(value) for labels, value in series}


def _series_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    """Which requests were made between two scrapes (non-zero deltas only)."""
    return {k: int(v - before.get(k, 0.0)) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wait(probe: Any, target: int, timeout: float, what: str) -> float:
    start = time.monotonic()
    last = -1
    while time.monotonic() - start < timeout:
        last = probe()
        if last >= target:
            return time.monotonic() - start
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}: {last}/{target}")


def _create_all(custom: client.CustomObjectsApi, namespace: str, objs: list[dict[str, Any]]) -> None:
    def create(obj: dict[str, Any]) -> None:
        plural = "llmtrainingjobs" if obj["kind"] == "LLMTrainingJob" else "llmdeployments"
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, obj)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, objs))


def run_operator(
    api: client.ApiClient,
    kubeconfig: str,
    objs: list[dict[str, Any]],
    timeout: float,
    log_level: str = "warning",
) -> dict[str, Any]:
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    namespace = f"bench-op-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    metrics_port, health_port = _free_port(), _free_port()
    log = open(f"/tmp/{namespace}.log", "wb")  # noqa: SIM115 - closed after the process ends
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "llmray.cli", "operator", "-n", namespace,
            "--kubeconfig", kubeconfig, "--log-level", log_level, "--log-format", "plain",
            "--metrics-port", str(metrics_port), "--liveness", f"http://127.0.0.1:{health_port}/healthz",
        ],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO / "operator")},
    )  # fmt: skip
    try:
        _wait(lambda: _probe_ok(health_port), 1, 60, "operator health")
        wait_sa(core, namespace)
        t0 = time.monotonic()
        _create_all(custom, namespace, objs)
        pods = _expected_pods(objs)
        t_pods = _wait(lambda: _pods_ready(core, namespace), pods, timeout, "pods Running")
        _wait(lambda: _statuses_ready(custom, namespace), len(objs), timeout, "statuses ready")
        elapsed = time.monotonic() - t0
        series_ready = _metric_series(metrics_port, "llmray_kube_requests_total")
        requests_ready = sum(series_ready.values())
        events = _count_events(core, namespace)
        # two idle resync periods (15 s each): a converged operator should make ~no requests
        time.sleep(32)
        series_idle = _metric_series(metrics_port, "llmray_kube_requests_total")
        requests_idle = sum(series_idle.values()) - requests_ready
        rss = _peak_rss_mib(proc.pid)
        return {
            "namespace": namespace,
            "seconds_to_all_ready": round(elapsed, 2),
            "seconds_to_pods_running": round(t_pods, 2),
            "pods": pods,
            "operator_peak_rss_mib": round(rss, 1),
            "requests_until_ready": int(requests_ready),
            "events_posted": events,
            "requests_per_resource": round((requests_ready + events) / len(objs), 2),
            "requests_in_2_idle_resyncs": int(requests_idle),
            "idle_requests_by_kind": _series_delta(series_idle, series_ready),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # a measurement must not be lost to a slow shutdown
            print(f"operator did not exit within 120 s of SIGTERM; killed (log /tmp/{namespace}.log)")
            proc.kill()
            proc.wait()
        log.close()
        core.delete_namespace(namespace, propagation_policy="Background")


def _probe_ok(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return int(resp.status == 200)
    except OSError:
        return 0


def wait_sa(core: client.CoreV1Api, namespace: str) -> None:
    def has_sa() -> int:
        try:
            core.read_namespaced_service_account("default", namespace)
            return 1
        except client.ApiException:
            return 0

    _wait(has_sa, 1, 60, "default ServiceAccount")


def _count_events(core: client.CoreV1Api, namespace: str) -> int:
    events = core.list_namespaced_event(namespace).items
    return sum(
        1 for e in events if (e.reporting_component or (e.source and e.source.component)) == "llmray-operator"
    )


def run_direct(api: client.ApiClient, objs: list[dict[str, Any]], timeout: float) -> dict[str, Any]:
    """The same children, created straight from the builders with one client (no operator)."""
    core = client.CoreV1Api(api)
    namespace = f"bench-direct-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    wait_sa(core, namespace)
    manifests: list[dict[str, Any]] = []
    for obj in objs:
        owner = Owner(obj["kind"], obj["metadata"]["name"], namespace, str(uuid.uuid4()))
        if obj["kind"] == "LLMTrainingJob":
            tspec = LLMTrainingJobSpec.model_validate(obj["spec"])
            cluster, workers = b.training_cluster(owner, tspec), tspec.workers.replicas
        else:
            dspec = LLMDeploymentSpec.model_validate(obj["spec"])
            cluster, workers = b.deployment_cluster(owner, dspec, dspec.model.uri), dspec.workers.min_replicas
        for doc in [
            b.auth_secret(cluster, b.derive_auth_token(b"bench-key" * 4, owner)),
            b.head_service(cluster),
        ]:
            doc["metadata"].pop("ownerReferences")  # no owner object exists here
            manifests.append(doc)
        if cluster.serve is not None:
            manifests.append(b.serve_service(cluster))
        manifests.append(b.head_pod(cluster, "u"))
        manifests.extend(b.worker_pod(cluster, i, "u") for i in range(workers))
    for doc in manifests:
        doc["metadata"].pop("ownerReferences", None)

    def create(doc: dict[str, Any]) -> None:
        method = {
            "Pod": core.create_namespaced_pod,
            "Service": core.create_namespaced_service,
            "Secret": core.create_namespaced_secret,
        }[doc["kind"]]
        method(namespace, doc, _preload_content=False)

    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, manifests))
        pods = sum(1 for d in manifests if d["kind"] == "Pod")
        _wait(lambda: _pods_ready(core, namespace), pods, timeout, "direct pods Running")
        return {
            "seconds_to_pods_running": round(time.monotonic() - t0, 2),
            "requests_per_resource": round(len(manifests) / len(objs), 2),
        }
    finally:
        core.delete_namespace(namespace, propagation_policy="Background")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resources", type=int, nargs="+", default=[50], help="N values to run (default 50)")
    parser.add_argument("--gpu-nodes", type=int, default=300)
    parser.add_argument("--cpu-nodes", type=int, default=4)
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting one")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--operator-log-level",
        default="warning",
        help="the operator's log level (debug logs every status patch); its log is /tmp/<namespace>.log",
    )
    args = parser.parse_args()
    kubeconfig = _ensure_cluster(args)
    os.environ["KUBECONFIG"] = kubeconfig
    os.environ["PATH"] = f"{_bin_dir()}{os.pathsep}{os.environ['PATH']}"
    kubectl = ["kubectl", "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds")]
    subprocess.run(kubectl, check=True, capture_output=True)
    api = config.new_client_from_config(config_file=kubeconfig)
    nodes = client.CoreV1Api(api).list_node(label_selector="llmray.io/node-pool=gpu").items
    results = []
    for n in args.resources:
        objs = _resources(n)
        operator = run_operator(api, kubeconfig, objs, args.timeout, args.operator_log_level)
        direct = run_direct(api, objs, args.timeout)
        row = {
            "resources": n,
            "gpu_nodes": len(nodes),
            "operator": operator,
            "direct": direct,
            "time_ratio": round(
                operator["seconds_to_all_ready"] / max(direct["seconds_to_pods_running"], 1e-3), 2
            ),
            "request_ratio": round(operator["requests_per_resource"] / direct["requests_per_resource"], 2),
        }
        print(json.dumps(row, indent=2), flush=True)
        results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
