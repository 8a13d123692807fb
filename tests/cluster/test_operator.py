"""The operator against a real control plane: examples become Ray clusters, children are repaired,
spec changes apply in place or by recreation, problems are reported, deletion cascades."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from kubernetes import client

from tests.kube import Kube, wait_for

from .test_operator_fixtures import (
    GROUP,
    PLURALS,
    VERSION,
    Operator,
    apply,
    condition,
    events_for,
    example,
    get_cr,
    owned_children,
    pods_of,
    running_ready,
    status_of,
    wait_cluster_ready,
    wait_gone,
    wait_phase,
    wait_reason,
)

pytestmark = pytest.mark.cluster

# file, kind, name, workers, gpu workers
EXAMPLES = [
    ("training-tiny-cpu.yaml", "LLMTrainingJob", "tiny-train", 2, False),
    ("training-qwen-lora.yaml", "LLMTrainingJob", "qwen-lora", 2, True),
    ("deployment-tiny-cpu.yaml", "LLMDeployment", "tiny-chat", 1, False),
    ("deployment-vllm.yaml", "LLMDeployment", "qwen-chat", 1, True),
]
WORKER_NAME = re.compile(r"^(?P<name>.+)-worker-(?P<group>gpu|cpu)-[bcdfghjklmnpqrstvwxz2456789]{5}$")


def _patch_spec(kube: Kube, kind: str, namespace: str, name: str, spec: dict[str, Any]) -> None:
    client.CustomObjectsApi(kube.api_client).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURALS[kind], name, {"spec": spec}
    )


def _uids(pods: list[client.V1Pod]) -> set[str]:
    return {p.metadata.uid for p in pods}


@pytest.mark.parametrize(("file", "kind", "name", "workers", "gpu"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_becomes_a_ray_cluster(
    kube: Kube,
    namespace: str,
    operator: Operator,
    pvc: Any,
    file: str,
    kind: str,
    name: str,
    workers: int,
    gpu: bool,
) -> None:
    if file == "training-qwen-lora.yaml":
        pvc("llm-models")  # its output goes to pvc://llm-models/...
    apply(kube, example(file), namespace)
    status = wait_cluster_ready(kube, kind, namespace, name, workers)
    cr = get_cr(kube, kind, namespace, name)

    # children: deterministic names, owned by the resource
    children = owned_children(kube, namespace, name)
    services = [f"{name}-head"] + ([f"{name}-serve"] if kind == "LLMDeployment" else [])
    assert sorted(children["services"]) == sorted(services)
    assert children["secrets"] == [f"{name}-ray-auth"]
    core = client.CoreV1Api(kube.api_client)
    head = core.read_namespaced_pod(f"{name}-head", namespace)
    assert head.metadata.owner_references[0].uid == cr["metadata"]["uid"]
    assert head.spec.node_name.startswith("llmray-cpu-"), "the head needs no GPU"
    assert "--head" in head.spec.containers[0].command
    token_env = next(e for e in head.spec.containers[0].env if e.name == "RAY_AUTH_TOKEN")
    assert token_env.value_from.secret_key_ref.name == f"{name}-ray-auth"

    worker_pods = pods_of(kube, namespace, name, "worker")
    assert len(worker_pods) == workers
    for pod in worker_pods:
        match = WORKER_NAME.match(pod.metadata.name)
        assert match and match["name"] == name, pod.metadata.name
        assert match["group"] == ("gpu" if gpu else "cpu")
        assert pod.metadata.owner_references[0].uid == cr["metadata"]["uid"]
        assert running_ready(pod)
        if gpu:
            assert pod.spec.node_name.startswith("llmray-gpu-"), pod.spec.node_name
            assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
        else:
            assert pod.spec.node_name.startswith("llmray-cpu-"), pod.spec.node_name

    # status
    assert status["phase"] == ("Running" if kind == "LLMTrainingJob" else "Deploying")
    assert status["observedGeneration"] == cr["metadata"]["generation"]
    assert status["rayCluster"] == {
        "name": name,
        "headService": f"{name}-head",
        "dashboardUrl": f"http://{name}-head.{namespace}.svc.cluster.local:8265",
        "headReady": True,
    }
    for type_ in ("HeadPodReady", "RayClusterReady", "Reconciled"):
        cond = condition(status, type_)
        assert cond["status"] == "True", cond
        assert cond["observedGeneration"] == cr["metadata"]["generation"]
        assert cond["lastTransitionTime"]
    if kind == "LLMDeployment":
        assert status["endpoint"] == f"http://{name}-serve.{namespace}.svc.cluster.local:8000/v1"
        assert status["model"]["uri"] == cr["spec"]["model"]["uri"]
    listing = kube.kubectl("get", "llmray", "-n", namespace).stdout
    assert name in listing and status["phase"] in listing


def test_deleted_children_are_recreated(kube: Kube, namespace: str, operator: Operator) -> None:
    apply(kube, example("training-tiny-cpu.yaml"), namespace)
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "tiny-train", 2)
    core = client.CoreV1Api(kube.api_client)

    # a worker: replaced by a new pod (in the lowest free slot: the same name once the old pod is gone)
    victim = pods_of(kube, namespace, "tiny-train", "worker")[0]
    core.delete_namespaced_pod(victim.metadata.name, namespace)

    def replaced() -> bool:
        workers = pods_of(kube, namespace, "tiny-train", "worker")
        return (
            len(workers) == 2
            and victim.metadata.uid not in _uids(workers)
            and all(running_ready(p) for p in workers)
        )

    wait_for(replaced, timeout=60, what="deleted worker pod replaced")
    # the head
    head = core.read_namespaced_pod("tiny-train-head", namespace)
    core.delete_namespaced_pod("tiny-train-head", namespace)
    wait_for(
        lambda: core.read_namespaced_pod("tiny-train-head", namespace).metadata.uid != head.metadata.uid,
        timeout=60,
        what="head pod recreated",
    )
    # the head Service
    svc = core.read_namespaced_service("tiny-train-head", namespace)
    core.delete_namespaced_service("tiny-train-head", namespace)
    wait_for(
        lambda: core.read_namespaced_service("tiny-train-head", namespace).metadata.uid != svc.metadata.uid,
        timeout=60,
        what="head Service recreated",
    )
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "tiny-train", 2)
    # the auth Secret: its token is derived from the operator's key and the resource's uid (the
    # operator may create Secrets but never read them), so it comes back with the same token as soon
    # as a pod needs it
    secret = core.read_namespaced_secret("tiny-train-ray-auth", namespace)
    core.delete_namespaced_secret("tiny-train-ray-auth", namespace)
    core.delete_namespaced_pod("tiny-train-head", namespace)
    wait_for(
        lambda: (
            core.read_namespaced_secret("tiny-train-ray-auth", namespace).metadata.uid != secret.metadata.uid
        ),
        timeout=60,
        what="auth Secret recreated",
    )
    assert core.read_namespaced_secret("tiny-train-ray-auth", namespace).data == secret.data
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "tiny-train", 2)


def test_deleting_the_resource_deletes_every_child(kube: Kube, namespace: str, operator: Operator) -> None:
    apply(kube, example("deployment-tiny-cpu.yaml"), namespace)
    wait_cluster_ready(kube, "LLMDeployment", namespace, "tiny-chat", 1)
    cr = get_cr(kube, "LLMDeployment", namespace, "tiny-chat")
    assert not cr["metadata"].get("finalizers"), "no finalizer: deletion never waits for the operator"
    kube.kubectl("delete", "llmd", "tiny-chat", "-n", namespace, "--wait=true")
    wait_gone(kube, namespace, "tiny-chat")


def test_deletion_works_while_the_operator_is_down(kube: Kube, namespace: str, operator: Operator) -> None:
    apply(kube, example("training-tiny-cpu.yaml"), namespace)
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "tiny-train", 2)
    operator.kill()
    kube.kubectl("delete", "ltj", "tiny-train", "-n", namespace, "--wait=true", timeout=60)
    wait_gone(kube, namespace, "tiny-train")


def test_spec_changes_scale_in_place_and_recreate_on_template_change(
    kube: Kube, namespace: str, operator: Operator
) -> None:
    kind, name = "LLMTrainingJob", "tiny-train"
    apply(kube, example("training-tiny-cpu.yaml"), namespace)
    wait_cluster_ready(kube, kind, namespace, name, 2)
    first = _uids(pods_of(kube, namespace, name))

    workers = copy.deepcopy(get_cr(kube, kind, namespace, name)["spec"]["workers"])
    _patch_spec(kube, kind, namespace, name, {"workers": {**workers, "replicas": 4}})
    wait_cluster_ready(kube, kind, namespace, name, 4)
    assert first <= _uids(pods_of(kube, namespace, name)), "scaling up must not restart existing pods"

    _patch_spec(kube, kind, namespace, name, {"workers": {**workers, "replicas": 1}})
    wait_cluster_ready(kube, kind, namespace, name, 1)
    assert _uids(pods_of(kube, namespace, name, "worker")) <= first, "the newest workers go first"
    head_uid = client.CoreV1Api(kube.api_client).read_namespaced_pod(f"{name}-head", namespace).metadata.uid
    assert head_uid in first, "scaling down must not restart the head"

    before = _uids(pods_of(kube, namespace, name))
    _patch_spec(kube, kind, namespace, name, {"image": "llmray/ray-runtime:0.2.0"})

    def recreated() -> bool:
        pods = pods_of(kube, namespace, name)
        return (
            len(pods) == 2
            and not (_uids(pods) & before)
            and all(
                p.spec.containers[0].image == "llmray/ray-runtime:0.2.0" and running_ready(p) for p in pods
            )
        )

    wait_for(recreated, timeout=90, what="every pod recreated with the new image")
    status = wait_cluster_ready(kube, kind, namespace, name, 1)
    assert status["observedGeneration"] == get_cr(kube, kind, namespace, name)["metadata"]["generation"]


def test_suspend_removes_pods_and_resume_brings_them_back(
    kube: Kube, namespace: str, operator: Operator
) -> None:
    kind, name = "LLMTrainingJob", "tiny-train"
    apply(kube, example("training-tiny-cpu.yaml"), namespace)
    wait_cluster_ready(kube, kind, namespace, name, 2)
    _patch_spec(kube, kind, namespace, name, {"suspend": True})
    status = wait_phase(kube, kind, namespace, name, "Suspended")
    assert condition(status, "RayClusterReady")["reason"] == "Suspended"
    wait_for(lambda: not pods_of(kube, namespace, name), timeout=60, what="pods removed while suspended")
    _patch_spec(kube, kind, namespace, name, {"suspend": False})
    wait_cluster_ready(kube, kind, namespace, name, 2)
    assert status_of(kube, kind, namespace, name)["phase"] == "Running"


def test_missing_api_key_secret_is_reported_and_recovers(
    kube: Kube, namespace: str, operator: Operator
) -> None:
    (dep,) = example("deployment-tiny-cpu.yaml")
    dep["spec"]["apiKeySecretRef"] = {"name": "chat-key", "key": "key"}
    apply(kube, dep, namespace)
    status = wait_phase(kube, "LLMDeployment", namespace, "tiny-chat", "Failed")
    cond = condition(status, "RayClusterReady")
    assert cond["reason"] == "SecretNotFound"
    assert "Secret chat-key not found" in status["message"]
    assert "kubectl create secret generic chat-key" in status["message"]
    assert not pods_of(kube, namespace, "tiny-chat"), "no pod is created that could never start"
    wait_for(
        lambda: any(
            e.reason == "SecretNotFound" and e.type == "Warning"
            for e in events_for(kube, namespace, "tiny-chat")
        ),
        timeout=30,
        what="a Warning event SecretNotFound",
    )
    kube.kubectl("create", "secret", "generic", "chat-key", "-n", namespace, "--from-literal=key=s3cret")
    wait_cluster_ready(kube, "LLMDeployment", namespace, "tiny-chat", 1)
    assert status_of(kube, "LLMDeployment", namespace, "tiny-chat")["phase"] == "Deploying"


def test_missing_hub_token_secret_keeps_training_pending(
    kube: Kube, namespace: str, operator: Operator
) -> None:
    (job,) = example("training-tiny-cpu.yaml")
    job["spec"]["model"]["secretRef"] = {"name": "hf-token"}
    apply(kube, job, namespace)
    status = wait_phase(kube, "LLMTrainingJob", namespace, "tiny-train", "Pending")
    wait_reason(kube, "LLMTrainingJob", namespace, "tiny-train", "RayClusterReady", "SecretNotFound")
    kube.kubectl("create", "secret", "generic", "hf-token", "-n", namespace, "--from-literal=wrong=x")
    wait_for(
        lambda: "has no key 'token'" in status_of(kube, "LLMTrainingJob", namespace, "tiny-train")["message"],
        timeout=30,
        what="message about the missing key",
    )
    kube.kubectl("delete", "secret", "hf-token", "-n", namespace)
    kube.kubectl("create", "secret", "generic", "hf-token", "-n", namespace, "--from-literal=token=hf_x")
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "tiny-train", 2)
    del status


def test_unschedulable_workers_fail_the_job_with_guidance_and_a_fix_retries(
    kube: Kube, namespace: str, operator_factory: Any
) -> None:
    operator_factory(namespace, "--unschedulable-timeout", "4").start()
    kind, name = "LLMTrainingJob", "tiny-train"
    (job,) = example("training-tiny-cpu.yaml")
    job["spec"]["workers"]["nodeSelector"] = {"llmray.io/node-pool": "tpu"}
    apply(kube, job, namespace)
    status = wait_phase(kube, kind, namespace, name, "Failed", timeout=90)
    cond = condition(status, "RayClusterReady")
    assert cond["reason"] == "Unschedulable"
    assert "nodeSelector" in status["message"] and "node affinity/selector" in status["message"]
    wait_for(
        lambda: any(
            e.type == "Warning" and e.reason in ("Unschedulable", "Failed")
            for e in events_for(kube, namespace, name)
        ),
        timeout=30,
        what="a Warning event",
    )
    wait_for(lambda: not pods_of(kube, namespace, name), timeout=60, what="pods of the failed job removed")
    _patch_spec(
        kube,
        kind,
        namespace,
        name,
        {"workers": {**job["spec"]["workers"], "nodeSelector": {"llmray.io/node-pool": "cpu"}}},
    )
    wait_cluster_ready(kube, kind, namespace, name, 2)
    assert status_of(kube, kind, namespace, name)["phase"] == "Running"


def test_deployment_from_training_job_follows_the_job(kube: Kube, namespace: str, operator: Operator) -> None:
    apply(kube, example("deployment-from-training.yaml"), namespace)
    status = wait_phase(kube, "LLMDeployment", namespace, "tiny-tuned", "Pending")
    wait_reason(kube, "LLMDeployment", namespace, "tiny-tuned", "ModelResolved", "TrainingJobNotFound")
    assert not pods_of(kube, namespace, "tiny-tuned")

    apply(kube, example("training-tiny-cpu.yaml"), namespace)
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "tiny-train", 2)
    wait_reason(kube, "LLMDeployment", namespace, "tiny-tuned", "ModelResolved", "TrainingJobNotSucceeded")
    # The Ray integration marks the job Succeeded; simulate that part of its status.
    output = "file:///tmp/llmray/outputs/tiny-train/final"
    client.CustomObjectsApi(kube.api_client).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "llmtrainingjobs", "tiny-train",
        {"status": {"phase": "Succeeded", "output": {"uri": output}, "completionTime": "2026-01-01T00:00:00Z"}},  # noqa: E501
    )  # fmt: skip
    status = wait_cluster_ready(kube, "LLMDeployment", namespace, "tiny-tuned", 1)
    # No Serve app runs here (fictional pod IPs): no model version serves or rolls out yet.
    assert status["model"] == {"uri": output, "name": "tiny-tuned", "version": "", "pendingVersion": ""}
    assert condition(status, "ModelResolved")["status"] == "True"
    # ... and the finished job's Ray pods are gone (ttlSecondsAfterFinished unset = 0)
    wait_for(
        lambda: not pods_of(kube, namespace, "tiny-train"), timeout=60, what="finished job's pods deleted"
    )
    assert (
        condition(status_of(kube, "LLMTrainingJob", namespace, "tiny-train"), "RayClusterReady")["reason"]
        == "Finished"
    )
    assert status_of(kube, "LLMTrainingJob", namespace, "tiny-train")["phase"] == "Succeeded"


def test_name_clash_between_kinds_is_reported(kube: Kube, namespace: str, operator: Operator) -> None:
    apply(kube, example("training-tiny-cpu.yaml"), namespace)
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "tiny-train", 2)
    (dep,) = example("deployment-tiny-cpu.yaml")
    dep["metadata"]["name"] = "tiny-train"
    apply(kube, dep, namespace)
    status = wait_phase(kube, "LLMDeployment", namespace, "tiny-train", "Failed")
    assert condition(status, "RayClusterReady")["reason"] == "NameConflict"
    assert "belongs to LLMTrainingJob tiny-train" in status["message"]
    # the training job's cluster is untouched
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "tiny-train", 2)


def test_delete_and_reapply_with_the_same_name(kube: Kube, namespace: str, operator: Operator) -> None:
    """Leftovers of the old resource (awaiting garbage collection) delay the new one, never fail it."""
    apply(kube, example("training-tiny-cpu.yaml"), namespace)
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "tiny-train", 2)
    old_uid = get_cr(kube, "LLMTrainingJob", namespace, "tiny-train")["metadata"]["uid"]
    kube.kubectl("delete", "ltj", "tiny-train", "-n", namespace, "--wait=true")
    apply(kube, example("training-tiny-cpu.yaml"), namespace)
    new_uid = get_cr(kube, "LLMTrainingJob", namespace, "tiny-train")["metadata"]["uid"]
    assert new_uid != old_uid
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "tiny-train", 2)
    for pod in pods_of(kube, namespace, "tiny-train"):
        assert pod.metadata.owner_references[0].uid == new_uid
    assert status_of(kube, "LLMTrainingJob", namespace, "tiny-train")["phase"] == "Running"


def test_serve_service_drift_is_reverted_and_idle_resyncs_do_not_patch(
    kube: Kube, namespace: str, operator: Operator
) -> None:
    """Issue 11: children's owned fields are compared (not only the spec-hash annotation): a
    `kubectl patch` of the serve Service's type is reverted; a converged resource is not patched."""
    apply(kube, example("deployment-tiny-cpu.yaml"), namespace)
    wait_cluster_ready(kube, "LLMDeployment", namespace, "tiny-chat", 1)

    def patches() -> float:
        return operator.metric("llmray_kube_requests_total", verb="patch", resource="services")

    def two_more_passes() -> None:
        done = operator.metric("llmray_reconciles_total", kind="LLMDeployment", result="ok")
        wait_for(
            lambda: operator.metric("llmray_reconciles_total", kind="LLMDeployment", result="ok") >= done + 2,
            timeout=60,
            what="two more passes (resyncs)",
        )

    before = patches()
    two_more_passes()
    assert patches() == before, "the API server's defaults must not look like drift"
    kube.kubectl("patch", "svc", "tiny-chat-serve", "-n", namespace, "-p", '{"spec":{"type":"NodePort"}}')
    core = client.CoreV1Api(kube.api_client)
    wait_for(
        lambda: core.read_namespaced_service("tiny-chat-serve", namespace).spec.type == "ClusterIP",
        timeout=60,
        what="the serve Service's type reverted to ClusterIP",
    )
    reverted = patches()
    assert reverted >= before + 1  # (a pass on a cache that has not seen the revert yet may repeat it)
    two_more_passes()
    assert patches() == reverted  # converged again
