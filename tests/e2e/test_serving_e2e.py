"""Deployments end to end: Serve app, OpenAI API, in-place updates, GPU worker autoscaling."""

from __future__ import annotations

import base64
import threading
from typing import Any

import httpx
import pytest
from kubernetes import client

from tests.cluster.test_operator_fixtures import condition, pods_of, status_of
from tests.e2e.conftest import E2E
from tests.kube import apply_yaml
from tests.waiting import wait_for

pytestmark = pytest.mark.e2e

KIND = "LLMDeployment"
API_KEY = "e2e-key-" + "x" * 12


def status(e2e: E2E, name: str) -> dict[str, Any]:
    return status_of(e2e.kube, KIND, e2e.namespace, name)


def wait_ready(e2e: E2E, name: str, generation: int = 1, timeout: float = 300) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        st = status(e2e, name)
        ok = st.get("phase") == "Ready" and st.get("observedGeneration", 0) >= generation
        return st if ok else None

    try:
        return wait_for(probe, timeout=timeout, what=f"{name} Ready", interval=1)
    except AssertionError:
        print(status(e2e, name))
        raise


def test_deployment_serves_and_updates_without_errors(e2e: E2E) -> None:
    """(c) Ready, answers the openai client with the API key, and a spec change (maxReplicas) rolls
    out while a request loop sees no failure."""
    from openai import OpenAI

    name = "chat"
    core = client.CoreV1Api(e2e.kube.api_client)
    core.create_namespaced_secret(
        e2e.namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="chat-key"),
            data={"key": base64.b64encode(API_KEY.encode()).decode()},
        ),
    )
    apply_yaml(
        e2e.kube,
        e2e.deployment(name, apiKeySecretRef={"name": "chat-key", "key": "key"}),
        e2e.namespace,
    )
    st = wait_ready(e2e, name)
    endpoint = st["endpoint"]
    assert endpoint == f"{e2e.serve_url}/{e2e.namespace}/{name}/v1"
    assert st["replicas"]["ready"] >= 1 and condition(st, "ServeReady")["status"] == "True"
    assert API_KEY not in (e2e.operator.log_path.read_text())

    ai = OpenAI(base_url=endpoint, api_key=API_KEY, max_retries=0, timeout=60)
    answer = ai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert answer.choices[0].message.content is not None
    with pytest.raises(Exception, match=r"401|[Uu]nauthori"):
        OpenAI(base_url=endpoint, api_key="wrong", max_retries=0).models.list()

    failures: list[str] = []
    successes = 0
    stop = threading.Event()

    def loop() -> None:
        nonlocal successes
        for _ in range(2000):  # bounded
            if stop.is_set():
                return
            try:
                ai.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
                successes += 1
            except Exception as exc:
                failures.append(repr(exc))

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    try:
        wait_for(lambda: successes >= 2, timeout=60, what="requests flowing")
        e2e.patch(KIND, name, {"spec": {"autoscaling": {"maxReplicas": 2}}})

        def rolled_out() -> bool:
            app = e2e.serve_apps()[f"{e2e.namespace}-{name}"]
            spec = app["deployed_app_config"]["args"]["spec"]
            return spec["autoscaling"]["maxReplicas"] == 2 and app["status"] == "RUNNING"

        wait_for(rolled_out, timeout=240, what="Serve running the new config", interval=1)
        wait_ready(e2e, name, generation=2)
        before = successes
        wait_for(lambda: successes >= before + 2, timeout=60, what="requests after the update")
    finally:
        stop.set()
        worker.join(timeout=90)
    assert not failures, failures[:3]
    assert successes >= 4

    e2e.delete(KIND, name)
    wait_for(lambda: f"{e2e.namespace}-{name}" not in e2e.serve_apps(), timeout=60, what="Serve app removed")


def test_pending_gpu_demand_adds_and_removes_gpu_workers(e2e: E2E) -> None:
    """(d) A replica needing a GPU the local Ray lacks is pending {"GPU": 1}: the operator adds GPU
    worker pods (on llmray-gpu-* nodes); when the demand is gone they are removed after the idle
    timeout."""
    name = "gpu-demand"
    doc = e2e.deployment(
        name,
        resourcesPerReplica={"gpu": 1, "cpu": "1", "memory": "1Gi"},
        workers={
            "minReplicas": 0,
            "maxReplicas": 2,
            "resources": {"gpu": 1, "cpu": "4", "memory": "8Gi"},
            "idleTimeoutSeconds": 5,
        },
    )
    apply_yaml(e2e.kube, doc, e2e.namespace)

    def gpu_workers() -> list[Any]:
        pods = pods_of(e2e.kube, e2e.namespace, name, "worker")
        return [p for p in pods if (p.spec.node_name or "").startswith("llmray-gpu-")]

    wait_for(
        lambda: len(gpu_workers()) == 1, timeout=180, what="one GPU worker pod on a GPU node", interval=1
    )
    st = status(e2e, name)
    assert st["workers"]["desired"] == 1, st["workers"]
    # The demand goes away (the replica no longer needs a GPU): the idle worker is removed.
    e2e.patch(KIND, name, {"spec": {"resourcesPerReplica": {"gpu": 0}}})
    wait_for(
        lambda: not pods_of(e2e.kube, e2e.namespace, name, "worker"),
        timeout=180,
        what="GPU worker removed after the idle timeout",
        interval=1,
    )
    # The pass that deletes the pod writes the status right after: wait for it, not assume it.
    wait_for(lambda: status(e2e, name)["workers"]["desired"] == 0, timeout=30, what="desired 0", interval=0.5)
    e2e.delete(KIND, name)
    wait_for(lambda: f"{e2e.namespace}-{name}" not in e2e.serve_apps(), timeout=60, what="Serve app removed")


def test_adapters_become_model_ids_and_are_removed_live(e2e: E2E) -> None:
    """spec.adapters through the real operator: a LoRA adapter is Ready in status.adapters, listed
    and answered; one waiting for its training job is Pending; removing the adapter (kubectl patch)
    unlists it on the same replica (no restart) and requests for it get 404 model_not_found."""
    from llmray_workloads.tiny import build_tiny_adapter

    name = "multi"
    sql = build_tiny_adapter(e2e.model, e2e.work / "adapters" / "sql", seed=1)
    adapters = [{"name": "sql", "uri": f"file://{sql}"}, {"name": "later", "fromTrainingJob": "not-yet"}]
    apply_yaml(e2e.kube, e2e.deployment(name, adapters=adapters), e2e.namespace)
    wait_ready(e2e, name)

    def adapter_states() -> dict[str, str]:
        return {a["name"]: a["state"] for a in status(e2e, name).get("adapters") or []}

    wait_for(
        lambda: adapter_states() == {"sql": "Ready", "later": "Pending"} or None,
        timeout=120,
        what="status.adapters sql Ready, later Pending",
        interval=1,
    )
    endpoint = status(e2e, name)["endpoint"]
    app = f"{e2e.namespace}-{name}"

    def replica_ids() -> list[str]:
        deployment = e2e.serve_apps()[app]["deployments"]["LLMServer"]
        return [r["actor_id"] for r in deployment["replicas"]]

    before = replica_ids()
    with httpx.Client(base_url=endpoint, timeout=60) as http:
        assert [m["id"] for m in http.get("/models").json()["data"]] == ["tiny", "sql"]
        body = {"model": "sql", "prompt": "hello", "max_tokens": 4}
        assert http.post("/completions", json=body).status_code == 200
        e2e.patch(KIND, name, {"spec": {"adapters": [adapters[1]]}})
        wait_for(
            lambda: [m["id"] for m in http.get("/models").json()["data"]] == ["tiny"] or None,
            timeout=120,
            what="sql to leave /v1/models",
            interval=1,
        )
        gone = http.post("/completions", json=body)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    wait_for(lambda: adapter_states() == {"later": "Pending"} or None, timeout=60, what="status.adapters")
    assert replica_ids() == before  # reconfigured in place, not restarted
