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

The demand comes from the head, so it is untrusted: the cost of :func:`decide` depends on the
number of shapes and worker bins, never on the counts (a count of 1e18 is one arithmetic step), and
a work budget (:data:`WORK_BUDGET` bin checks) bounds even an absurd number of shapes or gangs;
demand left unexamined is reported as unmet. Non-finite or huge amounts are infeasible, not errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from llmray.builders.common import cpu_count, memory_bytes
from llmray.ray.cluster import GangDemand, ResourceDemand

UNITS = 10_000  # Ray's resource granularity: amounts are multiples of 1/10000
MAX_UNITS = 10**22
"""Largest amount in units (1e18 of anything): bigger, infinite or nan amounts clamp to it, which
no worker offers, so that demand is infeasible instead of an exception."""
WORK_BUDGET = 10_000
"""Bin checks one :func:`decide` may spend (~10 ms of CPU); a real pool needs a few hundred."""
MAX_LISTED = 5  # infeasible shapes named in a reason (it ends up in status and Events)
GANG_COST = 10
"""Budget charged per placement-group copy tried, on top of its bin checks (its fixed overhead)."""


def worker_offer(
    cpu: str | int | float,
    gpu: int = 0,
    memory: str | int | None = None,
    custom: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Ray resources one worker pod declares, from its Kubernetes resources.

    CPU and memory round up like Kubernetes' ``Quantity.Value()`` and KubeRay do; the numbers come
    from the same functions the pod builder passes to ``ray start`` (``--num-cpus``,
    ``--memory``), so the packing matches what Ray will have.
    """
    offer: dict[str, float] = {"CPU": float(cpu_count(cpu))}
    if gpu:
        offer["GPU"] = float(gpu)
    if memory is not None:
        offer["memory"] = float(memory_bytes(memory))
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
    def start_time_s(self) -> float | None: ...


def worker_states(
    pods: Sequence[tuple[str, str | None]],
    nodes: Sequence[NodeView],
    *,
    now: float,
    settle_s: float = 15.0,
) -> list[WorkerState]:
    """Join worker pods ``(name, pod_ip)`` with Ray nodes by IP (a Ray node reports its pod's IP).

    A node that joined less than ``settle_s`` ago counts as not in Ray yet: Ray's demand report lags
    a few seconds, and treating the fresh node as pending capacity avoids adding a second worker
    for demand the first one is about to take.
    """
    by_ip = {n.ip: n for n in nodes if n.alive and not n.is_head and n.ip}
    states: list[WorkerState] = []
    for name, ip in pods:
        node = by_ip.get(ip) if ip else None
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


def _unit(value: float) -> int:
    """An amount in units, clamped: nan, inf and absurd amounts become :data:`MAX_UNITS`."""
    if not math.isfinite(value) or value * UNITS >= MAX_UNITS:
        return 0 if value < 0 else MAX_UNITS  # -inf is "nothing", +inf and nan are "too much"
    return round(value * UNITS)


def _units(shape: Mapping[str, float]) -> _Res:
    out: _Res = {}
    for k, v in shape.items():
        try:
            u = _unit(float(v))
        except (TypeError, ValueError):  # not a number at all: no worker offers it
            u = MAX_UNITS
        if u > 0:
            out[k] = u
    return out


def _times(need: _Res, free: _Res) -> int:
    """How many copies of ``need`` fit in ``free``."""
    if not need:
        return 0
    return min(free.get(k, 0) // v for k, v in need.items())


def _size(need: _Res) -> tuple[int, int, int, int]:
    """Sort key: biggest first (GPU, then CPU, memory, the rest) for first-fit decreasing."""
    rest = sum(v for k, v in need.items() if k not in ("GPU", "CPU", "memory"))
    return (need.get("GPU", 0), need.get("CPU", 0), need.get("memory", 0), rest)


class _Packer:
    """First-fit bins: pending workers' capacity first, then new workers up to ``room``.

    Every bin examined costs one unit of ``budget``; once it is spent nothing more is placed
    (``exhausted``), so the work is bounded whatever the demand. Changes are journaled while a
    gang is being placed, so a failed gang is undone in the time it took, not by copying every bin.
    """

    def __init__(self, offer: _Res, pending: int, room: int, budget: int = WORK_BUDGET) -> None:
        self.offer = offer
        self.bins: list[_Res] = [dict(offer) for _ in range(pending)]
        self.room = room
        self.new = 0
        self.budget = budget
        self._journal: list[tuple[_Res, _Res, int]] | None = None

    @property
    def exhausted(self) -> bool:
        return self.budget <= 0

    def _spend(self) -> bool:
        self.budget -= 1
        return self.budget >= 0

    def _take(self, need: _Res, free: _Res, times: int) -> None:
        for k, v in need.items():
            free[k] -= v * times
        if self._journal is not None and times:
            self._journal.append((need, free, times))

    def _open(self) -> _Res | None:
        if self.new >= self.room:
            return None
        self.new += 1
        self.bins.append(dict(self.offer))
        return self.bins[-1]

    def place(self, need: _Res, count: int) -> int:
        """Place up to ``count`` copies of ``need`` (which fits one worker); return how many.

        O(bins): each bin takes as many copies as fit at once, so ``count`` may be huge. (The hot
        loop of :func:`decide`, hence written out rather than with :func:`_times`.)
        """
        if not need:
            return 0
        items = list(need.items())
        left = count
        for free in self.bins:
            if self.budget <= 0:
                return count - left
            self.budget -= 1
            k = left
            for key, v in items:
                fit = free.get(key, 0) // v
                if fit < k:
                    k = fit
                    if not k:
                        break
            if k:
                self._take(need, free, k)
                left -= k
                if not left:
                    return count
        while left and self.budget > 0 and (fresh := self._open()) is not None:
            self.budget -= 1
            k = min(left, _times(need, fresh))
            self._take(need, fresh, k)
            left -= k
        return count - left

    def place_spread(self, needs: list[_Res]) -> bool:
        """Each bundle on a different worker (STRICT_SPREAD)."""
        used: set[int] = set()
        for need in needs:
            index = None
            for i, free in enumerate(self.bins):
                if not self._spend():
                    return False
                if i not in used and _times(need, free) >= 1:
                    index = i
                    break
            if index is None:
                if not self._spend() or self._open() is None:
                    return False
                index = len(self.bins) - 1
            self._take(need, self.bins[index], 1)
            used.add(index)
        return True

    def place_gang(self, needs: list[_Res], strategy: str) -> bool:
        """Place a whole placement group or nothing (undone from the journal on failure)."""
        self.budget -= GANG_COST
        self._journal, opened = [], (len(self.bins), self.new)
        try:
            if strategy == "STRICT_SPREAD":
                ok = self.place_spread(needs)
            else:
                ok = all(self.place(need, 1) == 1 for need in sorted(needs, key=_size, reverse=True))
            if not ok:
                for need, free, times in reversed(self._journal):
                    for k, v in need.items():
                        free[k] += v * times
                del self.bins[opened[0] :]
                self.new = opened[1]
            return ok
        finally:
            self._journal = None


def _gang_needs(gang: GangDemand) -> list[_Res] | None:
    """The bundles of one gang in units, or None when it has more bundles than a pool holds.

    STRICT_PACK (every bundle on one node) is one combined shape, computed without expanding the
    bundle counts.
    """
    if gang.strategy == "STRICT_PACK":
        combined: _Res = {}
        for b in gang.bundles:
            for k, v in _units(b.shape).items():
                combined[k] = min(MAX_UNITS, combined.get(k, 0) + v * max(0, b.count))
        return [combined]
    if sum(max(0, b.count) for b in gang.bundles) > MAX_GANG_BUNDLES:
        return None
    return [n for b in gang.bundles if (n := _units(b.shape)) for _ in range(b.count)]


MAX_GANG_BUNDLES = 1024 + 1  # one more bundle than the largest pool (1024 workers) can spread


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
    placed = unmet = skipped = 0
    # Gangs first: they are all-or-nothing and usually the big training placement groups. They may
    # spend half the work budget, so a flood of them cannot starve plain demand.
    packer.budget = WORK_BUDGET // 2
    for gang in gangs:
        count = max(0, gang.count)
        needs = _gang_needs(gang)
        if needs is None:  # more bundles than any pool: never placeable
            unmet += count
            continue
        distinct = list({tuple(sorted(n.items())): n for n in needs}.values())
        too_big = [n for n in distinct if _times(n, offer_u) < 1]
        if not needs or too_big:
            infeasible.extend({k: v / UNITS for k, v in n.items()} for n in too_big)
            continue
        if len(needs) == 1:  # one bundle: all-or-nothing per copy is plain first-fit, in bulk
            done = packer.place(needs[0], count)
            placed += done
            skipped += count - done if packer.exhausted else 0
            unmet += count - done if not packer.exhausted else 0
            continue
        for done in range(count):
            if packer.exhausted:
                skipped += count - done
                break
            if not packer.place_gang(needs, gang.strategy):
                # the bins are as before this copy, so every later copy fails the same way
                unmet += count - done
                break
            placed += 1
    packer.budget = max(0, packer.budget) + WORK_BUDGET // 2
    for item in sorted(demand, key=lambda d: _size(_units(d.shape)), reverse=True):
        need = _units(item.shape)
        if not need or item.count <= 0:
            continue
        if _times(need, offer_u) < 1:
            infeasible.append(dict(item.shape))
            continue
        if packer.exhausted:
            skipped += item.count
            continue
        done = packer.place(need, item.count)
        placed += done
        if packer.exhausted:
            skipped += item.count - done
        else:
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
    if skipped:
        reasons.append(f"{skipped} pending request(s) not examined (too much demand for one pass)")
        unmet += skipped
    if infeasible:
        unique = list({_fmt(s): s for s in infeasible}.values())
        infeasible = unique
        listed = ", ".join(_fmt(s) for s in unique[:MAX_LISTED])
        more = f" and {len(unique) - MAX_LISTED} more" if len(unique) > MAX_LISTED else ""
        reasons.append(f"demand no worker can hold (worker offers {_fmt(offer)}): {listed}{more}")
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
