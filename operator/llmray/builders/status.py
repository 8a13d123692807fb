"""Pure status logic: the Ray cluster's condition, phases, condition bookkeeping, merge patches.

Conditions follow the Kubernetes API conventions; ``lastTransitionTime`` only moves when the
condition's status flips, so recomputing an unchanged world yields an identical status and no
write (the operator patches status only when it changed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llmray.api.common import ConditionStatus

from .observe import PodView

# Condition types.
COND_HEAD_READY = "HeadPodReady"
COND_CLUSTER_READY = "RayClusterReady"
COND_RECONCILED = "Reconciled"
COND_MODEL_RESOLVED = "ModelResolved"

# Reasons (CamelCase, machine-readable).
R_CLUSTER_READY = "ClusterReady"
R_HEAD_NOT_READY = "HeadPodNotReady"
R_WORKERS_NOT_READY = "WorkersNotReady"
R_UNSCHEDULABLE = "Unschedulable"
R_SUSPENDED = "Suspended"
R_FINISHED = "Finished"
R_SECRET_NOT_FOUND = "SecretNotFound"
R_NAME_CONFLICT = "NameConflict"
R_INVALID_SPEC = "InvalidSpec"
R_FORBIDDEN = "Forbidden"
R_API_ERROR = "KubernetesAPIError"
R_RECONCILED = "Reconciled"
R_TRAINING_JOB_NOT_FOUND = "TrainingJobNotFound"
R_TRAINING_JOB_NOT_SUCCEEDED = "TrainingJobNotSucceeded"
R_TRAINING_JOB_FAILED = "TrainingJobFailed"
R_MODEL_RESOLVED = "ModelResolved"


@dataclass(frozen=True)
class Blocker:
    """Something that stops a reconcile pass until the user (or time) fixes it."""

    reason: str
    message: str
    fatal: bool = False
    """True: phase Failed (the user must change something); False: still waiting (Pending)."""


def now() -> datetime:
    """Current time as the API server writes it (UTC, whole seconds)."""
    return datetime.now(UTC).replace(microsecond=0)


def set_condition(
    conditions: Sequence[ConditionStatus],
    *,
    type: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    at: datetime,
) -> list[ConditionStatus]:
    """``conditions`` with ``type`` set; its transition time changes only when ``status`` does."""
    previous = next((cond for cond in conditions if cond.type == type), None)
    unchanged = previous is not None and previous.status == status and previous.last_transition_time
    updated = ConditionStatus(
        type=type,
        status=status,  # type: ignore[arg-type]
        reason=reason,
        message=message,
        last_transition_time=previous.last_transition_time if unchanged and previous else at,
        observed_generation=generation,
    )
    if previous is None:
        return [*conditions, updated]
    return [updated if cond.type == type else cond for cond in conditions]


def get_condition(conditions: Sequence[ConditionStatus], type: str) -> ConditionStatus | None:
    """The condition of ``type``, if set."""
    return next((c for c in conditions if c.type == type), None)


@dataclass(frozen=True)
class ClusterHealth:
    """The Ray cluster's condition as computed from its pods."""

    ready: bool
    head_ready: bool
    workers_ready: int
    workers_desired: int
    reason: str
    message: str
    unschedulable_for: float = 0.0
    """Seconds the longest-unschedulable pod has waited (0 when none is)."""


def cluster_health(
    head: PodView | None,
    workers: Sequence[PodView],
    *,
    desired_workers: int,
    at: datetime,
    kind_hint: str = "spec.workers",
    serving: bool = False,
) -> ClusterHealth:
    """Whether head and workers are Running and Ready, and if not, the most useful reason why.

    Order of reasons: a stuck container (bad image, missing Secret key) or an unschedulable pod
    say what the user must fix; "not ready yet" is only progress. ``serving`` (an LLMDeployment):
    pods are Ready only while their Serve proxy is, so a Ray node counts as up once started.
    """
    live_workers = [p for p in workers if not p.deleting]
    workers_ready = sum(1 for p in live_workers if p.up(serving))
    head_ready = head is not None and head.up(serving)
    pods = ([head] if head is not None else []) + live_workers
    stuck = next((p for p in pods if p.waiting_reason), None)
    unschedulable = [p for p in pods if p.unschedulable_since is not None and not p.deleting]
    longest = 0.0
    if unschedulable:
        oldest = min(p.unschedulable_since for p in unschedulable if p.unschedulable_since is not None)
        longest = max(0.0, (at - oldest).total_seconds())

    def health(ready: bool, reason: str, message: str) -> ClusterHealth:
        return ClusterHealth(
            ready=ready,
            head_ready=head_ready,
            workers_ready=workers_ready,
            workers_desired=desired_workers,
            reason=reason,
            message=message,
            unschedulable_for=longest,
        )

    if stuck is not None:
        detail = stuck.waiting_message or "the container cannot start"
        return health(
            False,
            stuck.waiting_reason,
            f"pod {stuck.name}: {stuck.waiting_reason}: {detail}; check spec.image and the Secrets "
            "the resource references",
        )
    if unschedulable:
        # No durations in the message: it must not change from pass to pass (that would rewrite
        # the status every time); the condition's lastTransitionTime says since when.
        pod = unschedulable[0]
        where = "spec.head" if pod.node_type == "head" else kind_hint
        if "persistentvolumeclaim" in pod.unschedulable_message.lower():
            hint = "create the PersistentVolumeClaims that the spec's pvc:// URIs name"
        else:
            hint = f"check {where}.resources, nodeSelector, tolerations and affinity against your nodes"
        return health(
            False,
            R_UNSCHEDULABLE,
            f"pod {pod.name} cannot be scheduled: {pod.unschedulable_message.strip()}; {hint}",
        )
    if not head_ready:
        state = "missing" if head is None else f"{head.phase.lower()}, not ready"
        return health(False, R_HEAD_NOT_READY, f"waiting for the Ray head pod ({state})")
    if workers_ready < desired_workers:
        return health(False, R_WORKERS_NOT_READY, f"{workers_ready}/{desired_workers} Ray worker pods ready")
    return health(True, R_CLUSTER_READY, f"Ray head and {workers_ready}/{desired_workers} worker pods ready")


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch turning ``old`` into ``new`` (empty when they are equal)."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif key not in old or before != value:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch
