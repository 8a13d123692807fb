"""Pure reconcile decisions: worker plans, head plans, cluster health, conditions, merge patches,
and which model a deployment serves."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llmray.api import LLMDeploymentSpec
from llmray.api.common import ConditionStatus
from llmray.builders.model import latest_export, model_version, resolve_model, serve_model_path
from llmray.builders.observe import ChildView, PodView, owner_key
from llmray.builders.plan import plan_head, plan_workers
from llmray.builders.status import cluster_health, merge_patch, set_condition

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _worker(index: int, *, ready: bool = True, group: str = "gpu", hash: str = "h1", **kw: Any) -> PodView:
    return PodView(
        name=f"w{index}",
        uid=f"uid-{index}",
        node_type="worker",
        group=group,
        index=index,
        template_hash=hash,
        phase="Running" if ready else "Pending",
        ready=ready,
        **kw,
    )


# --- worker plans ----------------------------------------------------------------------------------


def test_scale_up_from_nothing_takes_lowest_slots() -> None:
    plan = plan_workers([], desired=3, group="gpu", template_hash="h1")
    assert plan.create == (0, 1, 2)
    assert plan.delete == ()


def test_converged_is_empty() -> None:
    pods = [_worker(0), _worker(1)]
    assert plan_workers(pods, desired=2, group="gpu", template_hash="h1").empty


def test_replanning_with_the_same_view_is_idempotent() -> None:
    # A restart mid-scale-up sees the pods made so far and re-issues only the rest, with the same slots.
    first = plan_workers([_worker(0)], desired=3, group="gpu", template_hash="h1")
    again = plan_workers([_worker(0)], desired=3, group="gpu", template_hash="h1")
    assert first.create == again.create == (1, 2)


def test_terminating_pods_keep_their_slot_but_do_not_count() -> None:
    pods = [_worker(0, deleting=True), _worker(1)]
    plan = plan_workers(pods, desired=2, group="gpu", template_hash="h1")
    assert plan.create == (2,)
    assert plan.delete == ()


def test_scale_down_removes_not_ready_first_then_newest() -> None:
    pods = [_worker(0), _worker(1, ready=False), _worker(2), _worker(3)]
    plan = plan_workers(pods, desired=2, group="gpu", template_hash="h1")
    assert [p.index for p, _ in plan.delete] == [1, 3]
    assert plan.create == ()


def test_outdated_and_finished_pods_are_replaced() -> None:
    pods = [_worker(0, hash="old"), _worker(1), replace(_worker(2), phase="Failed")]
    plan = plan_workers(pods, desired=3, group="gpu", template_hash="h1")
    assert sorted(p.index for p, _ in plan.delete) == [0, 2]
    assert plan.create == (3, 4)  # old names are still taken until those pods are gone


def test_group_change_replaces_every_worker() -> None:
    plan = plan_workers([_worker(0), _worker(1)], desired=2, group="cpu", template_hash="h1")
    assert len(plan.delete) == 2
    assert plan.create == (2, 3)


def test_head_plan() -> None:
    head = PodView(name="x-head", node_type="head", template_hash="h1", phase="Running", ready=True)
    assert plan_head(None, template_hash="h1").action == "create"
    assert plan_head(head, template_hash="h1").action == "keep"
    assert plan_head(head, template_hash="h2").action == "delete"
    assert plan_head(replace(head, deleting=True), template_hash="h2").action == "wait"
    assert plan_head(replace(head, phase="Failed"), template_hash="h1").action == "delete"


# --- views -----------------------------------------------------------------------------------------


def test_pod_view_reads_scheduling_and_container_trouble() -> None:
    pod = {
        "metadata": {
            "name": "j-worker-gpu-abcde",
            "namespace": "ns",
            "uid": "u1",
            "labels": {
                "llmray.io/kind": "LLMTrainingJob",
                "app.kubernetes.io/instance": "j",
                "ray.io/node-type": "worker",
                "ray.io/group": "gpu",
                "llmray.io/worker-index": "4",
            },
            "annotations": {"llmray.io/template-hash": "h9"},
            "ownerReferences": [{"uid": "owner", "controller": True}],
        },
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/6 nodes are available",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "containerStatuses": [
                {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}
            ],
        },
    }
    view = PodView.of(pod)
    assert (view.index, view.group, view.template_hash, view.owner_uid) == (4, "gpu", "h9", "owner")
    assert view.unschedulable_since == T0
    assert view.waiting_reason == "ImagePullBackOff"
    assert owner_key(pod) == ("LLMTrainingJob", "ns", "j")
    assert ChildView.of(pod).owner_uid == "owner"


# --- health ----------------------------------------------------------------------------------------


def test_cluster_health_progression() -> None:
    head = PodView(name="h", node_type="head", phase="Running", ready=True)
    assert cluster_health(None, [], desired_workers=1, at=T0).reason == "HeadPodNotReady"
    partial = cluster_health(head, [_worker(0), _worker(1, ready=False)], desired_workers=2, at=T0)
    assert (partial.ready, partial.reason, partial.workers_ready) == (False, "WorkersNotReady", 1)
    done = cluster_health(head, [_worker(0), _worker(1)], desired_workers=2, at=T0)
    assert done.ready and done.head_ready and done.workers_ready == 2


def test_serving_cluster_counts_started_pods_whatever_their_proxy() -> None:
    """An LLMDeployment's pods are Ready only while their proxy is: a worker with no replica (no
    proxy) and a head whose Serve is not started yet are still up Ray nodes."""
    head = PodView(name="h", node_type="head", phase="Running", ready=False, started=True)
    idle = PodView(name="w0", node_type="worker", phase="Running", ready=False, started=True)
    booting = PodView(name="w1", node_type="worker", phase="Running", ready=False, started=False)
    serving = cluster_health(head, [idle, booting], desired_workers=2, at=T0, serving=True)
    assert (serving.head_ready, serving.workers_ready, serving.reason) == (True, 1, "WorkersNotReady")
    training = cluster_health(head, [idle, booting], desired_workers=2, at=T0)
    assert (training.head_ready, training.reason) == (False, "HeadPodNotReady")


@pytest.mark.parametrize(
    ("statuses", "ready", "started"),
    [
        ([{"name": "c", "ready": False, "started": True}], False, True),  # kubelet: proxy not ready
        ([{"name": "c", "ready": False, "started": False}], False, False),
        ([{"name": "c", "ready": True}], True, True),  # a simulated kubelet sets no "started"
        (None, True, True),  # no container statuses: Ready stands in
        (None, False, False),
    ],
)
def test_pod_view_started(statuses: list[dict[str, Any]] | None, ready: bool, started: bool) -> None:
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if statuses is not None:
        status["containerStatuses"] = statuses
    view = PodView.of({"metadata": {"name": "p"}, "status": status})
    assert (view.ready, view.started, view.up(True)) == (ready, started, started)


def test_cluster_health_names_what_to_fix() -> None:
    head = PodView(name="h", node_type="head", phase="Running", ready=True)
    stuck = _worker(
        0, ready=False, unschedulable_since=T0, unschedulable_message="0/6 nodes: Insufficient nvidia.com/gpu"
    )
    health = cluster_health(
        head, [stuck], desired_workers=1, at=T0 + timedelta(seconds=42), kind_hint="spec.workers"
    )
    assert health.reason == "Unschedulable"
    assert health.unschedulable_for == 42
    assert "Insufficient nvidia.com/gpu" in health.message and "spec.workers" in health.message
    bad_image = replace(
        head, ready=False, phase="Pending", waiting_reason="ErrImagePull", waiting_message="not found"
    )
    assert cluster_health(bad_image, [], desired_workers=0, at=T0).reason == "ErrImagePull"


# --- conditions and patches --------------------------------------------------------------------------


def test_condition_transition_time_moves_only_on_status_change() -> None:
    conds = set_condition([], type="Ready", status="False", reason="A", message="a", generation=1, at=T0)
    later = T0 + timedelta(minutes=1)
    same = set_condition(conds, type="Ready", status="False", reason="B", message="b", generation=2, at=later)
    assert same[0].last_transition_time == T0 and same[0].reason == "B" and same[0].observed_generation == 2
    flipped = set_condition(
        same, type="Ready", status="True", reason="C", message="c", generation=2, at=later
    )
    assert flipped[0].last_transition_time == later
    other = set_condition(
        flipped, type="Other", status="True", reason="D", message="", generation=2, at=later
    )
    assert [c.type for c in other] == ["Ready", "Other"]
    assert isinstance(other[0], ConditionStatus)


def test_merge_patch() -> None:
    old = {"phase": "Pending", "workers": {"ready": 0, "desired": 2}, "jobId": "x", "conditions": [1]}
    new = {"phase": "Running", "workers": {"ready": 2, "desired": 2}, "conditions": [1]}
    assert merge_patch(old, new) == {"phase": "Running", "workers": {"ready": 2}, "jobId": None}
    assert merge_patch(new, new) == {}
    assert merge_patch({}, {"workers": {"ready": 0}}) == {"workers": {"ready": 0}}


# --- train -> deploy ---------------------------------------------------------------------------------


def _dep(model: dict[str, Any]) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate({"model": model})


def test_resolve_model_from_uri() -> None:
    uri, blocker, _ = resolve_model(_dep({"uri": "hf://a/b"}), None, "")
    assert (uri, blocker) == ("hf://a/b", None)


def test_resolve_model_from_training_job() -> None:
    spec = _dep({"fromTrainingJob": "ft"})
    uri, blocker, _ = resolve_model(spec, None, "")
    assert (
        uri is None and blocker is not None and blocker.reason == "TrainingJobNotFound" and not blocker.fatal
    )
    running = {"status": {"phase": "Running"}, "spec": {"output": {"uri": "pvc://m/ft"}}}
    uri, blocker, _ = resolve_model(spec, running, "")
    assert uri is None and blocker is not None and blocker.reason == "TrainingJobNotSucceeded"
    done = {
        "status": {"phase": "Succeeded", "output": {"uri": "pvc://m/ft/final"}},
        "spec": {"output": {"uri": "pvc://m/ft"}},
    }
    assert resolve_model(spec, done, "")[0] == "pvc://m/ft/final"
    failed = {"status": {"phase": "Failed", "message": "OOM"}}
    uri, blocker, _ = resolve_model(spec, failed, "")
    assert blocker is not None and blocker.fatal and "OOM" in blocker.message
    # retraining keeps serving the previous output
    assert resolve_model(spec, running, "pvc://m/ft/final")[:2] == ("pvc://m/ft/final", None)


def _export(uri: str, version: str = "") -> dict[str, Any]:
    return {"status": {"phase": "Succeeded", "output": {"uri": uri, "version": version}}}


def test_a_model_uri_takes_the_version_of_the_newest_export_there() -> None:
    """A deployment serving a folder directly (spec.model.uri) rolls out what a job exports there."""
    old, new = _export("s3://b/ft", "20261129-100000-aaaa"), _export("s3://b/ft/", "20261129-110000-bbbb")
    elsewhere, unfinished = _export("s3://b/other", "20261129-120000-cccc"), _export("s3://b/ft")
    assert latest_export("s3://b/ft/", [old, elsewhere, new, unfinished]) is new
    assert latest_export("s3://b/ft", [elsewhere, unfinished]) is None
    spec = _dep({"uri": "s3://b/ft"})
    assert model_version(spec, new, "") == "20261129-110000-bbbb"
    assert model_version(spec, None, "20261129-100000-aaaa") == ""  # no job exports there (any more)
    assert model_version(_dep({"fromTrainingJob": "ft"}), _export("s3://b/ft"), "v1") == "v1"


def test_training_job_s3_output_is_served_from_its_uri() -> None:
    spec = _dep({"fromTrainingJob": "ft"})
    done = {"status": {"phase": "Succeeded", "output": {"uri": "s3://models/ft"}}}
    uri, blocker, _ = resolve_model(spec, done, "")
    assert (uri, blocker) == ("s3://models/ft", None)
    assert serve_model_path("s3://models/ft") == "s3://models/ft"  # the replica downloads it
    assert serve_model_path("gs://models/ft") == "gs://models/ft"
    assert serve_model_path("pvc://m/ft") == "/mnt/pvc/m/ft"
    assert serve_model_path("hf://a/b") is None
