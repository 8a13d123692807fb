"""The ``kueue`` fixture runs a real Kueue: admission, preemption, requeue, webhooks.

Workloads are created by hand, as llmray's operator creates them (owned by an LLMTrainingJob, a kind
no Kueue job framework knows), and the test plays the job controller's part on eviction: clear the
quota reservation through the status subresource (docs/kueue-notes.md), as Kueue's jobframework
reconciler does. No llmray operator runs here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.kueue import GROUP, VERSION, Kueue
from tests.kube import Kube, KubectlError, apply_yaml, wait_for

from .test_operator_fixtures import EXAMPLES, crds_fixture  # noqa: F401 - fixture

pytestmark = pytest.mark.cluster

API = f"{GROUP}/{VERSION}"


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions", []) or []:
        if cond["type"] == kind:
            return dict(cond)
    return None


def is_true(obj: dict[str, Any], kind: str) -> bool:
    cond = condition(obj, kind)
    return bool(cond and cond["status"] == "True")


def get_workload(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    out = kube.kubectl("get", f"workloads.{VERSION}.{GROUP}", name, "-n", namespace, "-o", "json").stdout
    return dict(json.loads(out))


def workload(
    name: str, queue: str, priority_class: str, priority: int, gpus: int, cpu: str = "1"
) -> dict[str, Any]:
    """A Workload as a job controller writes it: one pod set, its pod template, queue and priority."""
    return {
        "apiVersion": API,
        "kind": "Workload",
        "metadata": {"name": name},
        "spec": {
            "queueName": queue,
            # the CRD demands spec.priority with priorityClassRef: the creator resolves the value
            "priorityClassRef": {"group": GROUP, "kind": "WorkloadPriorityClass", "name": priority_class},
            "priority": priority,
            "podSets": [
                {
                    "name": "workers",
                    "count": 1,
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [
                                {
                                    "name": "train",
                                    "image": "llmray/runtime:test",
                                    "resources": {
                                        "requests": {"cpu": cpu, "nvidia.com/gpu": str(gpus)},
                                        "limits": {"nvidia.com/gpu": str(gpus)},
                                    },
                                }
                            ],
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture
def queues(kueue: Kueue, namespace: str) -> Iterator[dict[str, str]]:
    """A flavor, a ClusterQueue (4 CPU, 2 GPU, preemption of lower priority), a LocalQueue in the test
    namespace and two WorkloadPriorityClasses; all removed afterwards (workloads first)."""
    kube = kueue.kube
    suffix = uuid.uuid4().hex[:6]
    names = {
        "flavor": f"flavor-{suffix}",
        "cq": f"cq-{suffix}",
        "lq": "team",
        "low": f"low-{suffix}",
        "high": f"high-{suffix}",
    }
    apply_yaml(
        kube,
        [
            {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": names["flavor"]}},
            {
                "apiVersion": API,
                "kind": "ClusterQueue",
                "metadata": {"name": names["cq"]},
                "spec": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "preemption": {"withinClusterQueue": "LowerPriority"},
                    "resourceGroups": [
                        {
                            "coveredResources": ["cpu", "nvidia.com/gpu"],
                            "flavors": [
                                {
                                    "name": names["flavor"],
                                    "resources": [
                                        {"name": "cpu", "nominalQuota": "4"},
                                        {"name": "nvidia.com/gpu", "nominalQuota": "2"},
                                    ],
                                }
                            ],
                        }
                    ],
                },
            },
            {
                "apiVersion": API,
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": names["low"]},
                "value": 100,
            },
            {
                "apiVersion": API,
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": names["high"]},
                "value": 1000,
            },
        ],
    )
    apply_yaml(
        kube,
        {
            "apiVersion": API,
            "kind": "LocalQueue",
            "metadata": {"name": names["lq"], "namespace": namespace},
            "spec": {"clusterQueue": names["cq"]},
        },
    )

    def cq_active() -> bool:
        cq = json.loads(kube.kubectl("get", f"clusterqueues.{GROUP}", names["cq"], "-o", "json").stdout)
        return is_true(cq, "Active")

    wait_for(cq_active, timeout=60, what=f"ClusterQueue {names['cq']} Active")
    try:
        yield names
    finally:
        kube.kubectl("delete", f"workloads.{GROUP}", "--all", "-n", namespace, "--wait=true", "--timeout=60s")
        kube.kubectl("delete", f"localqueues.{GROUP}", names["lq"], "-n", namespace, "--timeout=60s")
        kube.kubectl("delete", f"clusterqueues.{GROUP}", names["cq"], "--timeout=60s")
        kube.kubectl("delete", f"resourceflavors.{GROUP}", names["flavor"], "--timeout=60s")
        kube.kubectl("delete", f"workloadpriorityclasses.{GROUP}", names["low"], names["high"])


def admitted_to(kube: Kube, namespace: str, name: str, cq: str) -> dict[str, Any] | None:
    wl = get_workload(kube, namespace, name)
    admission = wl.get("status", {}).get("admission") or {}
    if admission.get("clusterQueue") == cq and is_true(wl, "Admitted") and is_true(wl, "QuotaReserved"):
        return wl
    return None


def release_quota_after_eviction(kube: Kube, namespace: str, name: str) -> None:
    """What Kueue's jobframework reconciler does once the evicted job is stopped
    (pkg/controller/jobframework/reconciler.go, "handle eviction"): Requeued=True (reason of the
    eviction), QuotaReserved=False reason Pending, Admitted=False reason NoReservation and no
    status.admission, in one patch of the status subresource (merge patch, guarded by
    resourceVersion)."""

    def patch() -> bool:
        wl = get_workload(kube, namespace, name)
        evicted = condition(wl, "Evicted")
        assert evicted and evicted["status"] == "True", wl.get("status")
        now = evicted["lastTransitionTime"]
        gen = wl["metadata"]["generation"]
        conds = {c["type"]: c for c in wl["status"]["conditions"]}
        conds["Requeued"] = {
            "type": "Requeued", "status": "True", "reason": evicted["reason"],
            "message": evicted["message"], "observedGeneration": gen, "lastTransitionTime": now,
        }  # fmt: skip
        conds["QuotaReserved"] = {
            "type": "QuotaReserved", "status": "False", "reason": "Pending",
            "message": evicted["message"], "observedGeneration": gen, "lastTransitionTime": now,
        }  # fmt: skip
        conds["Admitted"] = {
            "type": "Admitted", "status": "False", "reason": "NoReservation",
            "message": "The workload has no reservation", "observedGeneration": gen,
            "lastTransitionTime": now,
        }  # fmt: skip
        body = {
            "metadata": {"resourceVersion": wl["metadata"]["resourceVersion"]},
            "status": {"admission": None, "conditions": list(conds.values())},
        }
        kube.kubectl(
            "patch", f"workloads.{VERSION}.{GROUP}", name, "-n", namespace,
            "--subresource=status", "--type=merge", "-p", json.dumps(body),
        )  # fmt: skip
        return True

    wait_for(patch, timeout=30, what=f"status patch of {name} (retried on conflict)")


def test_admission_preemption_requeue_readmission(
    kueue: Kueue, namespace: str, queues: dict[str, str], crds: None
) -> None:
    kube = kueue.kube
    cq = queues["cq"]
    # the owner: an LLMTrainingJob (unknown to Kueue); no operator runs, so it is just an object
    (job,) = apply_yaml(kube, (EXAMPLES / "training-tiny-cpu.yaml").read_text(), namespace=namespace)
    low_wl = workload("low", queues["lq"], queues["low"], 100, gpus=2)
    owner = {"apiVersion": job["apiVersion"], "kind": job["kind"], "name": job["metadata"]["name"]}
    owner |= {"uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    low_wl["metadata"]["ownerReferences"] = [owner]
    apply_yaml(kube, low_wl, namespace=namespace)
    low = wait_for(lambda: admitted_to(kube, namespace, "low", cq), timeout=60, what="low admitted")
    assignment = low["status"]["admission"]["podSetAssignments"][0]
    assert assignment["name"] == "workers"
    assert assignment["flavors"] == {"cpu": queues["flavor"], "nvidia.com/gpu": queues["flavor"]}
    assert assignment["resourceUsage"]["nvidia.com/gpu"] == "2"

    # v1beta1 is still served: the API server converts through Kueue's conversion webhook
    old = json.loads(
        kube.kubectl("get", f"workloads.v1beta1.{GROUP}", "low", "-n", namespace, "-o", "json").stdout
    )
    assert old["apiVersion"] == f"{GROUP}/v1beta1"
    assert old["spec"]["priorityClassName"] == queues["low"]

    # the high-priority workload needs the same 2 GPUs: Kueue preempts the low one
    apply_yaml(kube, workload("high", queues["lq"], queues["high"], 1000, gpus=2), namespace=namespace)

    def low_evicted() -> dict[str, Any] | None:
        wl = get_workload(kube, namespace, "low")
        cond = condition(wl, "Evicted")
        return wl if cond and cond["status"] == "True" and cond["reason"] == "Preempted" else None

    low = wait_for(low_evicted, timeout=60, what="low Evicted (reason Preempted)")
    preempted = condition(low, "Preempted")
    assert preempted and preempted["status"] == "True" and preempted["reason"] == "InClusterQueue", preempted
    # Kueue keeps the quota of an evicted workload reserved until its job controller releases it
    assert is_true(low, "QuotaReserved"), low["status"]
    high = get_workload(kube, namespace, "high")
    assert not high.get("status", {}).get("admission"), high.get("status")

    release_quota_after_eviction(kube, namespace, "low")
    wait_for(lambda: admitted_to(kube, namespace, "high", cq), timeout=60, what="high admitted")
    low = get_workload(kube, namespace, "low")
    assert not low["status"].get("admission"), low["status"]
    assert not is_true(low, "Admitted") and is_true(low, "Requeued"), low["status"]

    # the high one finishes (here: is deleted); the low one gets its quota back
    kube.kubectl("delete", f"workloads.{GROUP}", "high", "-n", namespace, "--timeout=60s")
    low = wait_for(lambda: admitted_to(kube, namespace, "low", cq), timeout=60, what="low admitted again")
    assert not is_true(low, "Evicted"), low["status"]
    assert low["metadata"]["ownerReferences"] == [owner]  # Kueue left the ownership alone


def test_validating_webhook_refuses_invalid_workload(kueue: Kueue, namespace: str) -> None:
    """The CRD schema accepts a ``pods`` request; only Kueue's webhook refuses it (reserved key)."""
    bad = workload("bad", "team", "none", 0, gpus=1)
    del bad["spec"]["priorityClassRef"]
    bad["spec"]["podSets"][0]["template"]["spec"]["containers"][0]["resources"]["requests"]["pods"] = "1"
    with pytest.raises(KubectlError) as err:
        apply_yaml(kueue.kube, bad, namespace=namespace)
    message = str(err.value)
    assert 'admission webhook "vworkload.kb.io" denied the request' in message, message
    assert "reserved for internal kueue use" in message, message
    # the same object without the reserved key is accepted (the refusal was about that key)
    del bad["spec"]["podSets"][0]["template"]["spec"]["containers"][0]["resources"]["requests"]["pods"]
    apply_yaml(kueue.kube, bad, namespace=namespace)
