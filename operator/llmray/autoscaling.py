"""Pure worker-pool scaling decisions from Ray's pending demand.

This is what Ray's autoscaler does for KubeRay, reduced to one worker shape per pool and written as
a pure function on plain data so every rule is unit-tested:

- **Scale up**: the pending demand (tasks/actors and placement groups Ray could not place) is
  bin-packed, first-fit decreasing, into worker-shaped bins. Workers that exist but have not joined
  Ray yet are bins already on their way (their capacity is filled first, so a slow pod start never
  causes a second scale-up for the same demand). Each new bin is one worker to add, up to
  ``max_replicas``. Placement groups are all-or-nothing: a gang that cannot be placed whole within
  the max adds nothing for it (half a training job's workers would idle and cost GPUs).
- **Demand no worker can hold** (e.g. ``{"GPU": 8}`` for 1-GPU workers, a custom resource workers do
  not have, a ``node:<ip>`` affinity) is reported in ``infeasible`` and never adds workers.
- **Scale down**: only workers Ray reports idle for at least ``idle_timeout_s``, only while no
  placeable demand is pending, never below ``min_replicas``; the longest-idle go first (ties by
  name, for determinism). Workers above ``max_replicas`` (the user lowered it) are removed first,
  preferring workers not yet in Ray, then idle ones, then busy ones.

Resource amounts use Ray's fixed-point granularity (1/10000), so fractional CPU demand such as
``0.1`` packs exactly.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Protocol

from llmray.ray.cluster import GangDemand, ResourceDemand

UNITS = 10_000  # Ray's resource granularity: amounts are multiples of 1/10000
POD_LABEL = "llmray.io/pod"  # Ray node label naming its pod (set by the worker's `ray start --labels`)

_SUFFIXES = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)$")


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity (``8``, ``500m``, ``64Gi``, ``1e3``) as a Decimal."""
    match = _QUANTITY.match(str(value).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    try:
        return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise ValueError(f"not a Kubernetes quantity: {value!r}") from exc


def worker_offer(
    cpu: str | int | float,
    gpu: int = 0,
    memory: str | int | None = None,
    custom: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Ray resources one worker pod declares, from its Kubernetes resources.

    CPU and memory round up like KubeRay does (``ceil``); the pod builder must start Ray with the
    same numbers (``--num-cpus``, ``--num-gpus``, ``--memory`` in bytes) for the packing to match.
    """
    offer: dict[str, float] = {"CPU": float(math.ceil(parse_quantity(cpu)))}
    if gpu:
        offer["GPU"] = float(gpu)
    if memory is not None:
        offer["memory"] = float(math.ceil(parse_quantity(memory)))
    offer.update({k: float(v) for k, v in (custom or {}).items() if v > 0})
    return offer


@dataclass(frozen=True)
class WorkerState:
    """One worker pod of the pool, as seen by the controller.

    ``in_ray``: its Ray node is alive in the cluster (and settled, see :func:`worker_states`); a
    worker not in Ray yet is capacity on its way. ``idle_seconds``: how long Ray reports the node
    idle, None while it is busy or unknown. Durations rather than timestamps: Ray reports them so,
    and they need no clock agreement between operator and head.
    """

    name: str
    in_ray: bool
    idle_seconds: float | None = None


class NodeView(Protocol):
    """What :func:`worker_states` reads from a Ray node (see :class:`llmray.ray.RayNode`)."""

    @property
    def ip(self) -> str: ...
    @property
    def alive(self) -> bool: ...
    @property
    def is_head(self) -> bool: ...
    @property
    def idle_seconds(self) -> float | None: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def start_time_s(self) -> float | None: ...


def worker_states(
    pods: Sequence[tuple[str, str | None]],
    nodes: Sequence[NodeView],
    *,
    now: float,
    settle_s: float = 15.0,
) -> list[WorkerState]:
    """Join worker pods ``(name, pod_ip)`` with Ray nodes: by the ``llmray.io/pod`` label, else by IP.

    A node that joined less than ``settle_s`` ago counts as not in Ray yet: Ray's demand report lags
    a few seconds, and treating the fresh node as pending capacity avoids adding a second worker
    for demand the first one is about to take.
    """
    alive = [n for n in nodes if n.alive and not n.is_head]
    by_label = {n.labels[POD_LABEL]: n for n in alive if n.labels.get(POD_LABEL)}
    by_ip = {n.ip: n for n in alive if n.ip}
    states: list[WorkerState] = []
    for name, ip in pods:
        node = by_label.get(name) or (by_ip.get(ip) if ip else None)
        settled = node is not None and (node.start_time_s is None or now - node.start_time_s >= settle_s)
        states.append(WorkerState(name, in_ray=settled, idle_seconds=node.idle_seconds if node else None))
    return states


@dataclass(frozen=True)
class ScaleDecision:
    """What to do with a worker pool: add ``add`` workers, delete the named ``remove`` workers."""

    current: int
    add: int
    remove: tuple[str, ...]
    infeasible: tuple[dict[str, float], ...] = ()
    unmet: int = 0
    reason: str = ""

    @property
    def desired(self) -> int:
        return self.current + self.add - len(self.remove)

    @property
    def changed(self) -> bool:
        return bool(self.add or self.remove)


_Res = dict[str, int]


def _units(shape: Mapping[str, float]) -> _Res:
    return {k: round(v * UNITS) for k, v in shape.items() if round(v * UNITS) > 0}


def _times(need: _Res, free: _Res) -> int:
    """How many copies of ``need`` fit in ``free``."""
    if not need:
        return 0
    return min(free.get(k, 0) // v for k, v in need.items())


def _take(need: _Res, free: _Res, times: int) -> None:
    for k, v in need.items():
        free[k] -= v * times


def _size(need: _Res) -> tuple[int, int, int, int]:
    """Sort key: biggest first (GPU, then CPU, memory, the rest) for first-fit decreasing."""
    rest = sum(v for k, v in need.items() if k not in ("GPU", "CPU", "memory"))
    return (need.get("GPU", 0), need.get("CPU", 0), need.get("memory", 0), rest)


class _Packer:
    """First-fit bins: pending workers' capacity first, then new workers up to ``room``."""

    def __init__(self, offer: _Res, pending: int, room: int) -> None:
        self.offer = offer
        self.bins: list[_Res] = [dict(offer) for _ in range(pending)]
        self.room = room
        self.new = 0

    def _open(self) -> _Res | None:
        if self.new >= self.room:
            return None
        self.new += 1
        self.bins.append(dict(self.offer))
        return self.bins[-1]

    def place(self, need: _Res, count: int) -> int:
        """Place up to ``count`` copies of ``need`` (which fits one worker); return how many."""
        left = count
        for free in self.bins:
            k = min(left, _times(need, free))
            _take(need, free, k)
            left -= k
            if not left:
                return count
        while left and (fresh := self._open()) is not None:
            k = min(left, _times(need, fresh))
            _take(need, fresh, k)
            left -= k
        return count - left

    def place_spread(self, needs: list[_Res]) -> bool:
        """Each bundle on a different worker (STRICT_SPREAD)."""
        used: set[int] = set()
        for need in needs:
            index = next(
                (i for i, free in enumerate(self.bins) if i not in used and _times(need, free) >= 1), None
            )
            if index is None:
                if self._open() is None:
                    return False
                index = len(self.bins) - 1
            _take(need, self.bins[index], 1)
            used.add(index)
        return True

    def place_gang(self, needs: list[_Res], strategy: str) -> bool:
        """Place a whole placement group or nothing (state is restored on failure)."""
        saved = (copy.deepcopy(self.bins), self.new)
        if strategy == "STRICT_SPREAD":
            ok = self.place_spread(needs)
        else:
            ok = all(self.place(need, 1) == 1 for need in sorted(needs, key=_size, reverse=True))
        if not ok:
            self.bins, self.new = saved
        return ok


def _gang_needs(gang: GangDemand) -> list[_Res]:
    needs = [_units(b.shape) for b in gang.bundles for _ in range(b.count)]
    if gang.strategy == "STRICT_PACK":  # every bundle on one node: one combined shape
        combined: _Res = {}
        for need in needs:
            for k, v in need.items():
                combined[k] = combined.get(k, 0) + v
        return [combined]
    return [n for n in needs if n]


def _fmt(shape: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shape.items())) + "}"


def _pick_over_max(workers: Sequence[WorkerState], excess: int) -> list[str]:
    def key(w: WorkerState) -> tuple[int, float, str]:
        rank = 0 if not w.in_ray else 1 if w.idle_seconds is not None else 2
        return (rank, -(w.idle_seconds or 0.0), w.name)

    return [w.name for w in sorted(workers, key=key)[:excess]]


def decide(
    demand: Sequence[ResourceDemand],
    offer: Mapping[str, float],
    workers: Sequence[WorkerState],
    *,
    min_replicas: int,
    max_replicas: int,
    idle_timeout_s: float,
    gangs: Sequence[GangDemand] = (),
) -> ScaleDecision:
    """Scaling decision for one worker pool (see the module docstring for the rules).

    ``demand``: pending shapes with counts (``ClusterStatus.demand`` plus ``.requested``);
    ``gangs``: pending placement groups (``ClusterStatus.gang_demand``); ``offer``: what one worker
    provides (:func:`worker_offer`); ``workers``: the pool's current pods (:func:`worker_states`).
    """
    if min_replicas < 0 or max_replicas < min_replicas:
        raise ValueError(f"need 0 <= min_replicas ({min_replicas}) <= max_replicas ({max_replicas})")
    offer_u = _units(offer)
    current = len(workers)
    remove = _pick_over_max(workers, current - max_replicas) if current > max_replicas else []
    kept = [w for w in workers if w.name not in remove]
    pending = sum(1 for w in kept if not w.in_ray)
    packer = _Packer(offer_u, pending, room=max_replicas - len(kept))

    infeasible: list[dict[str, float]] = []
    placed = unmet = 0
    # Gangs first: they are all-or-nothing and usually the big training placement groups.
    for gang in gangs:
        needs = _gang_needs(gang)
        too_big = [n for n in needs if _times(n, offer_u) < 1]
        if not needs or too_big:
            infeasible.extend({k: v / UNITS for k, v in n.items()} for n in too_big)
            continue
        for _ in range(gang.count):
            if packer.place_gang(needs, gang.strategy):
                placed += 1
            else:
                unmet += 1
    for item in sorted(demand, key=lambda d: _size(_units(d.shape)), reverse=True):
        need = _units(item.shape)
        if not need or item.count <= 0:
            continue
        if _times(need, offer_u) < 1:
            infeasible.append(dict(item.shape))
            continue
        done = packer.place(need, item.count)
        placed += done
        unmet += item.count - done

    add = packer.new
    reasons: list[str] = []
    if remove:
        reasons.append(f"{current} workers exceed maxReplicas={max_replicas}: removing {len(remove)}")
    if add:
        reasons.append(f"adding {add} worker(s) for pending demand")
    base = len(kept) + add
    if base < min_replicas:
        reasons.append(f"adding {min_replicas - base} worker(s) to reach minReplicas={min_replicas}")
        add += min_replicas - base
    if unmet:
        reasons.append(f"{unmet} pending request(s) cannot be placed within maxReplicas={max_replicas}")
    if infeasible:
        unique = list({_fmt(s): s for s in infeasible}.values())
        infeasible = unique
        reasons.append(
            "demand no worker can hold (worker offers "
            + _fmt(offer)
            + "): "
            + ", ".join(_fmt(s) for s in unique)
        )
    if not placed and not unmet:
        idle = sorted(
            (w for w in kept if w.in_ray and w.idle_seconds is not None and w.idle_seconds >= idle_timeout_s),
            key=lambda w: (-(w.idle_seconds or 0.0), w.name),
        )
        idle = idle[: max(0, len(kept) + add - min_replicas)]
        if idle:
            remove.extend(w.name for w in idle)
            reasons.append(f"removing {len(idle)} worker(s) idle for >= {idle_timeout_s:g}s")
    return ScaleDecision(
        current=current,
        add=add,
        remove=tuple(remove),
        infeasible=tuple(infeasible),
        unmet=unmet,
        reason="; ".join(reasons) or "no change",
    )
