"""Pure decisions: which pods to create and delete to converge on the desired cluster.

Worker pods have deterministic names (one slot each); a demand-driven scale-down deletes the idle
pods the autoscaler chose directly (``DeploymentController._autoscale``), so this plan only
replaces finished or outdated pods and trims a surplus.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .observe import PodView


@dataclass(frozen=True)
class WorkerPlan:
    """Slots to create and pods to delete (with why, for logs and events)."""

    create: tuple[int, ...] = ()
    delete: tuple[tuple[PodView, str], ...] = ()
    live: tuple[PodView, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not self.create and not self.delete


def plan_workers(
    pods: Iterable[PodView],
    *,
    desired: int,
    group: str,
    template_hash: str,
) -> WorkerPlan:
    """Converge the worker pods of one cluster on ``desired`` up-to-date pods of ``group``.

    - Pods being deleted are neither counted nor touched, but their slot stays taken until they are
      gone (a pod name cannot be reused while the old pod exists).
    - Finished pods (Succeeded/Failed), pods of another group and pods built from another template
      (spec or auth token changed) are deleted; they are replaced by new slots in the same pass.
    - Surplus pods go not-ready first, then highest slot first (the newest).
    - Missing pods take the lowest free slots, so names are deterministic for a given world.
    """
    pods = list(pods)
    taken = {p.index for p in pods if p.index is not None}
    delete: list[tuple[PodView, str]] = []
    live: list[PodView] = []
    for pod in pods:
        if pod.deleting:
            continue
        if pod.finished:
            delete.append((pod, f"pod {pod.phase}"))
        elif pod.group != group:
            delete.append((pod, f"worker group changed ({pod.group} -> {group})"))
        elif pod.template_hash != template_hash:
            delete.append((pod, "pod spec changed"))
        else:
            live.append(pod)
    desired = max(0, desired)
    if len(live) > desired:
        surplus = sorted(live, key=lambda p: (p.ready, -(p.index or 0)))[: len(live) - desired]
        delete.extend((p, "scale-down") for p in surplus)
        live = [p for p in live if p not in surplus]
    create: list[int] = []
    slot = 0
    while len(live) + len(create) < desired:
        if slot not in taken:
            create.append(slot)
        slot += 1
    return WorkerPlan(create=tuple(create), delete=tuple(delete), live=tuple(live))


@dataclass(frozen=True)
class HeadPlan:
    """What to do with the head pod: ``create``, ``delete`` (then create next pass), ``wait`` or ``keep``."""

    action: str
    reason: str = ""


def plan_head(pod: PodView | None, *, template_hash: str) -> HeadPlan:
    """Converge the single head pod on the current template."""
    if pod is None:
        return HeadPlan("create")
    if pod.deleting:
        return HeadPlan("wait", "old head pod is terminating")
    if pod.finished:
        return HeadPlan("delete", f"head pod {pod.phase}")
    if pod.template_hash != template_hash:
        return HeadPlan("delete", "head pod spec changed")
    return HeadPlan("keep")
