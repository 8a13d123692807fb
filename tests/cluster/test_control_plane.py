"""The local control plane is a real Kubernetes: schema + CEL validation, scheduling with extended
resources and taints, garbage collection, RBAC and authentication, pinned versions."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.kube import Kube, apply_yaml, wait_for

pytestmark = pytest.mark.cluster

VERSIONS = dict(
    line.split("=", 1)
    for line in (Path(__file__).parent / "versions.env").read_text().splitlines()
    if line and not line.startswith("#")
)
GPU = "nvidia.com/gpu"


def _pod(name: str, *, gpus: int = 0, tolerate_gpu: bool = False) -> dict[str, Any]:
    resources: dict[str, Any] = {"requests": {"cpu": "100m", "memory": "64Mi"}}
    if gpus:
        resources["limits"] = {GPU: str(gpus)}
    spec: dict[str, Any] = {
        # never pulled: kwok plays the kubelet
        "containers": [{"name": "main", "image": "registry.invalid/llmray/none:0", "resources": resources}],
    }
    if tolerate_gpu:
        spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _condition(pod: client.V1Pod, kind: str) -> client.V1PodCondition | None:
    return next((c for c in (pod.status.conditions or []) if c.type == kind), None)


# --- versions and nodes ----------------------------------------------------------------------------


def test_versions_are_pinned(kube: Kube) -> None:
    info = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert info["clientVersion"]["gitVersion"] == VERSIONS["KUBE_VERSION"]
    assert info["serverVersion"]["gitVersion"] == VERSIONS["KUBE_VERSION"]


def test_simulated_nodes_are_ready_with_gpu_capacity(kube: Kube) -> None:
    nodes = client.CoreV1Api(kube.api_client).list_node(label_selector="llmray.io/simulated=true").items
    gpu = [n for n in nodes if n.metadata.name.startswith("llmray-gpu-")]
    cpu = [n for n in nodes if n.metadata.name.startswith("llmray-cpu-")]
    assert gpu, "no llmray-gpu-* nodes"
    assert cpu, "no llmray-cpu-* nodes"
    for node in nodes:
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        assert ready.status == "True", (node.metadata.name, ready)
    for node in gpu:
        assert node.status.capacity[GPU] == "8"
        assert node.status.allocatable[GPU] == "8"
        assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert any(
            t.key == GPU and t.value == "present" and t.effect == "NoSchedule" for t in node.spec.taints
        )
    for node in cpu:
        assert GPU not in node.status.capacity
        assert node.status.capacity["cpu"] == "8"


# --- CRD: structural schema + CEL ------------------------------------------------------------------

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.llmray.io"},
    "spec": {
        "group": "test.llmray.io",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size", "maxSize"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "maxSize": {"type": "integer"},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.size <= self.maxSize",
                                        "message": "size must not exceed maxSize",
                                        "fieldPath": ".size",
                                    }
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def widget_crd(kube: Kube) -> Any:
    apply_yaml(kube, WIDGET_CRD)
    kube.wait_established("widgets.test.llmray.io")
    yield client.CustomObjectsApi(kube.api_client)
    kube.kubectl("delete", "crd/widgets.test.llmray.io", "--timeout=60s")


def _widget(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "test.llmray.io/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


def test_crd_schema_and_cel_rule_are_enforced(widget_crd: Any, namespace: str) -> None:
    api = widget_crd
    create = lambda body: api.create_namespaced_custom_object(  # noqa: E731
        "test.llmray.io", "v1", namespace, "widgets", body
    )
    # valid object accepted (the REST mapping may take a moment after Established); unknown field pruned
    ok = wait_for(
        lambda: create(_widget("ok", size=2, maxSize=4, color="blue")),
        timeout=30,
        what="a valid Widget to be accepted",
    )
    assert ok["spec"] == {"size": 2, "maxSize": 4}

    with pytest.raises(ApiException) as cel:
        create(_widget("too-big", size=5, maxSize=4))
    assert cel.value.status == 422
    body = json.loads(cel.value.body)
    assert "size must not exceed maxSize" in body["message"]
    assert [c["field"] for c in body["details"]["causes"]] == ["spec.size"]

    with pytest.raises(ApiException) as typed:
        create(_widget("wrong-type", size="five", maxSize=4))
    assert typed.value.status == 422
    assert "spec.size" in json.loads(typed.value.body)["message"]

    with pytest.raises(ApiException) as minimum:
        create(_widget("zero", size=0, maxSize=4))
    assert minimum.value.status == 422
    assert "spec.size" in json.loads(minimum.value.body)["message"]


# --- scheduling onto simulated GPU nodes -----------------------------------------------------------


def test_gpu_pod_with_toleration_runs_on_gpu_node(kube: Kube, namespace: str) -> None:
    core = client.CoreV1Api(kube.api_client)
    apply_yaml(kube, [_pod("gpu", gpus=1, tolerate_gpu=True), _pod("cpu")], namespace)

    def running(name: str) -> client.V1Pod | None:
        pod = core.read_namespaced_pod(name, namespace)
        ready = _condition(pod, "Ready")
        return pod if pod.status.phase == "Running" and ready and ready.status == "True" else None

    gpu_pod = wait_for(lambda: running("gpu"), timeout=60, what="GPU pod Running and Ready")
    assert gpu_pod.spec.node_name.startswith("llmray-gpu-")
    assert gpu_pod.status.pod_ip  # fictional address from kwok's range: never connect to it
    cpu_pod = wait_for(lambda: running("cpu"), timeout=60, what="CPU pod Running and Ready")
    assert cpu_pod.spec.node_name.startswith("llmray-cpu-")


def test_gpu_pod_without_toleration_is_unschedulable(kube: Kube, namespace: str) -> None:
    core = client.CoreV1Api(kube.api_client)
    apply_yaml(kube, _pod("no-toleration", gpus=1), namespace)

    def unschedulable() -> client.V1PodCondition | None:
        pod = core.read_namespaced_pod("no-toleration", namespace)
        cond = _condition(pod, "PodScheduled")
        return cond if cond and cond.status == "False" and cond.reason == "Unschedulable" else None

    cond = wait_for(unschedulable, timeout=60, what="PodScheduled=False/Unschedulable")
    assert GPU in cond.message  # "Insufficient nvidia.com/gpu" and/or the untolerated taint
    pod = core.read_namespaced_pod("no-toleration", namespace)
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None


# --- garbage collection ----------------------------------------------------------------------------


def test_deleting_owner_garbage_collects_dependents(kube: Kube, namespace: str) -> None:
    core = client.CoreV1Api(kube.api_client)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    for name in ("child-a", "child-b"):
        core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, owner_references=[ref]))
        )
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="bystander"))
    )

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def children_gone() -> bool:
        names = {cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items}
        return not names & {"child-a", "child-b"}

    wait_for(children_gone, timeout=60, what="dependents of the deleted owner to be collected")
    assert core.read_namespaced_config_map("bystander", namespace).metadata.name == "bystander"


# --- RBAC and authentication -----------------------------------------------------------------------


def test_rbac_limits_a_service_account(kube: Kube, namespace: str) -> None:
    apply_yaml(
        kube,
        f"""
apiVersion: v1
kind: ServiceAccount
metadata: {{name: reader}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: pod-reader}}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: reader-reads-pods}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-reader}}
subjects:
- {{kind: ServiceAccount, name: reader, namespace: {namespace}}}
""",
        namespace,
    )
    user = f"system:serviceaccount:{namespace}:reader"

    def can_i(*what: str) -> str:
        proc = kube.kubectl("auth", "can-i", *what, "-n", namespace, f"--as={user}", check=False)
        return proc.stdout.strip()

    # RBAC bindings are served from an informer cache: wait for the grant to show up
    wait_for(lambda: can_i("list", "pods") == "yes", timeout=30, what="RoleBinding to take effect")
    assert can_i("get", "pods") == "yes"
    assert can_i("create", "pods") == "no"
    assert can_i("list", "secrets") == "no"
    assert can_i("list", "pods", "--all-namespaces") == "no"

    # real requests, impersonated
    denied = kube.kubectl("get", "secrets", "-n", namespace, f"--as={user}", check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and "secrets" in denied.stderr

    as_reader = client.ApiClient(kube.api_client.configuration)
    as_reader.set_default_header("Impersonate-User", user)
    core = client.CoreV1Api(as_reader)
    try:
        assert core.list_namespaced_pod(namespace).items == []
        with pytest.raises(ApiException) as exc:
            core.list_namespaced_secret(namespace)
        assert exc.value.status == 403
        with pytest.raises(ApiException) as exc:
            core.create_namespaced_pod(namespace, _pod("nope"))
        assert exc.value.status == 403
    finally:
        as_reader.close()

    # and with the account's own token (TokenRequest -> bearer auth), not impersonation
    admin = client.CoreV1Api(kube.api_client)
    token = admin.create_namespaced_service_account_token(
        "reader", namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status.token
    base = kube.api_client.configuration
    conf = client.Configuration()
    conf.host = base.host
    conf.ssl_ca_cert = base.ssl_ca_cert
    conf.api_key = {"authorization": f"Bearer {token}"}
    with client.ApiClient(conf) as bearer:
        core = client.CoreV1Api(bearer)
        assert core.list_namespaced_pod(namespace).items == []
        with pytest.raises(ApiException) as exc:
            core.list_namespaced_secret(namespace)
        assert exc.value.status == 403
        assert f'"{user}"' in json.loads(exc.value.body)["message"]
    # an unknown bearer token is not authenticated at all
    conf.api_key = {"authorization": f"Bearer {uuid.uuid4().hex}"}
    with client.ApiClient(conf) as anonymous:
        with pytest.raises(ApiException) as exc:
            client.CoreV1Api(anonymous).list_namespaced_pod(namespace)
        assert exc.value.status == 401
