"""Cluster status and nodes of a Ray head: the demand signal for worker autoscaling.

``GET /api/cluster_status`` returns the autoscaler monitor's last report (written to the GCS every
few seconds by the head's monitor process, which runs even when no autoscaler config is given):
``data.clusterStatus.loadMetricsReport`` holds ``resourceDemand`` (tasks/actors waiting, as
``[shape, count]``), ``pgDemand`` (placement groups waiting, ``[{bundles, strategy}, count]``),
``requestDemand`` (``ray.autoscaler.sdk.request_resources``) and ``usage`` (``{res: [used,
total]}``). The dashboard camelCases dict keys it serializes (``objectStoreMemory``,
``node:InternalHead``) but not keys inside lists, so shapes keep Ray's resource names; the parser
undoes the known renames in ``usage``. Per-node idle time is not in that report for a cluster
without an autoscaler: it comes from ``GET /nodes?view=summary`` (raylet ``stateSnapshot``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._http import RayHTTP

# camelCased names the dashboard gives Ray's underscore resources in ``usage``.
_USAGE_KEY_FIXES = {"objectStoreMemory": "object_store_memory", "node:InternalHead": "node:__internal_head__"}


@dataclass(frozen=True)
class ResourceDemand:
    """``count`` pending requests of one resource shape (e.g. ``{"GPU": 1, "CPU": 0.5}``)."""

    shape: dict[str, float]
    count: int = 1


@dataclass(frozen=True)
class GangDemand:
    """``count`` pending placement groups: all ``bundles`` must be placed at once (``strategy``)."""

    bundles: tuple[ResourceDemand, ...]
    strategy: str = "PACK"
    count: int = 1


@dataclass(frozen=True)
class ClusterStatus:
    """What the head has and what is waiting for resources."""

    demand: tuple[ResourceDemand, ...] = ()
    gang_demand: tuple[GangDemand, ...] = ()
    requested: tuple[ResourceDemand, ...] = ()
    total: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)
    idle_nodes: tuple[str, ...] | None = None
    autoscaler_error: str | None = None
    reported: bool = True

    @property
    def has_demand(self) -> bool:
        return bool(self.demand or self.gang_demand or self.requested)


# Bounds on what a head may report (its answer is untrusted; the body cap already bounds its size).
MAX_COUNT = 1_000_000
"""Pending requests of one shape counted at most: more than any worker pool could ever hold."""
MAX_AMOUNT = 1e18
"""Largest resource amount kept (2**60 bytes of memory); larger or infinite amounts clamp to it,
which no worker offers, so such demand is reported infeasible instead of raising."""
MAX_SHAPES = 256
"""Demand entries read per list (Ray aggregates by shape: a real report has a handful)."""
MAX_SHAPE_KEYS = 32
MAX_BUNDLES = 1024
MAX_IDLE_NODES = 10_000


def _number(value: Any) -> float | None:
    """A finite float from a JSON number or numeric string; None for anything else (nan, inf...)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and len(value) <= 64:
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float):
        try:
            n = float(value)
        except OverflowError:  # an int beyond float range
            return None
        return n if math.isfinite(n) else None
    return None


def _amount(value: Any) -> float | None:
    """A resource amount: > 0 and at most :data:`MAX_AMOUNT`; infinite or larger ones clamp to it.

    An infinite or absurd demand must stay a demand (reported infeasible), not vanish: dropping its
    key would make the shape look smaller than asked, hence placeable. nan is no amount at all.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return float(min(value, int(MAX_AMOUNT))) if value > 0 else None
    if isinstance(value, str) and len(value) <= 64:
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, float) or math.isnan(value) or value <= 0:
        return None
    return min(value, MAX_AMOUNT)


def _shape(value: Any) -> dict[str, float] | None:
    if not isinstance(value, Mapping) or len(value) > MAX_SHAPE_KEYS:
        return None
    shape = {str(k)[:256]: n for k, v in value.items() if (n := _amount(v)) is not None}
    return shape or None


def _count(value: Any) -> int:
    """A demand count in ``[0, MAX_COUNT]``: +inf and 1e18 are the max, nan and negatives 0.

    A missing or unreadable count is 1, like an entry without one.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return max(0, min(value, MAX_COUNT))
    if isinstance(value, float) or (isinstance(value, str) and len(value) <= 64):
        try:
            n = float(value)
        except ValueError:
            return 1
        return 0 if math.isnan(n) else int(max(0.0, min(n, float(MAX_COUNT))))
    return 1


def _entries(value: Any) -> list[Any]:
    return list(value[:MAX_SHAPES]) if isinstance(value, list | tuple) else []


def _shape_counts(entries: Any) -> tuple[ResourceDemand, ...]:
    """``[[shape, count], ...]`` (or ``[shape, ...]``) into demands; malformed entries skipped.

    Equal shapes are merged (their counts summed, capped), so the result has at most
    :data:`MAX_SHAPES` entries whatever the head sends.
    """
    merged: dict[tuple[tuple[str, float], ...], int] = {}
    for entry in _entries(entries):
        if isinstance(entry, list | tuple) and len(entry) == 2:
            shape, count = _shape(entry[0]), _count(entry[1])
        else:
            shape, count = _shape(entry), 1
        if shape and count > 0:
            key = tuple(sorted(shape.items()))
            merged[key] = min(MAX_COUNT, merged.get(key, 0) + count)
    return tuple(ResourceDemand(dict(key), count) for key, count in merged.items())


def _gangs(entries: Any) -> tuple[GangDemand, ...]:
    out: list[GangDemand] = []
    for entry in _entries(entries):
        if not (isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[0], Mapping)):
            continue
        pg, count = entry[0], _count(entry[1])
        bundles = _shape_counts(pg.get("bundles"))
        if sum(b.count for b in bundles) > MAX_BUNDLES:
            # No pool holds a gang this big: keep it (reported unplaceable), bundles capped.
            bundles = tuple(ResourceDemand(b.shape, min(b.count, MAX_BUNDLES)) for b in bundles)
        if bundles and count > 0:
            out.append(GangDemand(bundles, str(pg.get("strategy") or "PACK").upper()[:32], count))
    return tuple(out)


def _usage(usage: Any) -> tuple[dict[str, float], dict[str, float]]:
    total: dict[str, float] = {}
    used: dict[str, float] = {}
    if not isinstance(usage, Mapping):
        return total, used
    for key, pair in list(usage.items())[:MAX_SHAPES]:
        if isinstance(pair, list | tuple) and len(pair) == 2:
            u, t = _number(pair[0]), _number(pair[1])
            if u is not None and t is not None:
                name = _USAGE_KEY_FIXES.get(str(key), str(key))
                used[name], total[name] = u, t
    return total, used


def _data(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``data`` of a dashboard ``rest_response`` envelope (or the payload itself)."""
    data = payload.get("data")
    return data if isinstance(data, Mapping) else payload


def _get(obj: Any, *keys: str) -> Any:
    """The first present key of a mapping (camelCase or snake_case spelling), else None."""
    if isinstance(obj, Mapping):
        for key in keys:
            if obj.get(key) is not None:
                return obj[key]
    return None


def parse_cluster_status(payload: Mapping[str, Any]) -> ClusterStatus:
    """A :class:`ClusterStatus` from ``GET /api/cluster_status``; tolerant of missing parts.

    ``reported`` is False when the monitor has not written a report yet (fresh head): the caller
    should not scale down on an empty demand it has not really seen.
    """
    data = _data(payload)
    error = _get(data, "autoscalingError", "autoscaling_error")
    cluster = _get(data, "clusterStatus", "cluster_status")
    if not isinstance(cluster, Mapping):
        return ClusterStatus(reported=False, autoscaler_error=str(error)[:2000] if error else None)
    lm = _get(cluster, "loadMetricsReport", "load_metrics_report")
    idle = _get(_get(cluster, "autoscalerReport", "autoscaler_report"), "idleNodes", "idle_nodes")
    total, used = _usage(_get(lm, "usage"))
    return ClusterStatus(
        demand=_shape_counts(_get(lm, "resourceDemand", "resource_demand")),
        gang_demand=_gangs(_get(lm, "pgDemand", "pg_demand")),
        requested=_shape_counts(_get(lm, "requestDemand", "request_demand")),
        total=total,
        used=used,
        idle_nodes=tuple(str(n) for n in list(idle)[:MAX_IDLE_NODES])
        if isinstance(idle, list | tuple | Mapping)
        else None,
        autoscaler_error=str(error)[:2000] if error else None,
    )


@dataclass(frozen=True)
class RayNode:
    """One Ray node (head or worker) with what the operator needs to map it to a pod."""

    node_id: str
    ip: str
    is_head: bool
    alive: bool
    idle_seconds: float | None
    labels: dict[str, str] = field(default_factory=dict)
    resources_total: dict[str, float] = field(default_factory=dict)
    start_time_s: float | None = None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _parse_node(raylet: Mapping[str, Any]) -> RayNode | None:
    node_id = raylet.get("nodeId") or raylet.get("node_id")
    if not node_id:
        return None
    snap = _mapping(raylet.get("stateSnapshot") or raylet.get("state_snapshot"))
    idle_ms = _number(snap.get("idleDurationMs", snap.get("idle_duration_ms")))
    idle = None
    if str(snap.get("state", "")).upper() == "IDLE" and idle_ms is not None and idle_ms >= 0:
        idle = idle_ms / 1000
    total = _mapping(raylet.get("resourcesTotal") or raylet.get("resources_total"))
    resources = {
        _USAGE_KEY_FIXES.get(str(k), str(k)): n
        for k, v in list(total.items())[:MAX_SHAPES]
        if (n := _number(v)) is not None
    }
    start_ms = _number(_get(raylet, "startTimeMs", "start_time_ms"))
    labels = _mapping(raylet.get("labels"))
    return RayNode(
        node_id=str(node_id),
        ip=str(raylet.get("nodeManagerAddress") or raylet.get("node_ip") or ""),
        is_head=bool(raylet.get("isHeadNode", raylet.get("is_head_node", False))),
        alive=str(raylet.get("state", "")).upper() == "ALIVE",
        idle_seconds=idle,
        labels={str(k): str(v) for k, v in list(labels.items())[:MAX_SHAPES]},
        resources_total=resources,
        start_time_s=start_ms / 1000 if start_ms and start_ms > 0 else None,
    )


def parse_nodes(payload: Mapping[str, Any]) -> list[RayNode]:
    """Nodes from ``GET /nodes?view=summary``; ``idle_seconds`` is None unless Ray says IDLE."""
    nodes: list[RayNode] = []
    summary = _get(_data(payload), "summary")
    for item in summary if isinstance(summary, list) else []:
        raylet = item.get("raylet") if isinstance(item, Mapping) else None
        if isinstance(raylet, Mapping) and (node := _parse_node(raylet)) is not None:
            nodes.append(node)
    return nodes


class ClusterAPI:
    """Cluster status and node list of one head."""

    def __init__(self, http: RayHTTP) -> None:
        self._http = http

    async def status(self) -> ClusterStatus:
        """Pending demand, totals and usage (the monitor refreshes it every few seconds)."""
        path = "/api/cluster_status"
        status: ClusterStatus = self._http.parsed(
            parse_cluster_status, await self._http.get_object(path), "GET", path
        )
        return status

    async def nodes(self) -> list[RayNode]:
        """Every node the head knows, with idle time and labels."""
        data = await self._http.get_object("/nodes", params={"view": "summary"})
        nodes: list[RayNode] = self._http.parsed(parse_nodes, data, "GET", "/nodes")
        return nodes
