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

from collections.abc import Mapping, Sequence
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


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _shape(value: Any) -> dict[str, float] | None:
    if not isinstance(value, Mapping):
        return None
    shape = {str(k): n for k, v in value.items() if (n := _number(v)) is not None and n > 0}
    return shape or None


def _count(value: Any) -> int:
    n = _number(value)
    return max(0, int(n)) if n is not None else 1


def _shape_counts(entries: Any) -> tuple[ResourceDemand, ...]:
    """``[[shape, count], ...]`` (or ``[shape, ...]``) into demands; malformed entries skipped."""
    out: list[ResourceDemand] = []
    for entry in entries or []:
        if isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2:
            shape, count = _shape(entry[0]), _count(entry[1])
        else:
            shape, count = _shape(entry), 1
        if shape and count > 0:
            out.append(ResourceDemand(shape, count))
    return tuple(out)


def _gangs(entries: Any) -> tuple[GangDemand, ...]:
    out: list[GangDemand] = []
    for entry in entries or []:
        if not (isinstance(entry, Sequence) and len(entry) == 2 and isinstance(entry[0], Mapping)):
            continue
        pg, count = entry[0], _count(entry[1])
        bundles = _shape_counts(pg.get("bundles"))
        if bundles and count > 0:
            out.append(GangDemand(bundles, str(pg.get("strategy") or "PACK").upper(), count))
    return tuple(out)


def _usage(usage: Any) -> tuple[dict[str, float], dict[str, float]]:
    total: dict[str, float] = {}
    used: dict[str, float] = {}
    if not isinstance(usage, Mapping):
        return total, used
    for key, pair in usage.items():
        if isinstance(pair, Sequence) and len(pair) == 2:
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
        return ClusterStatus(reported=False, autoscaler_error=error)
    lm = _get(cluster, "loadMetricsReport", "load_metrics_report")
    idle = _get(_get(cluster, "autoscalerReport", "autoscaler_report"), "idleNodes", "idle_nodes")
    total, used = _usage(_get(lm, "usage"))
    return ClusterStatus(
        demand=_shape_counts(_get(lm, "resourceDemand", "resource_demand")),
        gang_demand=_gangs(_get(lm, "pgDemand", "pg_demand")),
        requested=_shape_counts(_get(lm, "requestDemand", "request_demand")),
        total=total,
        used=used,
        idle_nodes=tuple(map(str, idle)) if isinstance(idle, list | tuple | Mapping) else None,
        autoscaler_error=error,
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


def _parse_node(raylet: Mapping[str, Any]) -> RayNode | None:
    node_id = raylet.get("nodeId") or raylet.get("node_id")
    if not node_id:
        return None
    snap = raylet.get("stateSnapshot") or raylet.get("state_snapshot") or {}
    idle_ms = _number(snap.get("idleDurationMs", snap.get("idle_duration_ms")))
    idle = idle_ms / 1000 if str(snap.get("state", "")).upper() == "IDLE" and idle_ms is not None else None
    total = raylet.get("resourcesTotal") or raylet.get("resources_total") or {}
    resources = {_USAGE_KEY_FIXES.get(k, k): n for k, v in total.items() if (n := _number(v)) is not None}
    return RayNode(
        node_id=str(node_id),
        ip=str(raylet.get("nodeManagerAddress") or raylet.get("node_ip") or ""),
        is_head=bool(raylet.get("isHeadNode", raylet.get("is_head_node", False))),
        alive=str(raylet.get("state", "")).upper() == "ALIVE",
        idle_seconds=idle,
        labels={str(k): str(v) for k, v in (raylet.get("labels") or {}).items()},
        resources_total=resources,
        start_time_s=start_ms / 1000
        if (start_ms := _number(_get(raylet, "startTimeMs", "start_time_ms")))
        else None,
    )


def parse_nodes(payload: Mapping[str, Any]) -> list[RayNode]:
    """Nodes from ``GET /nodes?view=summary``; ``idle_seconds`` is None unless Ray says IDLE."""
    nodes: list[RayNode] = []
    for item in _get(_data(payload), "summary") or []:
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
        return parse_cluster_status(await self._http.get_json("/api/cluster_status"))

    async def nodes(self) -> list[RayNode]:
        """Every node the head knows, with idle time and labels."""
        return parse_nodes(await self._http.get_json("/nodes", params={"view": "summary"}))
