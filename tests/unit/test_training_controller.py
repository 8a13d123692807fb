"""Whole reconcile passes of LLMTrainingJobs through the fakes: every phase transition, every reason."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest

from llmray.api.training import KIND, PLURAL
from llmray.controllers.settings import Settings
from llmray.controllers.topology import SharedHead
from llmray.kube import KubeError
from llmray.ray import submission_id
from llmray.ray.jobs import JobStatus

from .fakes import World

pytestmark = pytest.mark.unit

NS = "team"
SPEC: dict[str, Any] = {
    "model": {"uri": "file:///models/tiny"},
    "dataset": {"uri": "file:///data/i.jsonl", "format": "instruction"},
    "method": "lora",
    "workers": {"replicas": 2, "resources": {"cpu": "1", "memory": "2Gi"}},
    "output": {"uri": "file:///out/tiny"},
    "failurePolicy": {"maxRestarts": 1},
}


def spec(**changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(SPEC)
    out.update(changes)
    return out


async def settle(world: World, key: Any) -> float | None:
    """One pass; a TemporaryError (retry) is returned as its delay, not raised."""
    try:
        return await world.reconcile(key)
    except kopf.TemporaryError as exc:
        return exc.delay


async def running_job(world: World, **changes: Any) -> tuple[Any, str]:
    """A job whose cluster is up and whose attempt 0 was submitted (phase Running)."""
    key = world.kube.apply(KIND, NS, "ft", spec(**changes))
    await world.reconcile(key)
    world.kube.run_pods(NS)
    await world.reconcile(key)
    uid = world.kube.get(*key)["metadata"]["uid"]
    return key, uid


def sid(uid: str, attempt: int) -> str:
    return submission_id(NS, "ft", uid, attempt)


async def test_pending_to_provisioning_creates_the_cluster() -> None:
    world = World()
    key = world.kube.apply(KIND, NS, "ft", spec())
    again = await world.reconcile(key)
    kinds = sorted(k for (k, ns, _) in world.kube.objects if ns == NS and k != KIND)
    assert kinds == ["NetworkPolicy", "Pod", "Pod", "Pod", "Secret", "Service"]
    assert world.phase(key) == "Provisioning"
    assert world.condition(key, "RayClusterReady")["reason"] == "HeadPodNotReady"
    assert world.condition(key, "Reconciled")["status"] == "True"
    assert "CreatedRayCluster" in world.reasons()
    assert again is not None and again <= 5.0  # pods come up without events reaching us: look again


async def test_provisioning_to_running_submits_attempt_zero_once() -> None:
    world = World()
    key, uid = await running_job(world)
    status = world.kube.status(key)
    assert status["phase"] == "Running"
    assert status["jobId"] == sid(uid, 0)
    assert world.condition(key, "JobRunning")["status"] == "True"
    head = world.head_of(key)
    assert list(head.jobs_) == [sid(uid, 0)]
    await world.reconcile(key)  # polled again: no second submission
    assert head.calls.count("submit") == 1
    assert world.reasons().count("SubmittedRayJob") == 1


async def test_progress_is_mirrored_from_the_log() -> None:
    world = World()
    key, uid = await running_job(world)
    head = world.head_of(key)
    head.set_job(sid(uid, 0), JobStatus.RUNNING)
    head.logs[sid(uid, 0)] = 'LLMRAY_PROGRESS {"step": 5, "totalSteps": 10, "loss": 1.5, "epoch": 0.5}\n'
    await world.reconcile(key)
    progress = world.kube.status(key)["progress"]
    assert (progress["step"], progress["percent"], progress["loss"]) == (5, 50, "1.5000")


async def test_succeeded_job_reports_the_exported_model_version() -> None:
    world = World()
    key, uid = await running_job(world)
    head = world.head_of(key)
    head.logs[sid(uid, 0)] = (
        'LLMRAY_PROGRESS {"step": 10, "totalSteps": 10, "state": "finished", '
        '"modelVersion": "20261129-170000-abcdef12"}\nshutting down\n'
    )
    head.set_job(sid(uid, 0), JobStatus.SUCCEEDED)
    await world.reconcile(key)
    assert world.kube.status(key)["output"] == {
        "uri": "file:///out/tiny",
        "version": "20261129-170000-abcdef12",
    }


async def test_running_to_succeeded_then_pods_deleted() -> None:
    world = World()
    key, uid = await running_job(world)
    world.head_of(key).set_job(sid(uid, 0), JobStatus.SUCCEEDED)
    await world.reconcile(key)
    status = world.kube.status(key)
    assert status["phase"] == "Succeeded"
    assert status["output"]["uri"] == "file:///out/tiny"
    assert status["output"]["version"] == f"{uid[:8]}-0"  # no version reported: uid + attempt
    assert status["completionTime"]
    assert "JobSucceeded" in world.reasons()
    await world.reconcile(key)  # finished: the Ray pods go (ttlSecondsAfterFinished 0)
    assert world.kube.pods(NS) == []
    assert world.condition(key, "RayClusterReady")["reason"] == "Finished"
    assert world.phase(key) == "Succeeded"


async def test_failed_attempt_restarts_then_fails_after_max_restarts() -> None:
    world = World()
    key, uid = await running_job(world)
    head = world.head_of(key)
    head.set_job(sid(uid, 0), JobStatus.FAILED, "boom")
    await world.reconcile(key)
    status = world.kube.status(key)
    assert (status["phase"], status["attempt"], status["restarts"]) == ("Running", 1, 1)
    assert sid(uid, 1) in head.jobs_
    assert "RestartingRayJob" in world.reasons()
    head.set_job(sid(uid, 1), JobStatus.FAILED, "boom again")
    await world.reconcile(key)
    status = world.kube.status(key)
    assert status["phase"] == "Failed"
    assert world.condition(key, "JobRunning")["reason"] == "JobFailed"
    assert "maxRestarts=1" in status["message"]
    assert "JobFailed" in world.reasons()


async def test_head_loss_counts_as_a_failed_attempt_and_respects_max_restarts() -> None:
    """Issue 11 item 3: a restarted head forgets its jobs; that is not resubmitted forever."""
    world = World()
    key, uid = await running_job(world)
    head = world.head_of(key)
    head.restart()
    await world.reconcile(key)
    status = world.kube.status(key)
    assert (status["attempt"], status["restarts"], status["phase"]) == (1, 1, "Running")
    assert "gone from the Ray head" in status["message"]
    assert list(head.jobs_) == [sid(uid, 1)]  # the next attempt, not attempt 0 again
    head.restart()
    await world.reconcile(key)
    status = world.kube.status(key)
    assert status["phase"] == "Failed"
    assert world.condition(key, "JobRunning")["reason"] == "JobLost"
    assert head.calls.count("submit") == 2
    await world.reconcile(key)  # Failed is final: nothing more is submitted
    assert head.calls.count("submit") == 2


async def test_head_loss_with_no_restarts_allowed_fails_at_once() -> None:
    world = World()
    key, _ = await running_job(world, failurePolicy={"maxRestarts": 0})
    world.head_of(key).restart()
    await world.reconcile(key)
    assert world.phase(key) == "Failed"


async def test_suspend_stops_the_job_and_resume_starts_the_next_attempt() -> None:
    world = World(Settings(topology=SharedHead("http://127.0.0.1:8265", "http://127.0.0.1:8000", "tok")))
    key, uid = await running_job(world)
    head = world.head_of(key)
    world.kube.apply(KIND, NS, "ft", spec(suspend=True))
    await world.reconcile(key)
    status = world.kube.status(key)
    assert status["phase"] == "Suspended"
    assert head.jobs_[sid(uid, 0)].status == JobStatus.STOPPED
    assert (status["attempt"], status["jobId"]) == (1, "")
    assert world.kube.pods(NS) == []
    world.kube.apply(KIND, NS, "ft", spec(suspend=False))
    await world.reconcile(key)
    assert world.phase(key) == "Provisioning"
    world.kube.run_pods(NS)
    await world.reconcile(key)
    assert world.kube.status(key)["jobId"] == sid(uid, 1)
    assert world.phase(key) == "Running"


async def test_shared_head_secrets_carry_its_token() -> None:
    world = World(Settings(topology=SharedHead("http://127.0.0.1:8265", "http://127.0.0.1:8000", "tok")))
    head = world.ray.head("http://127.0.0.1:8265")
    head.token = "tok"  # the head refuses anything else
    _, uid = await running_job(world)
    assert list(head.jobs_) == [sid(uid, 0)]


async def test_unschedulable_past_timeout_fails_and_a_spec_change_retries() -> None:
    world = World(Settings(unschedulable_timeout=60))
    key = world.kube.apply(KIND, NS, "ft", spec())
    await world.reconcile(key)
    long_ago = (datetime.now(UTC) - timedelta(seconds=120)).isoformat()
    head_pod = "ft-head"
    world.kube.set_pod(
        NS,
        head_pod,
        phase="Pending",
        ready=False,
        conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/4 nodes",
             "lastTransitionTime": long_ago},
        ],
    )  # fmt: skip
    await world.reconcile(key)
    assert world.phase(key) == "Failed"
    assert world.condition(key, "RayClusterReady")["reason"] == "Unschedulable"
    assert "Unschedulable" in world.reasons()
    await world.reconcile(key)  # stays Failed, pods deleted
    assert world.phase(key) == "Failed" and world.kube.pods(NS) == []
    world.kube.apply(
        KIND, NS, "ft", spec(workers={"replicas": 1, "resources": {"cpu": "1", "memory": "1Gi"}})
    )
    await world.reconcile(key)
    status = world.kube.status(key)
    assert status["phase"] == "Provisioning"
    assert "completionTime" not in status


async def test_invalid_spec_fails_with_the_field_named() -> None:
    world = World()
    key = world.kube.apply(KIND, NS, "ft", spec(workers={"replicas": -3}))
    await world.reconcile(key)
    assert world.phase(key) == "Failed"
    cond = world.condition(key, "RayClusterReady")
    assert cond["reason"] == "InvalidSpec" and "spec.workers" in cond["message"]
    assert not world.kube.pods(NS)


async def test_missing_model_secret_holds_it_pending() -> None:
    world = World()
    key = world.kube.apply(
        KIND, NS, "ft", spec(model={"uri": "hf://org/m", "secretRef": {"name": "hf", "key": "token"}})
    )
    await world.reconcile(key)
    assert world.phase(key) == "Pending"
    cond = world.condition(key, "RayClusterReady")
    assert cond["reason"] == "SecretNotFound" and "kubectl create secret generic hf" in cond["message"]
    assert not world.kube.pods(NS)


async def test_missing_object_storage_secret_key_holds_it_pending() -> None:
    world = World()
    key = world.kube.apply(
        KIND, NS, "ft", spec(output={"uri": "s3://b/out"}, objectStorage={"secretRef": {"name": "s3"}})
    )
    await world.reconcile(key)
    assert world.phase(key) == "Pending"
    cond = world.condition(key, "RayClusterReady")
    assert cond["reason"] == "SecretNotFound" and "spec.objectStorage.secretRef" in cond["message"]
    assert "--from-literal=AWS_ACCESS_KEY_ID=" in cond["message"]
    assert not world.kube.pods(NS)


async def test_name_conflict_with_a_foreign_child_fails() -> None:
    world = World()
    await world.kube.create(
        {
            "kind": "Service",
            "metadata": {"name": "ft-head", "namespace": NS, "ownerReferences": []},
            "spec": {},
        }
    )
    key = world.kube.apply(KIND, NS, "ft", spec())
    await world.reconcile(key)
    assert world.phase(key) == "Failed"
    assert world.condition(key, "RayClusterReady")["reason"] == "NameConflict"


@pytest.mark.parametrize(
    ("error", "reason", "raised"),
    [
        (KubeError(403, "Forbidden", "pods is forbidden", "create", "pod"), "Forbidden", RuntimeError),
        (KubeError(422, "Invalid", "bad pod", "create", "pod"), "KubernetesAPIError", RuntimeError),
        (KubeError(500, "InternalError", "etcd", "create", "pod"), "Retrying", kopf.TemporaryError),
    ],
)
async def test_kubernetes_errors_land_in_the_reconciled_condition(
    error: KubeError, reason: str, raised: type[Exception]
) -> None:
    world = World()
    world.kube.errors[("create", "Pod")] = error
    key = world.kube.apply(KIND, NS, "ft", spec())
    with pytest.raises(raised):
        await world.reconcile(key)
    assert world.condition(key, "Reconciled")["reason"] == reason
    if reason != "Retrying":
        assert reason in world.reasons()  # a Warning event for what a human must fix


async def test_status_conflict_is_retried_on_a_fresh_view() -> None:
    world = World()
    key = world.kube.apply(KIND, NS, "ft", spec())
    world.kube.errors[("patch_status", KIND)] = KubeError(409, "Conflict", "modified", "patch", "ft")
    with pytest.raises(kopf.TemporaryError):
        await world.reconcile(key)
    del world.kube.errors[("patch_status", KIND)]
    await world.reconcile(key)
    assert world.phase(key) == "Provisioning"


async def test_stuck_container_is_reported() -> None:
    world = World()
    key = world.kube.apply(KIND, NS, "ft", spec())
    await world.reconcile(key)
    world.kube.set_pod(
        NS, "ft-head", phase="Pending", ready=False,
        containerStatuses=[{"state": {"waiting": {"reason": "ErrImagePull", "message": "no such image"}}}],
    )  # fmt: skip
    await world.reconcile(key)
    assert world.phase(key) == "Provisioning"
    assert world.condition(key, "RayClusterReady")["reason"] == "ErrImagePull"
    assert "ErrImagePull" in world.reasons()


async def test_unreachable_head_is_reported_and_retried() -> None:
    world = World()
    key, _ = await running_job(world)
    world.head_of(key).down = True
    again = await world.reconcile(key)
    cond = world.condition(key, "JobRunning")
    assert (cond["status"], cond["reason"]) == ("Unknown", "RayHeadUnavailable")
    assert world.phase(key) == "Running"
    assert "cannot reach the Ray head" in world.kube.status(key)["message"]
    assert again is not None and again <= 10.0


async def test_refused_token_drops_the_client() -> None:
    world = World()
    key, _ = await running_job(world)
    world.head_of(key).token = "rotated"
    await world.reconcile(key)
    assert world.condition(key, "JobRunning")["reason"] == "RayAPIError"
    assert key in world.ray.forgotten  # the pooled client is dropped on 401/403: the next pass reconnects


async def test_deleted_resource_stops_its_job_on_a_shared_head() -> None:
    world = World(Settings(topology=SharedHead("http://127.0.0.1:8265", "http://127.0.0.1:8000")))
    key, uid = await running_job(world)
    world.kube.remove(key)
    assert await world.reconcile(key) is None
    await world.controllers[KIND].drain()
    assert world.head_of(key).jobs_[sid(uid, 0)].status == JobStatus.STOPPED


async def test_ray_gate_full_skips_ray_but_not_kubernetes_work() -> None:
    world = World(ray_slots=1)
    key, _ = await running_job(world)
    gate = world.deps.ray_gate
    assert gate is not None and gate.try_acquire()  # a slow head holds the only slot
    world.kube.remove(("Pod", NS, "ft-worker-0"))
    calls = len(world.head_of(key).calls)
    again = await world.reconcile(key)
    assert any(o["metadata"]["name"].startswith("ft-worker") for o in world.kube.pods(NS))
    assert len(world.head_of(key).calls) == calls  # Ray skipped this pass
    assert again is not None and again <= 1.0


async def set_status(world: World, key: Any, **fields: Any) -> None:
    """Write status fields as another pass would have (e.g. move a timestamp into the past)."""
    await world.kube.patch_status(PLURAL, NS, key[2], fields)


def ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


async def test_backoff_waits_before_each_restart_and_doubles() -> None:
    world = World()
    key, uid = await running_job(world, failurePolicy={"maxRestarts": 2, "backoffSeconds": 30})
    head = world.head_of(key)
    head.set_job(sid(uid, 0), JobStatus.FAILED, "boom")
    again = await world.reconcile(key)
    status = world.kube.status(key)
    assert (status["phase"], status["attempt"], status["restarts"], status["jobId"]) == ("Running", 1, 1, "")
    assert "(backoff 30s)" in status["message"] and status["nextAttemptAt"]
    first = status["message"]
    assert world.condition(key, "JobRunning")["reason"] == "BackingOff"
    assert again is not None and 25 <= again <= 30  # woken when the backoff ends
    assert sid(uid, 1) not in head.jobs_  # nothing submitted while backing off
    again = await world.reconcile(key)
    assert sid(uid, 1) not in head.jobs_
    assert "(backoff 30s" in world.kube.status(key)["message"]
    assert "restarting at " in world.kube.status(key)["message"] and "restarting at " in first
    assert again is not None and again <= 30
    await set_status(world, key, nextAttemptAt=ago(1))  # the backoff is over
    await world.reconcile(key)
    status = world.kube.status(key)
    assert (status["jobId"], status.get("nextAttemptAt")) == (sid(uid, 1), None)
    assert head.calls.count("submit") == 2
    head.set_job(sid(uid, 1), JobStatus.FAILED, "boom again")
    await world.reconcile(key)
    assert "(backoff 60s)" in world.kube.status(key)["message"]  # exponential: 30s x 2


async def test_no_backoff_resubmits_at_once() -> None:
    world = World()
    key, uid = await running_job(world)
    world.head_of(key).set_job(sid(uid, 0), JobStatus.FAILED, "boom")
    await world.reconcile(key)
    status = world.kube.status(key)
    assert status["jobId"] == sid(uid, 1) and "nextAttemptAt" not in status


async def test_active_deadline_fails_the_job_stops_it_and_deletes_the_pods() -> None:
    world = World(Settings(topology=SharedHead("http://127.0.0.1:8265", "http://127.0.0.1:8000", "tok")))
    key, uid = await running_job(world, activeDeadlineSeconds=600)
    head = world.head_of(key)
    head.set_job(sid(uid, 0), JobStatus.RUNNING)
    again = await world.reconcile(key)
    assert world.phase(key) == "Running"
    assert again is not None  # polled; the deadline is 10 minutes away
    await set_status(world, key, startTime=ago(601))
    await world.reconcile(key)
    status = world.kube.status(key)
    assert status["phase"] == "Failed" and status["completionTime"]
    assert "activeDeadlineSeconds (600s" in status["message"]
    assert world.condition(key, "RayClusterReady")["reason"] == "DeadlineExceeded"
    assert world.condition(key, "JobRunning")["reason"] == "StoppedAtDeadline"
    assert head.jobs_[sid(uid, 0)].status == JobStatus.STOPPED
    assert "DeadlineExceeded" in world.reasons()
    await world.reconcile(key)  # finished: cleaned up as on any failure, the cause kept
    assert world.kube.pods(NS) == [] and world.phase(key) == "Failed"
    assert world.condition(key, "RayClusterReady")["reason"] == "DeadlineExceeded"


async def test_active_deadline_counts_across_restarts_and_backoff() -> None:
    world = World()
    spec_ = {"activeDeadlineSeconds": 100, "failurePolicy": {"maxRestarts": 3, "backoffSeconds": 10}}
    key, uid = await running_job(world, **spec_)
    world.head_of(key).set_job(sid(uid, 0), JobStatus.FAILED, "boom")
    await world.reconcile(key)
    assert world.condition(key, "JobRunning")["reason"] == "BackingOff"
    await set_status(world, key, startTime=ago(101))  # still backing off, but out of time
    await world.reconcile(key)
    assert world.phase(key) == "Failed"
    assert world.condition(key, "RayClusterReady")["reason"] == "DeadlineExceeded"
    assert world.head_of(key).calls.count("submit") == 1  # the backed-off attempt never ran


async def test_suspension_stops_the_deadline_clock() -> None:
    world = World(Settings(topology=SharedHead("http://127.0.0.1:8265", "http://127.0.0.1:8000", "tok")))
    key, uid = await running_job(world, activeDeadlineSeconds=60)
    await set_status(world, key, startTime=ago(59))
    world.kube.apply(KIND, NS, "ft", spec(activeDeadlineSeconds=60, suspend=True))
    await world.reconcile(key)
    assert world.phase(key) == "Suspended" and "startTime" not in world.kube.status(key)
    world.kube.apply(KIND, NS, "ft", spec(activeDeadlineSeconds=60, suspend=False))
    await world.reconcile(key)
    world.kube.run_pods(NS)
    await world.reconcile(key)
    status = world.kube.status(key)
    assert status["phase"] == "Running" and status["jobId"] == sid(uid, 1)  # a fresh minute
