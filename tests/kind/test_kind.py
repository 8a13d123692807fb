"""The real path on kind: Helm-installed operator, Ray heads and workers in real pods.

The tests run in file order and share one namespace (``tenant``): the training job's output is what
the deployment serves. Every wait is on a condition with a timeout; timeouts are generous because
the node has 2 CPUs shared by the control plane, the operator and every Ray pod.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.waiting import wait_for

from .conftest import OPERATOR_NS, RELEASE, SERVE_NODE_PORT, SHARED_HOST_DIR, Kind

pytestmark = pytest.mark.kind

JOB = "tiny-train"
DEPLOY = "tiny-tuned"
API_KEY = "kind-test-key-0123456789"
# Small CPU requests: the node has 2 CPUs and the control plane already asks for ~0.75 of them.
HEAD = {"resources": {"cpu": "300m", "memory": "3Gi"}}
WORKER_RES = {"cpu": "250m", "memory": "2Gi"}
MAX_STEPS = 200


def training_job() -> dict[str, Any]:
    return {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": JOB},
        "spec": {
            "model": {"uri": "file:///tmp/llmray/models/tiny"},
            "dataset": {"uri": "file:///tmp/llmray/data/instructions.jsonl", "format": "instruction"},
            "method": "lora",
            "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "hyperparameters": {
                "maxSteps": MAX_STEPS,
                "learningRate": 0.001,
                "batchSizePerWorker": 4,
                "maxSeqLength": 128,
                "precision": "fp32",
                "loggingSteps": 1,
            },
            "workers": {"replicas": 2, "resources": WORKER_RES},
            "head": HEAD,
            "checkpoint": {"everySteps": 10, "keep": 2},
            "output": {"uri": f"pvc://shared/{JOB}"},
            "failurePolicy": {"maxRestarts": 2},
        },
    }


def _status(kind: Kind, ns: str, plural: str, name: str) -> dict[str, Any]:
    return dict(kind.custom(plural, ns, name).get("status") or {})


def _ray_nodes(kind: Kind, ns: str, cluster: str) -> list[dict[str, Any]]:
    """Ray's own view of its nodes, read from the head's dashboard through a port-forward."""
    token = kind.secret_value(ns, f"{cluster}-ray-auth", "auth_token")
    with kind.port_forward(ns, f"svc/{cluster}-head", 8265) as port:
        r = httpx.get(
            f"http://127.0.0.1:{port}/nodes?view=summary",
            headers={"Authorization": f"Bearer {token}"},
            timeout=20,
        )
        r.raise_for_status()
        summary = r.json()["data"]["summary"]
    return [n for n in summary if (n.get("raylet") or {}).get("state") == "ALIVE"]


def _scrape(kind: Kind, ns: str, pod: str) -> list[Any]:
    """The Prometheus families a Ray pod exports on its metrics port (8080), via a port-forward."""
    with kind.port_forward(ns, f"pod/{pod}", 8080) as port:
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=20)
        r.raise_for_status()
        text = r.text[: 16 * 1024 * 1024]
    return list(text_string_to_metric_families(text))


def test_operator_runs_in_a_pod_with_in_cluster_config(kind: Kind) -> None:
    dep = kind.json("get", "deploy", "-n", OPERATOR_NS, "-l", f"app.kubernetes.io/instance={RELEASE}")[
        "items"
    ]
    assert len(dep) == 1 and dep[0]["status"].get("readyReplicas", 0) >= 1
    container = dep[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"] for e in container.get("env") or []}
    # The real topology: no address overrides, no sandbox token.
    assert not {"LLMRAY_RAY_DASHBOARD_URL", "LLMRAY_RAY_SERVE_URL", "LLMRAY_SANDBOX_RAY_TOKEN"} & env
    assert container["image"].startswith("llmray/operator:")


def test_training_on_real_pods_survives_a_worker_loss(kind: Kind, tenant: str) -> None:
    ns = tenant
    kind.apply(ns, training_job())
    sel = f"ray.io/cluster={JOB}"

    def running_pods() -> list[dict[str, Any]] | None:
        pods = kind.pods(ns, sel)
        ok = [p for p in pods if p["status"].get("phase") == "Running"]
        return pods if len(pods) == 3 and len(ok) == 3 else None

    pods = wait_for(running_pods, timeout=600, interval=3, what="head + 2 worker pods Running")
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert images == {"llmray/ray-runtime:0.1.0"}

    # The workers joined the head: Ray's alive nodes are exactly the pods' IPs.
    def joined() -> list[dict[str, Any]] | None:
        nodes = _ray_nodes(kind, ns, JOB)
        return nodes if len(nodes) == 3 else None

    nodes = wait_for(joined, timeout=300, interval=5, what="3 alive Ray nodes")
    pod_ips = sorted(p["status"]["podIP"] for p in kind.pods(ns, sel))
    assert sorted(n["raylet"]["nodeManagerAddress"] for n in nodes) == pod_ips

    # Progress shows in `kubectl get ltj` while the job runs, and a checkpoint is written.
    def checkpointed() -> dict[str, Any] | None:
        st = _status(kind, ns, "ltj", JOB)
        ck = st.get("checkpoint") or {}
        return st if st.get("phase") == "Running" and (ck.get("step") or 0) >= 10 else None

    st = wait_for(checkpointed, timeout=900, interval=3, what="a checkpoint while Running")
    step_before = int(st["progress"]["step"])
    # The table is read after the status: the job may have advanced in between, never gone back.
    table = kind.kubectl("get", "ltj", JOB, "-n", ns)
    header, row = table.splitlines()[:2]
    shown = dict(zip(header.split(), row.split(), strict=False))
    assert shown["PHASE"] == "Running" and step_before <= int(shown["STEP"]) <= MAX_STEPS, table
    assert st.get("restarts", 0) == 0

    # Lose a worker pod mid-training: the job is retried and resumes from its checkpoint.
    victim = next(
        p for p in kind.pods(ns, sel) if p["metadata"]["labels"].get("ray.io/node-type") == "worker"
    )
    kind.kubectl("delete", "pod", "-n", ns, victim["metadata"]["name"], "--wait=false")

    def restarted() -> dict[str, Any] | None:
        st = _status(kind, ns, "ltj", JOB)
        return st if st.get("restarts", 0) >= 1 else None

    wait_for(restarted, timeout=600, interval=3, what="status.restarts >= 1")

    def finished() -> dict[str, Any] | None:
        st = _status(kind, ns, "ltj", JOB)
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    st = wait_for(finished, timeout=1200, interval=5, what="the job to finish")
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
    assert st["restarts"] == 1
    assert st["progress"]["step"] == MAX_STEPS
    # The retry resumed: its first reported step is past the step seen before the loss.
    assert int(st["checkpoint"]["step"]) > step_before
    # The trained model is on the claim (a hostPath volume of the node).
    listing = kind.node_exec("find", f"{SHARED_HOST_DIR}/{ns}/{JOB}", "-maxdepth", "1")
    assert "adapter_config.json" in listing or "config.json" in listing, listing
    assert st["output"]["uri"].startswith("pvc://shared/")


def test_deployment_from_training_serves_through_the_serve_service(kind: Kind, tenant: str) -> None:
    ns = tenant
    kind.kubectl("create", "secret", "generic", "tiny-api-key", "-n", ns, f"--from-literal=key={API_KEY}")
    kind.apply(
        ns,
        {
            "apiVersion": "llmray.io/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": DEPLOY},
            "spec": {
                "model": {"fromTrainingJob": JOB, "name": "tiny-tuned"},
                "engine": "transformers",
                "engineArgs": {"maxModelLen": 256, "dtype": "float32", "maxNumSeqs": 4},
                "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
                "resourcesPerReplica": {"cpu": "250m", "memory": "1Gi"},
                # No worker at first: the replica cannot go on the head (0 CPUs), so Ray's pending
                # demand makes the operator add a worker pod.
                "workers": {
                    "minReplicas": 0,
                    "maxReplicas": 1,
                    "resources": {"gpu": 0, "cpu": "300m", "memory": "2Gi"},
                    "idleTimeoutSeconds": 30,
                },
                "head": HEAD,
                "apiKeySecretRef": {"name": "tiny-api-key", "key": "key"},
                "service": {"type": "NodePort", "port": 8000, "nodePort": SERVE_NODE_PORT},
            },
        },
    )
    sel = f"ray.io/cluster={DEPLOY}"
    # Demand-driven scale-up on real pods: a worker pod appears and joins Ray.
    wait_for(
        lambda: [
            p
            for p in kind.pods(ns, f"{sel},ray.io/node-type=worker")
            if p["status"].get("phase") == "Running"
        ],
        timeout=600,
        interval=3,
        what="a worker pod added for the pending replica",
    )

    def ready() -> dict[str, Any] | None:
        st = _status(kind, ns, "llmd", DEPLOY)
        return st if st.get("phase") == "Ready" else None

    st = wait_for(ready, timeout=900, interval=5, what="the deployment to be Ready")
    assert st["workers"]["ready"] == 1

    base = f"http://127.0.0.1:{kind.serve_port}/v1"
    client = openai.OpenAI(base_url=base, api_key=API_KEY, timeout=60, max_retries=0)

    # kube-proxy programs the NodePort a moment after the Service exists: retry the first call.
    models = wait_for(lambda: client.models.list(), timeout=120, interval=2, what="the serve NodePort")
    assert [m.id for m in models.data] == ["tiny-tuned"]
    chat = client.chat.completions.create(
        model="tiny-tuned",
        messages=[{"role": "user", "content": "What is Ray?"}],
        max_tokens=16,
        temperature=0,
    )
    assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens > 0

    wrong = openai.OpenAI(base_url=base, api_key="not-the-key", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401

    # The Ray pods export llmray's serving metrics on their metrics port (Ray's metrics agent):
    # the 200s just answered are counted on the pod whose replica served them.
    def served_count() -> float | None:
        total = 0.0
        for pod in kind.pods(ns, sel):
            for family in _scrape(kind, ns, pod["metadata"]["name"]):
                total += sum(
                    s.value
                    for s in family.samples
                    if s.name == "ray_llmray_serve_requests_total" and s.labels.get("status") == "200"
                )
        return total if total >= 2 else None

    wait_for(served_count, timeout=180, interval=5, what="ray_llmray_serve_requests_total on the Ray pods")

    # The operator reads the app's stats route with the cluster's Ray token (not the user's Secret).
    serving = wait_for(
        lambda: _status(kind, ns, "llmd", DEPLOY).get("serving"),
        timeout=180,
        interval=5,
        what="status.serving from the stats route",
    )
    assert {"requestsPerSecond", "running", "waiting"} <= set(serving), serving

    # Proxies on every node: the serve Service's ready endpoints are the head's proxy and the proxy
    # of the worker that hosts the replica (each pod Ready while its proxy answers /-/healthz).
    pod_ips = {p["status"].get("podIP") for p in kind.pods(ns, sel)}
    worker_ips = {p["status"].get("podIP") for p in kind.pods(ns, f"{sel},ray.io/node-type=worker")}

    def ready_endpoints() -> set[str] | None:
        slices = kind.json(
            "get", "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={DEPLOY}-serve"
        )
        ips = {
            address
            for item in slices["items"]
            for endpoint in item.get("endpoints") or []
            if (endpoint.get("conditions") or {}).get("ready")
            for address in endpoint.get("addresses") or []
        }
        return ips if worker_ips <= ips else None

    endpoints = wait_for(
        ready_endpoints, timeout=120, interval=3, what="the worker's proxy as a serve endpoint"
    )
    assert endpoints <= pod_ips and len(endpoints) == 2  # head + worker, nothing else


def test_idle_worker_is_removed_after_its_timeout(kind: Kind, tenant: str) -> None:
    ns = tenant
    # Scale the replicas to zero: the worker goes idle and the operator removes it after 30 s.
    kind.kubectl(
        "patch", "llmd", DEPLOY, "-n", ns, "--type", "merge",
        "-p", json.dumps({"spec": {"autoscaling": {"minReplicas": 0, "maxReplicas": 1}}}),
    )  # fmt: skip
    t0 = time.monotonic()
    wait_for(
        lambda: not kind.pods(ns, f"ray.io/cluster={DEPLOY},ray.io/node-type=worker"),
        timeout=600,
        interval=3,
        what="the idle worker pod to be removed",
    )
    assert time.monotonic() - t0 >= 25  # not before its idle timeout


def test_deleting_resources_removes_every_child(kind: Kind, tenant: str) -> None:
    ns = tenant
    for plural, name in (("llmd", DEPLOY), ("ltj", JOB)):
        kind.kubectl("delete", plural, name, "-n", ns, "--wait=true", timeout=300)
    for cluster in (DEPLOY, JOB):

        def gone(cluster: str = cluster) -> bool:
            kinds = "pods,services,secrets,networkpolicies"
            out = kind.kubectl("get", kinds, "-n", ns, "-l", f"ray.io/cluster={cluster}", "-o", "name")
            return not out.strip()

        wait_for(gone, timeout=300, interval=2, what=f"children of {cluster} to be deleted")


def test_helm_uninstall_leaves_no_operator_objects(kind: Kind) -> None:
    kind.helm("uninstall", RELEASE, "-n", OPERATOR_NS, "--wait")
    sel = f"app.kubernetes.io/instance={RELEASE}"

    def clean() -> bool:
        ns_objs = kind.kubectl(
            "get", "deploy,pods,services,serviceaccounts,roles,rolebindings,configmaps,secrets",
            "-n", OPERATOR_NS, "-l", sel, "-o", "name",
        )  # fmt: skip
        cluster_objs = kind.kubectl(
            "get",
            "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings",
            "-l", sel, "-o", "name",
        )  # fmt: skip
        # kept on purpose (helm.sh/resource-policy: keep): the key the running Ray clusters' tokens
        # derive from, so a reinstalled operator can still talk to them (docs/operator.md)
        kept = {f"secret/{RELEASE}-auth-key"}
        return set(ns_objs.split()) <= kept and not cluster_objs.strip()

    wait_for(clean, timeout=180, interval=2, what="no operator objects left after helm uninstall")
