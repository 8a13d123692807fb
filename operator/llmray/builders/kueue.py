"""Kueue: the Workload an LLMTrainingJob queues with, and what Kueue's answer means (pure).

A job labelled ``kueue.x-k8s.io/queue-name`` is represented in Kueue by one ``Workload`` the
operator creates (owned by the job, garbage-collected with it). Its two pod sets are the Ray
cluster the operator would build -- ``head`` (1 pod) and ``workers`` (``spec.workers.replicas``
pods) -- with the real pods' containers, requests, node selector, affinity and tolerations, so
Kueue admits the whole cluster or nothing. Only cpu, memory and ``nvidia.com/gpu`` are accounted:
the pods' ephemeral-storage request is left out so ClusterQueues need not cover it.

The conditions and fields read and written here are Kueue's own (``apis/kueue/v1beta2``,
``pkg/workload``): ``QuotaReserved``, ``Admitted``, ``Evicted``, ``Requeued``, ``Finished``,
``status.admission.podSetAssignments[].flavors``. Both served versions (v1beta1, v1beta2) share
them, so :func:`workload_state` reads either.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubernetes.utils import parse_quantity

from .cluster import GPU_RESOURCE, Assigned, ClusterSpec, head_pod, worker_pod
from .common import metadata, stable_hash

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DEFAULT_LOCAL_QUEUE = "default"
"""Kueue's ``constants.DefaultLocalQueueName`` (LocalQueueDefaulting)."""
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
DEFAULT_API = "kueue.x-k8s.io/v1beta2"
POD_SET_HEAD = "head"
POD_SET_WORKERS = "workers"
ANNOTATION_POD_SETS_HASH = "llmray.io/pod-sets-hash"
ANNOTATION_PLACEMENT = "llmray.io/placement"
"""On an admitted Workload: the node selector and tolerations its flavors gave the pods, with the
admission they belong to (see :func:`placement_annotation`)."""
ANNOTATION_SUSPENDED = "llmray.io/deactivated-by-suspend"
"""On a Workload the operator deactivated for ``spec.suspend`` (it reactivates only those; one an
admin deactivated stays so)."""
ACCOUNTED = ("cpu", "memory", GPU_RESOURCE)
"""Resources a Workload asks quota for."""

WL_ADMITTED = "Admitted"
WL_QUOTA_RESERVED = "QuotaReserved"
WL_EVICTED = "Evicted"
WL_REQUEUED = "Requeued"
WL_FINISHED = "Finished"
REQUEUED_REASONS = frozenset({"Preempted", "NodeFailures"})
"""Eviction reasons after which Kueue's own job reconciler sets ``Requeued`` True."""


def workload_name(kind: str, name: str, uid: str) -> str:
    """``<kind>-<name>-<5 hex of uid>`` (at most 253 characters): a recreated job of the same name
    gets a new Workload, never the old one awaiting garbage collection."""
    prefix = f"{kind.lower()}-{name}"[:246]
    return f"{prefix}-{stable_hash(uid)[:5]}"


def _pod_set_template(pod: dict[str, Any]) -> dict[str, Any]:
    """A pod as a Workload pod-set template: the operator's labels, the full spec, and requests
    (= limits) of only the accounted resources."""
    spec = copy.deepcopy(pod["spec"])
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        container["resources"] = {
            part: {k: v for k, v in (resources.get(part) or {}).items() if k in ACCOUNTED}
            for part in ("requests", "limits")
            if resources.get(part)
        }
    return {"metadata": {"labels": dict(pod["metadata"].get("labels") or {})}, "spec": spec}


def pod_sets(cluster: ClusterSpec, workers: int) -> list[dict[str, Any]]:
    """The Workload's pod sets: ``head`` x1 and ``workers`` x ``workers`` (template hash-free)."""
    plain = dataclasses.replace(cluster, head_assigned=None, workers_assigned=None)
    head = head_pod(plain, "")
    worker = worker_pod(plain, 0, "")
    return [
        {"name": POD_SET_HEAD, "count": 1, "template": _pod_set_template(head)},
        {"name": POD_SET_WORKERS, "count": workers, "template": _pod_set_template(worker)},
    ]


def build_workload(
    cluster: ClusterSpec,
    workers: int,
    *,
    queue: str,
    api_version: str,
    priority_class: str = "",
    priority: int | None = None,
    active: bool = True,
) -> dict[str, Any]:
    """The Workload of ``cluster`` on LocalQueue ``queue`` (controller-owned by the job).

    ``priority_class``: a WorkloadPriorityClass (label ``kueue.x-k8s.io/priority-class``) whose
    ``value`` is ``priority`` (Kueue's job integrations copy it in at creation).
    """
    owner = cluster.owner
    sets = pod_sets(cluster, workers)
    meta = metadata(owner, workload_name(owner.kind, owner.name, owner.uid), "workload")
    meta["annotations"] = {ANNOTATION_POD_SETS_HASH: stable_hash(sets)}
    spec: dict[str, Any] = {"podSets": sets, "queueName": queue, "active": active}
    if priority_class:
        spec["priorityClassRef"] = {
            "group": "kueue.x-k8s.io",
            "kind": "WorkloadPriorityClass",
            "name": priority_class,
        }
        if priority is not None:
            spec["priority"] = priority
    return {"apiVersion": api_version, "kind": "Workload", "metadata": meta, "spec": spec}


def active_patch(active: bool) -> dict[str, Any]:
    """(De)activate a Workload for ``spec.suspend``, remembering that the operator did it."""
    return {
        "metadata": {"annotations": {ANNOTATION_SUSPENDED: None if active else "true"}},
        "spec": {"active": active},
    }


def _quantity(value: Any) -> str:
    try:
        return str(parse_quantity(value))
    except (ValueError, TypeError):
        return f"?{value}"


def quota_fingerprint(sets: list[Any]) -> str:
    """What Kueue charges quota for, read from pod sets as stored: each set's name, count, node
    selector and its containers' accounted requests and limits (quantities normalised).

    The pod-sets annotation is only a label someone wrote; this is what Kueue admitted. A Workload
    whose fingerprint differs from the pods the operator would run is replaced, never run on: one
    pre-created with the job's owner reference and a copied annotation, but small pod sets, would
    otherwise admit the whole cluster on a fraction of its quota.
    """
    out = []
    for ps in sets:
        ps = ps if isinstance(ps, dict) else {}
        spec = (ps.get("template") or {}).get("spec") or {}
        containers = []
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            res = (c or {}).get("resources") or {}
            containers.append(
                {
                    part: sorted(
                        (k, _quantity(v)) for k, v in (res.get(part) or {}).items() if k in ACCOUNTED
                    )
                    for part in ("requests", "limits")
                }
            )
        out.append(
            [ps.get("name"), ps.get("count"), sorted((spec.get("nodeSelector") or {}).items()), containers]
        )
    return stable_hash(out)


def pod_sets_hash(workload: dict[str, Any]) -> str:
    return str(((workload.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_POD_SETS_HASH, ""))


def controller_uid(obj: dict[str, Any]) -> str:
    """The uid of ``obj``'s controller ownerReference ("" when none): whose Workload it is."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return str(next((r.get("uid") for r in refs if r.get("controller")), "") or "")


# --- reading Kueue's answer ------------------------------------------------------------------------


@dataclass(frozen=True)
class Cond:
    status: str
    reason: str
    message: str


def _conditions(workload: dict[str, Any]) -> dict[str, Cond]:
    out: dict[str, Cond] = {}
    for c in (workload.get("status") or {}).get("conditions") or []:
        if isinstance(c, dict) and c.get("type"):
            out[str(c["type"])] = Cond(
                str(c.get("status", "")), str(c.get("reason", "")), str(c.get("message", ""))
            )
    return out


@dataclass(frozen=True)
class WorkloadState:
    """What a Workload says, in the terms the job's state machine needs."""

    name: str
    uid: str
    resource_version: str
    queue: str
    active: bool
    quota_reserved: bool
    admitted: bool
    finished: bool
    evicted: Cond | None
    """``Evicted`` True (preempted, deactivated, ...): the job must stop and give the quota back."""
    pending: Cond | None
    """Why it is not admitted (``QuotaReserved`` False, or ``Admitted`` False), Kueue's words."""
    cluster_queue: str = ""
    flavors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Pod set -> the ResourceFlavors assigned to its resources (sorted, unique)."""
    pod_sets_hash: str = ""
    reserved_at: str = ""
    """``QuotaReserved``'s lastTransitionTime: tells one admission from the next."""
    quota: str = ""
    """:func:`quota_fingerprint` of the stored pod sets."""
    deactivated_by_suspend: bool = False

    @property
    def running_allowed(self) -> bool:
        return self.admitted and self.active and self.evicted is None and not self.finished


def workload_state(workload: dict[str, Any]) -> WorkloadState:
    meta = workload.get("metadata") or {}
    spec = workload.get("spec") or {}
    status = workload.get("status") or {}
    conds = _conditions(workload)

    def true(t: str) -> bool:
        c = conds.get(t)
        return c is not None and c.status == "True"

    admission = status.get("admission") or {}
    flavors: dict[str, tuple[str, ...]] = {}
    for psa in admission.get("podSetAssignments") or []:
        if isinstance(psa, dict) and psa.get("name"):
            names = {str(v) for v in (psa.get("flavors") or {}).values() if v}
            flavors[str(psa["name"])] = tuple(sorted(names))
    pending: Cond | None = None
    if not true(WL_ADMITTED):
        quota = conds.get(WL_QUOTA_RESERVED)
        if quota is not None and quota.status != "True":
            pending = quota
        elif quota is not None:  # quota reserved, admission checks outstanding
            pending = conds.get(WL_ADMITTED) or Cond(
                "False", "AdmissionChecksPending", "waiting for admission checks"
            )
        else:
            pending = Cond("False", "Pending", "waiting for Kueue to consider the workload")
    return WorkloadState(
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
        queue=str(spec.get("queueName") or ""),
        active=spec.get("active", True) is not False,
        quota_reserved=true(WL_QUOTA_RESERVED),
        admitted=true(WL_ADMITTED),
        finished=true(WL_FINISHED),
        evicted=conds[WL_EVICTED] if true(WL_EVICTED) else None,
        pending=pending,
        cluster_queue=str(admission.get("clusterQueue") or ""),
        flavors=flavors,
        pod_sets_hash=pod_sets_hash(workload),
        reserved_at=_reserved_at(workload),
        quota=quota_fingerprint(spec.get("podSets") or []),
        deactivated_by_suspend=(meta.get("annotations") or {}).get(ANNOTATION_SUSPENDED) == "true",
    )


# --- what Kueue assigned -> pods -------------------------------------------------------------------


def flavor_placement(flavors: list[dict[str, Any]]) -> Assigned:
    """Merge ResourceFlavors' ``spec.nodeLabels`` (-> nodeSelector) and ``spec.tolerations``
    (Kueue adds a flavor's tolerations to the pods; its ``nodeTaints`` only filter admission)."""
    labels: dict[str, str] = {}
    tolerations: list[tuple[tuple[str, str], ...]] = []
    for flavor in flavors:
        spec = flavor.get("spec") or {}
        labels.update({str(k): str(v) for k, v in (spec.get("nodeLabels") or {}).items()})
        for t in spec.get("tolerations") or []:
            item = tuple(sorted((str(k), str(v)) for k, v in t.items() if v is not None))
            if item not in tolerations:
                tolerations.append(item)
    return Assigned(tuple(sorted(labels.items())), tuple(tolerations))


def _reserved_at(workload: dict[str, Any]) -> str:
    for c in (workload.get("status") or {}).get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == WL_QUOTA_RESERVED and c.get("status") == "True":
            return str(c.get("lastTransitionTime") or "")
    return ""


def admission_id(state: WorkloadState) -> str:
    """One admission of one Workload (a re-admission after an eviction is another)."""
    return stable_hash([state.uid, state.cluster_queue, sorted(state.flavors.items()), state.reserved_at])


def placement_annotation(admission: str, head: Assigned, workers: Assigned) -> dict[str, Any]:
    """Metadata patch recording the placement resolved for ``admission``: the pods keep it for the
    whole admission, whatever happens to the flavors or the operator meanwhile (Kueue likewise
    writes a flavor's node labels into the job's pod template once, at admission)."""
    value = {"admission": admission, "head": dataclasses.asdict(head), "workers": dataclasses.asdict(workers)}
    return {"metadata": {"annotations": {ANNOTATION_PLACEMENT: json.dumps(value, sort_keys=True)}}}


def recorded_placement(workload: dict[str, Any], admission: str) -> tuple[Assigned, Assigned] | None:
    """The placement recorded for ``admission`` (None: none, another admission's, or unreadable)."""
    raw = ((workload.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_PLACEMENT)
    try:
        value = json.loads(raw) if isinstance(raw, str) and len(raw) < 65536 else None
        if not isinstance(value, dict) or value.get("admission") != admission:
            return None

        def assigned(d: dict[str, Any]) -> Assigned:
            selector = tuple((str(k), str(v)) for k, v in d["node_selector"])
            tolerations = tuple(tuple((str(k), str(v)) for k, v in t) for t in d["tolerations"])
            return Assigned(selector, tolerations)

        return assigned(value["head"]), assigned(value["workers"])
    except (ValueError, KeyError, TypeError):
        return None


# --- writes to the Workload's status (Kueue's job reconciler does the same) ------------------------


def _condition(
    type_: str, status: bool, reason: str, message: str, at: datetime, generation: int
) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "observedGeneration": generation,
    }


def _merged(workload: dict[str, Any], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Workload's conditions with ``new`` set (transition time kept when status is unchanged)."""
    current = [dict(c) for c in (workload.get("status") or {}).get("conditions") or [] if isinstance(c, dict)]
    for cond in new:
        old = next((c for c in current if c.get("type") == cond["type"]), None)
        if old is None:
            current.append(cond)
            continue
        if old.get("status") == cond["status"]:
            cond = {**cond, "lastTransitionTime": old.get("lastTransitionTime", cond["lastTransitionTime"])}
        current[current.index(old)] = cond
    return current


def requeue_patch(workload: dict[str, Any], evicted: Cond, at: datetime) -> dict[str, Any]:
    """Give the quota back after an eviction, once the job stopped (Kueue's
    ``UnsetQuotaReservationWithCondition`` + ``SetRequeuedCondition``): Kueue queues it again."""
    gen = int((workload.get("metadata") or {}).get("generation") or 0)
    conds = _merged(
        workload,
        [
            _condition(
                WL_REQUEUED, evicted.reason in REQUEUED_REASONS, evicted.reason, evicted.message, at, gen
            ),
            _condition(WL_QUOTA_RESERVED, False, "Pending", evicted.message, at, gen),
            _condition(WL_ADMITTED, False, "NoReservation", "The workload has no reservation", at, gen),
        ],
    )
    return {"conditions": conds, "admission": None}


def finish_patch(workload: dict[str, Any], succeeded: bool, message: str, at: datetime) -> dict[str, Any]:
    """Mark the Workload ``Finished`` (reason Succeeded or Failed): Kueue releases its quota."""
    gen = int((workload.get("metadata") or {}).get("generation") or 0)
    reason = "Succeeded" if succeeded else "Failed"
    return {
        "conditions": _merged(workload, [_condition(WL_FINISHED, True, reason, message or reason, at, gen)])
    }
