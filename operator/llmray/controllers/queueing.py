"""Kueue admission of an LLMTrainingJob: what to do with its Workload, and whether the job is held.

Pure (no I/O): :func:`decide_queue` takes what one pass saw (the queue label, the job's phase,
its Workload as :class:`~llmray.builders.kueue.WorkloadState`, whether Ray pods are left) and
returns a :class:`QueueStep`. The training controller applies it (create / delete / patch the
Workload, or its status) and the state machine turns ``hold`` into phase ``Queued``.

Learnt from Kueue's job reconciler (``pkg/controller/jobframework/reconciler.go``): a job runs only
while its Workload is admitted; an evicted one is stopped and, once its pods are gone, gives its
quota back (``QuotaReserved`` False, ``admission`` cleared, ``Requeued``), so Kueue queues it
again; a finished job marks its Workload ``Finished``; a Workload that no longer matches the job
is replaced. The queue label may change only while the job is not admitted (Kueue's webhooks
refuse the change for a running job; here the admitted Workload's queue is kept, see README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmray.builders.kueue import Cond, WorkloadState

QueueAction = Literal["none", "create", "delete", "set-queue", "set-active", "requeue", "finish"]

R_ADMITTED = "Admitted"
R_NOT_INSTALLED = "KueueNotInstalled"
R_DEACTIVATED = "Deactivated"
COND_ADMITTED = "Admitted"


@dataclass(frozen=True)
class QueueSeen:
    """What a pass observed about a queue-labelled job (or one that still has a Workload)."""

    queue: str
    """The ``kueue.x-k8s.io/queue-name`` label ("" when absent)."""
    served: bool
    """Kueue's Workload API is served."""
    workload: WorkloadState | None
    wanted_hash: str
    """Hash of the pod sets the spec asks for now."""
    wanted_quota: str = ""
    """``quota_fingerprint`` of those pod sets ("" : not checked)."""
    finished: bool = False
    """The job is Succeeded or Failed (and not starting over)."""
    succeeded: bool = False
    suspended: bool = False
    """``spec.suspend``: the Workload is deactivated, Kueue takes its quota back."""
    pods_left: bool = False
    """Ray pods of the job still exist (an evicted job gives its quota back once they are gone)."""


@dataclass(frozen=True)
class QueueStep:
    """What to do with the Workload, and what the job's status says."""

    action: QueueAction
    hold: bool
    """The job may not have Ray pods now (phase Queued)."""
    reason: str = ""
    message: str = ""
    admitted: bool = False
    evicted: Cond | None = None


def _evicted_message(ev: Cond) -> str:
    what = "preempted" if ev.reason == "Preempted" else f"evicted ({ev.reason})"
    return f"{what} by Kueue: {ev.message}"


def decide_queue(s: QueueSeen) -> QueueStep | None:
    """The Workload step of one pass; None: Kueue is not involved (no label, no Workload)."""
    wl = s.workload
    if not s.queue and wl is None:
        return None
    if s.finished:
        if wl is not None and not wl.finished:
            return QueueStep("finish", hold=False, reason="Finished", message="job finished: quota released")
        return QueueStep("none", hold=False, reason="Finished", message="job finished: quota released")
    if not s.served:
        return QueueStep(
            "none",
            hold=True,
            reason=R_NOT_INSTALLED,
            message=f"label kueue.x-k8s.io/queue-name={s.queue} is set but Kueue's Workload API is not "
            "served in this cluster (checked when the operator starts): install Kueue and restart the "
            "operator, or remove the label to run without a queue",
        )
    if wl is None:
        return QueueStep(
            "create",
            hold=True,
            reason="Pending",
            message=f"waiting for Kueue to admit it from LocalQueue {s.queue}",
        )
    holding_quota = wl.quota_reserved
    if not s.queue and not holding_quota:
        # The label was removed while the job waited: no queue any more, it runs as any other job.
        return QueueStep("delete", hold=False, reason="NotQueued", message="queue label removed")
    wrong_size = bool(s.wanted_quota) and wl.quota != s.wanted_quota
    if wl.finished or wl.pod_sets_hash != s.wanted_hash or wrong_size:
        why = "its Workload finished" if wl.finished else "its pods changed"
        if wrong_size and wl.pod_sets_hash == s.wanted_hash:
            why = "its Workload's pod sets do not match the job's pods"
        return QueueStep(
            "delete",
            hold=True,
            reason="Pending",
            message=f"{why}: queueing a new Workload (Ray pods removed)",
        )
    if (s.suspended and wl.active) or (not s.suspended and not wl.active and wl.deactivated_by_suspend):
        # spec.suspend deactivates the Workload (Kueue evicts it and frees its quota); resuming
        # activates it again (only one the operator deactivated: an admin's deactivation stands),
        # and the job waits for a new admission.
        return QueueStep(
            "set-active", hold=True, reason="Pending", message="updating the Workload's spec.active"
        )
    if s.queue and wl.queue != s.queue and not holding_quota:
        return QueueStep("set-queue", hold=True, reason="Pending", message=f"moving to LocalQueue {s.queue}")
    if wl.evicted is not None:
        ev = wl.evicted
        if holding_quota:
            if s.pods_left:
                stopping = f"{_evicted_message(ev)}; stopping the Ray job"
                return QueueStep("none", hold=True, reason=ev.reason, message=stopping, evicted=ev)
            again = f"{_evicted_message(ev)}; queued again, resumes from the latest checkpoint when admitted"
            return QueueStep("requeue", hold=True, reason=ev.reason, message=again, evicted=ev)
    if not wl.active:
        return QueueStep(
            "none", hold=True, reason=R_DEACTIVATED,
            message=f"Workload {wl.name} is deactivated (spec.active false): it waits until it is active",
        )  # fmt: skip
    if wl.running_allowed:
        return QueueStep(
            "none", hold=False, reason=R_ADMITTED, message=f"admitted by ClusterQueue {wl.cluster_queue}",
            admitted=True,
        )  # fmt: skip
    pending = wl.pending or Cond("False", "Pending", "waiting for Kueue")
    if wl.evicted is not None and not holding_quota:
        # Quota already given back after an eviction: waiting again; keep saying why.
        return QueueStep(
            "none", hold=True, reason=pending.reason or "Pending",
            message=f"{_evicted_message(wl.evicted)}; queued again: {pending.message}",
        )  # fmt: skip
    return QueueStep("none", hold=True, reason=pending.reason or "Pending", message=pending.message)
