"""What the operator needs to know about its children, distilled from their manifests.

The watch caches keep these small frozen views instead of whole objects (less memory at scale,
and nothing secret is ever held: a Secret is reduced to its name and uid).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .common import (
    ANNOTATION_TEMPLATE_HASH,
    LABEL_INSTANCE,
    LABEL_KIND,
    LABEL_RAY_GROUP,
    LABEL_RAY_NODE_TYPE,
    LABEL_WORKER_INDEX,
    stable_hash,
)

# Container waiting reasons that need a human (a wrong image or a missing Secret/ConfigMap key).
STUCK_WAITING_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
    }
)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def owner_key(obj: dict[str, Any]) -> tuple[str, str, str] | None:
    """``(kind, namespace, name)`` of the resource a child belongs to, from its labels."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    kind, name, namespace = labels.get(LABEL_KIND), labels.get(LABEL_INSTANCE), meta.get("namespace")
    if not (kind and name and namespace):
        return None
    return (kind, namespace, name)


def _controller_uid(meta: dict[str, Any]) -> str:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid") or "")
    return ""


def service_fingerprint(obj: dict[str, Any]) -> str:
    """Hash of the Service fields the operator owns (type, selector, ports), as stored or as built.

    Fields the API server fills in (clusterIP, nodePort, a defaulted protocol) are left out, so
    the operator's manifest and the stored object hash the same unless someone changed them
    (``kubectl patch svc ... type=NodePort`` is drift, and is reverted). Empty for non-Services.
    """
    if obj.get("kind") not in (None, "Service") or "spec" not in obj:
        return ""
    spec = obj.get("spec") or {}
    ports = sorted(
        (
            str(p.get("name") or ""),
            int(p.get("port") or 0),
            str(p.get("targetPort") if p.get("targetPort") is not None else p.get("port") or ""),
            str(p.get("protocol") or "TCP"),
        )
        for p in spec.get("ports") or []
    )
    return stable_hash(
        {"type": spec.get("type") or "ClusterIP", "selector": spec.get("selector") or {}, "ports": ports}
    )


@dataclass(frozen=True)
class ChildView:
    """A Service or Secret: identity, ownership and (Services) a fingerprint of the owned fields."""

    name: str
    uid: str
    owner_uid: str
    deleting: bool = False
    template_hash: str = ""
    fingerprint: str = ""
    """:func:`service_fingerprint` of a Service (drift detection); empty for Secrets."""

    @classmethod
    def of(cls, obj: dict[str, Any]) -> ChildView:
        meta = obj.get("metadata") or {}
        return cls(
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            owner_uid=_controller_uid(meta),
            deleting=bool(meta.get("deletionTimestamp")),
            template_hash=(meta.get("annotations") or {}).get(ANNOTATION_TEMPLATE_HASH, ""),
            fingerprint=service_fingerprint(obj) if obj.get("kind") == "Service" else "",
        )


@dataclass(frozen=True)
class PodView:
    """The state of one Ray pod."""

    name: str
    uid: str = ""
    owner_uid: str = ""
    node_type: str = ""
    group: str = ""
    index: int | None = None
    template_hash: str = ""
    phase: str = "Pending"
    ready: bool = False
    deleting: bool = False
    node_name: str = ""
    unschedulable_since: datetime | None = None
    unschedulable_message: str = ""
    waiting_reason: str = ""
    waiting_message: str = ""
    pod_ip: str = ""
    """The pod's IP: a Ray node started in the pod reports it as its node IP (autoscaling match)."""
    started: bool = False
    """Every container passed its startup probe (the Ray node is up). An LLMDeployment's pods are
    Ready only while their Serve proxy is (the serve Service's endpoints), so "up" is this instead."""

    @classmethod
    def of(cls, obj: dict[str, Any]) -> PodView:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ready = False
        unschedulable_since: datetime | None = None
        unschedulable_message = ""
        for cond in status.get("conditions") or []:
            if cond.get("type") == "Ready":
                ready = cond.get("status") == "True"
            elif (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                unschedulable_since = _parse_time(cond.get("lastTransitionTime"))
                unschedulable_message = str(cond.get("message") or "")
        waiting_reason = waiting_message = ""
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING_REASONS:
                waiting_reason = str(waiting["reason"])
                waiting_message = str(waiting.get("message") or "")
                break
        statuses = [cs for cs in status.get("containerStatuses") or [] if isinstance(cs, dict)]
        # No "started" (a simulated kubelet) or no container statuses at all: Ready stands in.
        started = all(bool(cs.get("started", cs.get("ready"))) for cs in statuses) if statuses else ready
        index_label = labels.get(LABEL_WORKER_INDEX)
        return cls(
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            owner_uid=_controller_uid(meta),
            node_type=labels.get(LABEL_RAY_NODE_TYPE, ""),
            group=labels.get(LABEL_RAY_GROUP, ""),
            index=int(index_label) if index_label and index_label.isdigit() else None,
            template_hash=(meta.get("annotations") or {}).get(ANNOTATION_TEMPLATE_HASH, ""),
            phase=str(status.get("phase") or "Pending"),
            ready=ready,
            deleting=bool(meta.get("deletionTimestamp")),
            node_name=str(spec.get("nodeName") or ""),
            pod_ip=str(status.get("podIP") or ""),
            unschedulable_since=unschedulable_since,
            unschedulable_message=unschedulable_message,
            waiting_reason=waiting_reason,
            waiting_message=waiting_message,
            started=started,
        )

    @property
    def finished(self) -> bool:
        """The pod's container exited for good (evicted, OOM-killed with restartPolicy Never, ...)."""
        return self.phase in ("Succeeded", "Failed")

    @property
    def running_ready(self) -> bool:
        return self.phase == "Running" and self.ready and not self.deleting

    @property
    def running_started(self) -> bool:
        """Running with its Ray node up (startup probe passed), whether or not it takes traffic."""
        return self.phase == "Running" and self.started and not self.deleting

    def up(self, serving: bool) -> bool:
        """The pod's Ray node is up: Ready, or for serving pods (Ready = proxy ready) started."""
        return self.running_started if serving else self.running_ready
