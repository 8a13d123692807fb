"""Kueue admission of LLMTrainingJobs: the Workload builder, Kueue's answer, the queue decision, and
whole reconcile passes through the fakes (Kueue played by the test): held -> admitted -> running ->
evicted -> held -> re-admitted -> resumed (attempt + 1) -> finished -> Workload Finished."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from llmray.api.common import GROUP, VERSION
from llmray.api.training import KIND, LLMTrainingJobSpec
from llmray.builders.cluster import training_cluster, worker_pod
from llmray.builders.common import Owner
from llmray.builders.kueue import (
    QUEUE_LABEL,
    Cond,
    build_workload,
    finish_patch,
    flavor_placement,
    requeue_patch,
    workload_name,
    workload_state,
)
from llmray.controllers.queueing import QueueSeen, decide_queue
from llmray.controllers.settings import Settings
from llmray.ray import submission_id
from llmray.ray.jobs import JobStatus

from .fakes import World
from .test_training_controller import NS, spec

pytestmark = pytest.mark.unit

API = "kueue.x-k8s.io/v1beta2"
AT = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
GPU_SPEC = spec(workers={"replicas": 2, "resources": {"cpu": "4", "memory": "8Gi", "gpu": 1}})
OWNER = Owner(KIND, "ft", NS, "uid-1")


def _cluster() -> Any:
    return training_cluster(OWNER, LLMTrainingJobSpec.model_validate(GPU_SPEC))


# --- builder -----------------------------------------------------------------------------------------


def test_workload_sizes_head_and_workers_from_the_real_pods() -> None:
    wl = build_workload(_cluster(), 2, queue="team-a", api_version=API, priority_class="high", priority=100)
    assert wl["apiVersion"] == API and wl["kind"] == "Workload"
    meta = wl["metadata"]
    assert meta["name"] == workload_name(KIND, "ft", "uid-1") and meta["namespace"] == NS
    (ref,) = meta["ownerReferences"]
    assert (ref["kind"], ref["uid"], ref["controller"]) == (KIND, "uid-1", True)
    head, workers = wl["spec"]["podSets"]
    assert (head["name"], head["count"], workers["name"], workers["count"]) == ("head", 1, "workers", 2)
    req = workers["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert req == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}  # no ephemeral-storage
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["requests"]
    # the real pod's scheduling constraints, so Kueue picks a flavor the pods can land on
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in workers["template"][
        "spec"
    ]["tolerations"]
    assert wl["spec"]["queueName"] == "team-a"
    assert wl["spec"]["priorityClassRef"] == {
        "group": "kueue.x-k8s.io",
        "kind": "WorkloadPriorityClass",
        "name": "high",
    }
    assert wl["spec"]["priority"] == 100


def test_workload_name_is_per_uid_and_bounded() -> None:
    assert workload_name(KIND, "ft", "a") != workload_name(KIND, "ft", "b")
    assert len(workload_name(KIND, "x" * 253, "a")) <= 253


def test_flavor_assignment_is_not_part_of_the_pod_sets() -> None:
    """Applying an admission to the pods must not make the Workload look out of date."""
    cluster = _cluster()
    assigned = flavor_placement([{"spec": {"nodeLabels": {"pool": "a100"}}}])
    placed = dataclasses.replace(cluster, workers_assigned=assigned)
    plain = build_workload(cluster, 2, queue="q", api_version=API)
    again = build_workload(placed, 2, queue="q", api_version=API)
    assert plain["metadata"]["annotations"] == again["metadata"]["annotations"]


def test_flavors_add_node_selector_and_tolerations_to_the_pods() -> None:
    flavor = {
        "spec": {
            "nodeLabels": {"cloud.example/pool": "a100"},
            "tolerations": [{"key": "reserved", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        }
    }
    placed = dataclasses.replace(_cluster(), workers_assigned=flavor_placement([flavor]))
    pod = worker_pod(placed, 0, "x")
    assert pod["spec"]["nodeSelector"] == {"cloud.example/pool": "a100"}
    assert {"key": "reserved", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod["spec"][
        "tolerations"
    ]
    assert worker_pod(_cluster(), 0, "x")["spec"].get("nodeSelector") is None


# --- reading Kueue ------------------------------------------------------------------------------------


def _wl(*conds: tuple[str, str, str], admission: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "w", "uid": "u", "resourceVersion": "7", "generation": 1},
        "spec": {"queueName": "q", **spec},
        "status": {
            "conditions": [
                {"type": t, "status": s, "reason": r, "message": f"{t} {r}", "lastTransitionTime": "x"}
                for t, s, r in conds
            ],
            **({"admission": admission} if admission else {}),
        },
    }


def test_pending_workload_carries_kueues_reason() -> None:
    st = workload_state(_wl(("QuotaReserved", "False", "Pending")))
    assert not st.admitted and st.pending == Cond("False", "Pending", "QuotaReserved Pending")


def test_admitted_workload_lists_flavors_per_pod_set() -> None:
    admission = {
        "clusterQueue": "cq",
        "podSetAssignments": [
            {"name": "head", "flavors": {"cpu": "default", "memory": "default"}},
            {"name": "workers", "flavors": {"cpu": "gpu-a", "nvidia.com/gpu": "gpu-a"}},
        ],
    }
    st = workload_state(
        _wl(("QuotaReserved", "True", "QuotaReserved"), ("Admitted", "True", "Admitted"), admission=admission)
    )
    assert st.running_allowed and st.cluster_queue == "cq"
    assert st.flavors == {"head": ("default",), "workers": ("gpu-a",)}


def test_requeue_patch_gives_the_quota_back_like_kueues_reconciler() -> None:
    wl = _wl(
        ("QuotaReserved", "True", "QuotaReserved"),
        ("Admitted", "True", "Admitted"),
        ("Evicted", "True", "Preempted"),
    )
    patch = requeue_patch(wl, Cond("True", "Preempted", "by b"), AT)
    assert patch["admission"] is None
    conds = {c["type"]: c for c in patch["conditions"]}
    assert (conds["QuotaReserved"]["status"], conds["QuotaReserved"]["reason"]) == ("False", "Pending")
    assert conds["Admitted"]["status"] == "False"
    assert (conds["Requeued"]["status"], conds["Requeued"]["reason"]) == ("True", "Preempted")
    assert conds["Evicted"]["status"] == "True"  # Kueue resets it when it reserves quota again


def test_finish_patch() -> None:
    patch = finish_patch(_wl(), True, "done", AT)
    (cond,) = patch["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Finished", "True", "Succeeded")


# --- the decision -------------------------------------------------------------------------------------

ADMITTED = workload_state(
    _wl(
        ("QuotaReserved", "True", "QuotaReserved"),
        ("Admitted", "True", "Admitted"),
        admission={"clusterQueue": "cq", "podSetAssignments": []},
    )
)


def seen(**kw: Any) -> QueueSeen:
    base: dict[str, Any] = {"queue": "q", "served": True, "workload": ADMITTED, "wanted_hash": ""}
    return QueueSeen(**{**base, **kw})


@pytest.mark.parametrize(
    ("case", "kw", "action", "hold"),
    [
        ("no label, no workload", {"queue": "", "workload": None}, None, None),
        ("Kueue not installed", {"served": False, "workload": None}, "none", True),
        ("new job", {"workload": None}, "create", True),
        ("admitted", {}, "none", False),
        ("pod sets changed", {"wanted_hash": "other"}, "delete", True),
        ("suspended", {"suspended": True}, "set-active", True),
        ("job finished", {"finished": True}, "finish", False),
    ],
)
def test_decide_queue(case: str, kw: dict[str, Any], action: str | None, hold: bool | None) -> None:
    step = decide_queue(seen(**kw))
    if action is None:
        assert step is None, case
        return
    assert step is not None and (step.action, step.hold) == (action, hold), case


def test_evicted_waits_for_the_pods_then_requeues() -> None:
    evicted = dataclasses.replace(
        ADMITTED, evicted=Cond("True", "Preempted", "preempted by b"), admitted=True
    )
    waiting = decide_queue(seen(workload=evicted, pods_left=True))
    assert waiting is not None and (waiting.action, waiting.hold) == ("none", True)
    assert "preempted by Kueue" in waiting.message
    requeue = decide_queue(seen(workload=evicted, pods_left=False))
    assert requeue is not None and requeue.action == "requeue" and "queued again" in requeue.message
    given_back = dataclasses.replace(
        evicted, quota_reserved=False, admitted=False, pending=Cond("False", "Pending", "no quota")
    )
    after = decide_queue(seen(workload=given_back))
    assert after is not None and (after.action, after.hold) == ("none", True)
    assert "preempted" in after.message and "no quota" in after.message


def test_queue_label_change_is_ignored_while_admitted() -> None:
    step = decide_queue(seen(queue="other"))
    assert step is not None and (step.action, step.hold) == ("none", False)
    pending = dataclasses.replace(ADMITTED, quota_reserved=False, admitted=False)
    moved = decide_queue(seen(queue="other", workload=pending))
    assert moved is not None and moved.action == "set-queue"


# --- whole passes -------------------------------------------------------------------------------------


def kueue_world(served: bool = True) -> World:
    world = World(Settings(kueue_served=served))
    world.kube.objects[("ResourceFlavor", "", "gpu-a")] = {
        "metadata": {"name": "gpu-a"},
        "spec": {"nodeLabels": {"pool": "gpu-a"}, "tolerations": [{"key": "ml", "operator": "Exists"}]},
    }
    world.kube.objects[("WorkloadPriorityClass", "", "low")] = {"metadata": {"name": "low"}, "value": 10}
    return world


def workload_of(world: World) -> dict[str, Any]:
    (wl,) = [o for (k, _, _), o in world.kube.objects.items() if k == "Workload"]
    return wl


def set_conditions(wl: dict[str, Any], *conds: tuple[str, str, str, str]) -> None:
    current = {c["type"]: c for c in (wl.setdefault("status", {}).get("conditions") or [])}
    for t, s, r, m in conds:
        current[t] = {
            "type": t,
            "status": s,
            "reason": r,
            "message": m,
            "lastTransitionTime": "2026-11-29T12:00:00Z",
        }
    wl["status"]["conditions"] = list(current.values())
    wl["metadata"]["resourceVersion"] = str(int(wl["metadata"]["resourceVersion"]) + 1000)


def admit(world: World) -> None:
    """Kueue reserves quota and admits (as its scheduler does)."""
    wl = workload_of(world)
    wl.setdefault("status", {})["admission"] = {
        "clusterQueue": "cq",
        "podSetAssignments": [
            {"name": "head", "flavors": {"cpu": "gpu-a"}, "count": 1},
            {"name": "workers", "flavors": {"cpu": "gpu-a", "nvidia.com/gpu": "gpu-a"}, "count": 2},
        ],
    }
    set_conditions(
        wl,
        ("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
        ("Admitted", "True", "Admitted", "The workload is admitted"),
        ("Evicted", "False", "QuotaReserved", "Previously: preempted"),
    )


def evict(world: World) -> None:
    set_conditions(
        workload_of(world), ("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: b)")
    )


async def test_held_admitted_preempted_requeued_resumed_finished() -> None:
    world = kueue_world()
    labels = {QUEUE_LABEL: "team-a", "kueue.x-k8s.io/priority-class": "low"}
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC, labels=labels)
    uid = world.kube.get(*key)["metadata"]["uid"]

    # held: a Workload, no pods, phase Queued with Kueue's words
    await world.reconcile(key)
    assert world.kube.pods(NS) == []
    wl = workload_of(world)
    assert wl["spec"]["queueName"] == "team-a" and wl["spec"]["priority"] == 10
    assert world.phase(key) == "Queued"
    set_conditions(wl, ("QuotaReserved", "False", "Pending", "couldn't assign flavors: insufficient quota"))
    await world.reconcile(key)
    assert world.phase(key) == "Queued" and world.kube.pods(NS) == []
    cond = world.condition(key, "Admitted")
    assert (cond["status"], cond["reason"]) == ("False", "Pending")
    assert "insufficient quota" in world.kube.status(key)["message"]

    # admitted: the cluster, on the flavor's nodes
    admit(world)
    await world.reconcile(key)
    pods = world.kube.pods(NS)
    assert len(pods) == 3
    assert all(p["spec"]["nodeSelector"] == {"pool": "gpu-a"} for p in pods)
    assert world.condition(key, "Admitted")["status"] == "True"
    assert "Admitted" in world.reasons()
    assert world.kube.status(key)["queue"]["clusterQueue"] == "cq"
    world.kube.run_pods(NS)
    await world.reconcile(key)
    assert world.phase(key) == "Running"
    head = world.head_of(key)
    assert list(head.jobs_) == [submission_id(NS, "ft", uid, 0)]

    # preempted: the job stops, the pods go, then the quota is given back
    evict(world)
    await world.reconcile(key)
    assert world.kube.pods(NS) == []
    assert head.jobs_[submission_id(NS, "ft", uid, 0)].status == JobStatus.STOPPED
    status = world.kube.status(key)
    assert status["phase"] == "Queued" and status["attempt"] == 1 and "preempted" in status["message"]
    await world.reconcile(key)  # the pods are gone: the quota is given back
    wl = workload_of(world)
    assert "admission" not in wl["status"]
    conds = {c["type"]: c for c in wl["status"]["conditions"]}
    assert conds["QuotaReserved"]["status"] == "False" and conds["Requeued"]["status"] == "True"
    assert "Preempted" in world.reasons()
    status = world.kube.status(key)
    assert status["queue"]["preemptions"] == 1 and "queued again" in status["message"]
    await world.reconcile(key)  # waits; nothing given back twice
    assert world.kube.status(key)["queue"]["preemptions"] == 1 and world.kube.pods(NS) == []

    # re-admitted: attempt 1 runs (the train entrypoint resumes from the latest checkpoint)
    admit(world)
    await world.reconcile(key)
    world.kube.run_pods(NS)
    await world.reconcile(key)
    assert world.phase(key) == "Running"
    assert submission_id(NS, "ft", uid, 1) in head.jobs_

    # finished: the Workload is Finished, quota released
    head.set_job(submission_id(NS, "ft", uid, 1), JobStatus.SUCCEEDED)
    await world.reconcile(key)
    assert world.phase(key) == "Succeeded"
    await world.reconcile(key)
    conds = {c["type"]: c for c in workload_of(world)["status"]["conditions"]}
    assert (conds["Finished"]["status"], conds["Finished"]["reason"]) == ("True", "Succeeded")
    assert "FinishedWorkload" in world.reasons()


async def test_label_without_kueue_installed_holds_the_job() -> None:
    world = kueue_world(served=False)
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC, labels={QUEUE_LABEL: "team-a"})
    await world.reconcile(key)
    assert world.kube.pods(NS) == [] and world.phase(key) == "Queued"
    assert world.condition(key, "Admitted")["reason"] == "KueueNotInstalled"
    assert "not served" in world.kube.status(key)["message"]
    assert "restart the operator" in world.kube.status(key)["message"]  # detected at start-up only
    assert not [k for k in world.kube.objects if k[0] == "Workload"]


async def test_job_without_label_is_untouched() -> None:
    world = kueue_world()
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC)
    await world.reconcile(key)
    assert len(world.kube.pods(NS)) == 3
    assert not [k for k in world.kube.objects if k[0] == "Workload"]
    assert world.kube.status(key).get("queue") is None
    assert world.condition(key, "Admitted") == {}


async def test_missing_priority_class_holds_with_a_message() -> None:
    world = kueue_world()
    labels = {QUEUE_LABEL: "team-a", "kueue.x-k8s.io/priority-class": "nope"}
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC, labels=labels)
    await world.reconcile(key)
    assert world.phase(key) == "Queued" and "WorkloadPriorityClass nope" in world.kube.status(key)["message"]
    assert world.kube.pods(NS) == []


async def test_spec_edit_while_queued_replaces_the_workload() -> None:
    world = kueue_world()
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC, labels={QUEUE_LABEL: "team-a"})
    await world.reconcile(key)
    first = workload_of(world)["metadata"]["uid"]
    bigger = {**GPU_SPEC, "workers": {**GPU_SPEC["workers"], "replicas": 4}}
    world.kube.objects[key]["spec"] = bigger
    world.kube.objects[key]["metadata"]["generation"] += 1
    await world.reconcile(key)  # deletes the stale Workload
    assert not [k for k in world.kube.objects if k[0] == "Workload"]
    await world.reconcile(key)  # queues a new one
    wl = workload_of(world)
    assert wl["metadata"]["uid"] != first and wl["spec"]["podSets"][1]["count"] == 4
    assert world.kube.pods(NS) == []


async def test_suspend_deactivates_the_workload() -> None:
    world = kueue_world()
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC, labels={QUEUE_LABEL: "team-a"})
    await world.reconcile(key)
    admit(world)
    await world.reconcile(key)
    world.kube.objects[key]["spec"] = {**GPU_SPEC, "suspend": True}
    await world.reconcile(key)
    wl = workload_of(world)
    assert wl["spec"]["active"] is False
    assert wl["metadata"]["annotations"]["llmray.io/deactivated-by-suspend"] == "true"
    assert world.phase(key) == "Suspended" and world.kube.pods(NS) == []
    set_conditions(wl, ("Evicted", "True", "Deactivated", "The workload is deactivated"))  # Kueue evicts
    await world.reconcile(key)
    wl = workload_of(world)
    assert "admission" not in wl["status"]  # the quota is given back
    assert world.kube.status(key)["queue"]["preemptions"] == 0  # a suspension is no preemption
    assert "Evicted" not in world.reasons() and "Preempted" not in world.reasons()
    world.kube.objects[key]["spec"] = dict(GPU_SPEC)  # resume
    await world.reconcile(key)
    wl = workload_of(world)
    assert (
        wl["spec"]["active"] is True
        and "llmray.io/deactivated-by-suspend" not in wl["metadata"]["annotations"]
    )
    assert world.phase(key) == "Queued"


def test_group_version_used_by_the_crd_is_ours() -> None:
    assert (GROUP, VERSION) == ("llmray.io", "v1alpha1")


def test_machine_queued_phase() -> None:
    from llmray.controllers.machines import TrainingSeen, training_next

    held = training_next(TrainingSeen(phase="Running", queued="preempted by Kueue: x"))
    assert (held.phase, held.message) == ("Queued", "preempted by Kueue: x")
    assert held.cluster is not None and held.cluster[:2] == (False, "Queued")
    suspended = training_next(TrainingSeen(phase="Queued", suspended=True, queued="waiting"))
    assert suspended.phase == "Suspended"  # suspension wins over the queue
    done = training_next(TrainingSeen(phase="Succeeded", queued="waiting"))
    assert done.phase == "Succeeded"


@pytest.mark.parametrize(
    ("case", "workload", "kw", "action", "hold", "reason"),
    [
        (
            "deactivated by an admin: stays so",
            dataclasses.replace(ADMITTED, active=False, quota_reserved=False, admitted=False),
            {},
            "none",
            True,
            "Deactivated",
        ),
        (
            "deactivated for spec.suspend, resumed: reactivated",
            dataclasses.replace(
                ADMITTED, active=False, quota_reserved=False, admitted=False, deactivated_by_suspend=True
            ),
            {},
            "set-active",
            True,
            "Pending",
        ),
        (
            "deactivated, evicted, quota already given back, job suspended",
            dataclasses.replace(
                ADMITTED,
                active=False,
                quota_reserved=False,
                admitted=False,
                evicted=Cond("True", "Deactivated", "The workload is deactivated"),
            ),
            {"suspended": True},
            "none",
            True,
            "Deactivated",
        ),
        (
            "label removed while waiting",
            dataclasses.replace(ADMITTED, quota_reserved=False, admitted=False),
            {"queue": ""},
            "delete",
            False,
            "NotQueued",
        ),
        ("label removed while admitted: kept", ADMITTED, {"queue": ""}, "none", False, "Admitted"),
        (
            "Workload finished under a running job",
            dataclasses.replace(ADMITTED, finished=True),
            {},
            "delete",
            True,
            "Pending",
        ),
        (
            "quota reserved, admission checks pending",
            dataclasses.replace(
                ADMITTED, admitted=False, pending=Cond("False", "UnsatisfiedChecks", "checks")
            ),
            {},
            "none",
            True,
            "UnsatisfiedChecks",
        ),
    ],
)
def test_decide_queue_more(
    case: str, workload: Any, kw: dict[str, Any], action: str, hold: bool, reason: str
) -> None:
    step = decide_queue(seen(workload=workload, **kw))
    assert step is not None and (step.action, step.hold, step.reason) == (action, hold, reason), (case, step)


async def test_operator_restart_adopts_the_workload_it_created() -> None:
    """A new process whose Workload watch has not delivered yet: the create answers AlreadyExists and
    the existing Workload is used (no second one, no error)."""
    world = kueue_world()
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC, labels={QUEUE_LABEL: "team-a"})
    await world.reconcile(key)
    world.deps.store.workloads = {}  # the new process's cache: empty
    restarted = type(world.controllers[KIND])(world.deps)
    await restarted.reconcile(key)
    assert len([k for k in world.kube.objects if k[0] == "Workload"]) == 1
    assert world.condition(key, "Reconciled")["status"] == "True"
    assert world.phase(key) == "Queued"


async def test_pod_change_of_a_running_job_stops_it_and_queues_again() -> None:
    world = kueue_world()
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC, labels={QUEUE_LABEL: "team-a"})
    await world.reconcile(key)
    admit(world)
    await world.reconcile(key)
    world.kube.run_pods(NS)
    await world.reconcile(key)
    assert world.phase(key) == "Running"
    bigger = {
        **GPU_SPEC,
        "workers": {**GPU_SPEC["workers"], "resources": {"cpu": "8", "memory": "8Gi", "gpu": 2}},
    }
    world.kube.objects[key]["spec"] = bigger
    world.kube.objects[key]["metadata"]["generation"] += 1
    await world.reconcile(key)
    assert world.kube.pods(NS) == [] and world.phase(key) == "Queued"
    assert world.kube.status(key)["attempt"] == 1
    await world.reconcile(key)
    wl = workload_of(world)
    req = wl["spec"]["podSets"][1]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert req["nvidia.com/gpu"] == "2" and "status" not in wl


class _Recorder:
    """Stands in for CustomObjectsApi: records (method, args) and answers an empty object."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, method: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((method, args))

            class R:
                data = b'{"metadata": {"name": "x"}}'

            return R()

        return call


async def test_kube_routes_kueue_kinds_to_their_api() -> None:
    from kubernetes import client

    from llmray.kube import Kube

    kube = Kube(client.ApiClient(client.Configuration()), max_workers=1)
    rec = _Recorder()
    kube.custom = rec  # type: ignore[assignment]
    kube.register("Workload", API, "workloads")
    kube.register("ResourceFlavor", API, "resourceflavors", namespaced=False)
    try:
        await kube.create(
            {"apiVersion": API, "kind": "Workload", "metadata": {"name": "w", "namespace": "ns"}}
        )
        await kube.read("ResourceFlavor", "", "gpu")
        await kube.patch("Workload", "ns", "w", {"spec": {"active": False}})
        await kube.patch_status("workloads", "ns", "w", {"admission": None}, resource_version="5")
        assert await kube.delete("Workload", "ns", "w", "uid-1")
    finally:
        kube.close()
    methods = [(m, a[:4]) for m, a in rec.calls]
    assert methods == [
        ("create_namespaced_custom_object", ("kueue.x-k8s.io", "v1beta2", "ns", "workloads")),
        ("get_cluster_custom_object", ("kueue.x-k8s.io", "v1beta2", "resourceflavors", "gpu")),
        ("patch_namespaced_custom_object", ("kueue.x-k8s.io", "v1beta2", "ns", "workloads")),
        ("patch_namespaced_custom_object_status", ("kueue.x-k8s.io", "v1beta2", "ns", "workloads")),
        ("delete_namespaced_custom_object", ("kueue.x-k8s.io", "v1beta2", "ns", "workloads")),
    ]
    status_body = rec.calls[3][1][5]
    assert status_body == {"status": {"admission": None}, "metadata": {"resourceVersion": "5"}}


async def _running(world: World, key: Any) -> None:
    await world.reconcile(key)
    admit(world)
    await world.reconcile(key)
    world.kube.run_pods(NS)
    await world.reconcile(key)
    assert world.phase(key) == "Running"


async def test_workload_deleted_by_an_admin_stops_the_job_and_queues_a_new_one() -> None:
    """Kueue's job reconciler: a running job without a Workload is stopped and a new Workload
    created. The operator's memory of its own earlier write must not stand in for the deleted one."""
    world = kueue_world()
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC, labels={QUEUE_LABEL: "team-a"})
    await _running(world, key)
    first = workload_of(world)["metadata"]
    del world.kube.objects[("Workload", NS, first["name"])]
    await world.reconcile(key)
    assert world.kube.pods(NS) == [] and world.phase(key) == "Queued"
    await world.reconcile(key)
    wl = workload_of(world)
    assert wl["metadata"]["uid"] != first["uid"] and "status" not in wl
    assert world.phase(key) == "Queued" and world.kube.pods(NS) == []


async def test_a_workload_of_that_name_not_owned_by_the_job_is_never_adopted() -> None:
    world = kueue_world()
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC, labels={QUEUE_LABEL: "team-a"})
    uid = world.kube.get(*key)["metadata"]["uid"]
    name = workload_name(KIND, "ft", uid)
    foreign = {
        "metadata": {"name": name, "namespace": NS, "uid": "other", "resourceVersion": "1"},
        "spec": {},
    }
    world.kube.objects[("Workload", NS, name)] = foreign
    admit(world)  # even admitted, it is not this job's
    await world.reconcile(key)
    assert world.kube.pods(NS) == [] and world.phase(key) == "Queued"
    assert "not this job's" in world.kube.status(key)["message"]
    assert "WorkloadNameTaken" in world.reasons() and "CreatedWorkload" not in world.reasons()
    assert workload_of(world)["metadata"]["uid"] == "other"


async def test_a_workload_smaller_than_the_pods_is_replaced_not_run_on() -> None:
    """Pre-created with the job's owner reference, labels and pod-sets annotation, but pod sets of
    1 CPU: admitted, it must not let the operator run 2 GPU workers on it."""
    world = kueue_world()
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC, labels={QUEUE_LABEL: "team-a"})
    uid = world.kube.get(*key)["metadata"]["uid"]
    owner = Owner(KIND, "ft", NS, uid)
    real = build_workload(
        training_cluster(owner, LLMTrainingJobSpec.model_validate(GPU_SPEC)),
        2,
        queue="team-a",
        api_version=API,
    )
    small = dataclasses.replace(_cluster(), owner=owner)
    fake = build_workload(small, 1, queue="team-a", api_version=API)
    for ps in fake["spec"]["podSets"]:
        ps["template"]["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "1"}}
    fake["metadata"]["annotations"] = real["metadata"]["annotations"]  # the hash copied
    fake["metadata"].update(uid="forged", resourceVersion="1")
    world.kube.objects[("Workload", NS, fake["metadata"]["name"])] = fake
    admit(world)
    await world.reconcile(key)
    assert world.kube.pods(NS) == [] and world.phase(key) == "Queued"
    assert "do not match" in world.kube.status(key)["message"]
    await world.reconcile(key)
    wl = workload_of(world)
    assert wl["metadata"]["uid"] != "forged" and wl["spec"]["podSets"] == real["spec"]["podSets"]


async def test_flavor_edit_then_operator_restart_keeps_the_running_pods() -> None:
    """The placement is what the admission resolved, recorded on the Workload: a restarted operator
    does not re-read the (edited) flavor and so does not recreate the running pods."""
    world = kueue_world()
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC, labels={QUEUE_LABEL: "team-a"})
    await _running(world, key)
    before = {p["metadata"]["uid"] for p in world.kube.pods(NS)}
    world.kube.objects[("ResourceFlavor", "", "gpu-a")]["spec"]["nodeLabels"] = {"pool": "moved"}
    restarted = type(world.controllers[KIND])(world.deps)
    await restarted.reconcile(key)
    await restarted.reconcile(key)
    pods = world.kube.pods(NS)
    assert {p["metadata"]["uid"] for p in pods} == before
    assert all(p["spec"]["nodeSelector"] == {"pool": "gpu-a"} for p in pods)
    assert world.phase(key) == "Running"
    # the next admission (after an eviction) reads the flavor as it is then
    evict(world)
    await restarted.reconcile(key)
    await restarted.reconcile(key)
    admit(world)
    reserved = next(c for c in workload_of(world)["status"]["conditions"] if c["type"] == "QuotaReserved")
    reserved["lastTransitionTime"] = "2026-11-29T12:05:00Z"  # Kueue stamps each reservation
    await restarted.reconcile(key)
    assert all(p["spec"]["nodeSelector"] == {"pool": "moved"} for p in world.kube.pods(NS))


def test_recorded_placement_belongs_to_one_admission() -> None:
    from llmray.builders.cluster import Assigned
    from llmray.builders.kueue import placement_annotation, recorded_placement

    head, workers = Assigned((("pool", "a"),)), Assigned((("pool", "a"),), ((("key", "ml"),),))
    wl = placement_annotation("adm-1", head, workers)
    assert recorded_placement(wl, "adm-1") == (head, workers)
    assert recorded_placement(wl, "adm-2") is None
    wl["metadata"]["annotations"]["llmray.io/placement"] = "{not json"
    assert recorded_placement(wl, "adm-1") is None


def _default_queue(world: World) -> None:
    world.kube.objects[("LocalQueue", NS, "default")] = {"metadata": {"name": "default", "namespace": NS}}


async def test_unlabelled_job_uses_the_namespaces_default_local_queue() -> None:
    world = World(Settings(kueue_served=True, kueue_default_queue=True))
    _default_queue(world)
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC)
    await world.reconcile(key)
    assert world.kube.pods(NS) == [] and world.phase(key) == "Queued"
    assert workload_of(world)["spec"]["queueName"] == "default"
    assert world.kube.status(key)["queue"]["name"] == "default"


async def test_label_removed_from_a_waiting_job_moves_it_to_the_default_queue_not_out_of_kueue() -> None:
    world = World(Settings(kueue_served=True, kueue_default_queue=True))
    _default_queue(world)
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC, labels={QUEUE_LABEL: "team-a"})
    await world.reconcile(key)
    del world.kube.objects[key]["metadata"]["labels"][QUEUE_LABEL]
    await world.reconcile(key)
    await world.reconcile(key)
    assert world.kube.pods(NS) == [] and world.phase(key) == "Queued"
    assert workload_of(world)["spec"]["queueName"] == "default"


async def test_without_a_default_queue_an_unlabelled_job_runs_and_no_call_once_started() -> None:
    world = World(Settings(kueue_served=True, kueue_default_queue=True))
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC)
    await world.reconcile(key)
    assert len(world.kube.pods(NS)) == 3
    _default_queue(world)  # created later: a started job is not moved into it
    world.kube.run_pods(NS)
    await world.reconcile(key)
    assert world.phase(key) == "Running" and not [k for k in world.kube.objects if k[0] == "Workload"]


async def test_require_queue_holds_a_job_without_one() -> None:
    world = World(Settings(kueue_served=True, kueue_queue_required=True))
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC)
    await world.reconcile(key)
    assert world.kube.pods(NS) == [] and world.phase(key) == "Queued"
    assert "--kueue-require-queue" in world.kube.status(key)["message"]
    assert world.condition(key, "Admitted")["reason"] == "NoQueue"
    # a waiting job whose label is removed is held too (no run outside the quota)
    key2 = world.kube.apply(KIND, NS, "ft2", GPU_SPEC, labels={QUEUE_LABEL: "team-a"})
    await world.reconcile(key2)
    del world.kube.objects[key2]["metadata"]["labels"][QUEUE_LABEL]
    await world.reconcile(key2)
    assert world.kube.pods(NS) == [] and world.phase(key2) == "Queued"


async def test_a_job_in_the_default_queue_reads_no_local_queue_once_its_workload_is_there() -> None:
    world = World(Settings(kueue_served=True, kueue_default_queue=True))
    _default_queue(world)
    key = world.kube.apply(KIND, NS, "ft", GPU_SPEC)
    await _running(world, key)
    world.kube.calls.clear()
    await world.reconcile(key)  # an idle resync of the running job
    assert ("get", "LocalQueue", "") not in world.kube.calls and world.phase(key) == "Running"
    assert not [c for c in world.kube.calls if c[1] == "Workload"]
