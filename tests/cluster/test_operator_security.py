"""Secure by default: every pod the operator makes is admitted by the `restricted` Pod Security
Standard, and Ray token auth is on for every container."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.kube import Kube

from .test_operator_fixtures import (
    Operator,
    apply,
    condition,
    example,
    pods_of,
    wait_cluster_ready,
)

pytestmark = pytest.mark.cluster

EXAMPLES = [
    ("training-tiny-cpu.yaml", "LLMTrainingJob", "tiny-train", 2),
    ("training-qwen-lora.yaml", "LLMTrainingJob", "qwen-lora", 2),
    ("deployment-tiny-cpu.yaml", "LLMDeployment", "tiny-chat", 1),
    ("deployment-vllm.yaml", "LLMDeployment", "qwen-chat", 1),
]


def test_restricted_namespace_admits_every_pod(
    kube: Kube, namespace: str, operator: Operator, pvc: Any
) -> None:
    kube.kubectl(
        "label", "namespace", namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )  # fmt: skip
    core = client.CoreV1Api(kube.api_client)
    # The policy is really enforced: a root pod is refused.
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "root"},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            },
        )
    assert refused.value.status == 403 and "restricted" in str(refused.value.body)

    pvc("llm-models")
    for file, _, _, _ in EXAMPLES:
        apply(kube, example(file), namespace)
    for _, kind, name, workers in EXAMPLES:
        status = wait_cluster_ready(kube, kind, namespace, name, workers, timeout=90)
        assert condition(status, "Reconciled")["status"] == "True"
        for pod in pods_of(kube, namespace, name):
            env = {e.name: e for e in pod.spec.containers[0].env}
            assert env["RAY_AUTH_MODE"].value == "token"
            assert env["RAY_AUTH_TOKEN"].value_from.secret_key_ref.name == f"{name}-ray-auth"


def test_every_ray_cluster_gets_its_network_policy(kube: Kube, namespace: str, operator_factory: Any) -> None:
    """The operator applies the builder's NetworkPolicy as an owned child, the API server accepts it,
    and it follows the serve Service (ClusterIP: the namespace's pods; NodePort: everyone)."""
    from tests.kube import wait_for

    labels = "app.kubernetes.io/name=llmray-operator,app.kubernetes.io/instance=llmray"
    operator_factory(
        namespace, "--operator-namespace", "llmray-system", "--operator-pod-labels", labels
    ).start()
    (dep,) = example("deployment-tiny-cpu.yaml")
    apply(kube, dep, namespace)
    wait_cluster_ready(kube, "LLMDeployment", namespace, "tiny-chat", 1)
    net = client.NetworkingV1Api(kube.api_client)
    policy = net.read_namespaced_network_policy("tiny-chat-ray", namespace)
    owner = policy.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.controller) == ("LLMDeployment", "tiny-chat", True)
    assert policy.spec.pod_selector.match_labels == {
        "ray.io/cluster": "tiny-chat",
        "llmray.io/kind": "LLMDeployment",
    }
    assert policy.spec.policy_types == ["Ingress"]

    def serve_sources(p: Any) -> Any:
        rule = next(r for r in p.spec.ingress if r.ports and [x.port for x in r.ports] == [8000])
        return rule._from

    assert [s.pod_selector.match_labels for s in serve_sources(policy)] == [None]  # {}: pods of the namespace
    operator_rule = next(r for r in policy.spec.ingress if r.ports and len(r.ports) == 2)
    (peer,) = operator_rule._from
    assert peer.namespace_selector.match_labels == {"kubernetes.io/metadata.name": "llmray-system"}
    assert {p.port for p in operator_rule.ports} == {8265, 8000}

    dep["spec"]["service"] = {"type": "NodePort", "port": 8000, "allowUnauthenticated": True}
    apply(kube, dep, namespace)
    wait_for(
        lambda: serve_sources(net.read_namespaced_network_policy("tiny-chat-ray", namespace)) is None,
        timeout=60,
        what="serve port open to every source once the Service is a NodePort",
    )
