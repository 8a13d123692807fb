"""Ray Serve REST client with per-application read-modify-write.

``PUT /api/serve/applications/`` replaces the *whole* set of applications: any application missing
from the body is deleted. So putting or deleting one application means: read the current declarative
config of every application, change only that one, write the set back. The merge is a pure function
(:func:`upsert_app_config`, :func:`remove_app_config`) so it is unit-tested without Ray; the client
serializes its own read-modify-writes per head with a lock (the sandbox's heads are shared).
"""

from __future__ import annotations

import asyncio
import copy
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._http import RayHTTP

# Serve keeps these per instance; they are carried over unchanged on every PUT.
_INSTANCE_KEYS = ("proxy_location", "http_options", "grpc_options", "target_capacity")
# Applications in these states are on their way out; writing them back would resurrect them.
_GONE_STATES = {"DELETING"}
SERVE_PUT_TIMEOUT_S = 60.0
"""Deadline of a Serve PUT: Serve answers once the controller accepted the new config."""


@dataclass(frozen=True)
class DeploymentStatus:
    """One deployment of an application: its health and replica counts."""

    name: str
    status: str
    message: str = ""
    target_replicas: int | None = None
    running_replicas: int = 0
    replica_states: dict[str, int] = field(default_factory=dict)
    replica_ips: frozenset[str] = frozenset()
    """IPs of the Ray nodes that host a replica (any state): a worker pod without one is idle."""


@dataclass(frozen=True)
class ServeApplication:
    """One Serve application as the controller reports it."""

    name: str
    status: str
    message: str = ""
    route_prefix: str | None = None
    source: str | None = None
    deployed_config: dict[str, Any] | None = None
    deployments: dict[str, DeploymentStatus] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.status == "RUNNING"

    @property
    def running_replicas(self) -> int:
        return sum(d.running_replicas for d in self.deployments.values())

    @property
    def target_replicas(self) -> int:
        return sum(d.target_replicas or 0 for d in self.deployments.values())

    @property
    def has_live_replicas(self) -> bool:
        """Replicas run and Serve is not taking them to zero (min replicas 0, no traffic).

        Any HTTP request to the app, the operator's own stats poll included, counts as traffic:
        sent to an app at zero replicas it makes Serve start one, so such an app is never polled.
        """
        targets = [d.target_replicas for d in self.deployments.values() if d.target_replicas is not None]
        return self.running_replicas > 0 and (not targets or sum(targets) > 0)

    @property
    def replica_ips(self) -> frozenset[str]:
        """IPs of the nodes that host a replica of this application."""
        return frozenset(ip for d in self.deployments.values() for ip in d.replica_ips)


@dataclass(frozen=True)
class ServeInstance:
    """The Serve instance of a head: running or not, its options and applications."""

    running: bool
    applications: dict[str, ServeApplication]
    http_options: dict[str, Any] = field(default_factory=dict)
    proxy_location: str | None = None

    @property
    def replica_ips(self) -> frozenset[str]:
        """IPs of every node that hosts a replica of any application."""
        return frozenset(
            ip for a in self.applications.values() for d in a.deployments.values() for ip in d.replica_ips
        )


MAX_REPLICAS_REPORTED = 100_000
"""Replica counts a head reports are clamped to this (it ends up in status)."""
MAX_MESSAGE = 2_000
MAX_REPLICAS_LISTED = 10_000
"""Replica entries read per deployment (an untrusted head could list millions)."""


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _replica_count(value: Any) -> int | None:
    """A replica count from the head, clamped to ``[0, MAX_REPLICAS_REPORTED]``; None if not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:  # nan
        return None
    return int(max(0, min(value, MAX_REPLICAS_REPORTED)))


def _parse_deployment(name: str, data: Mapping[str, Any]) -> DeploymentStatus:
    states: dict[str, int] = {}
    ips: set[str] = set()
    replicas = data.get("replicas")
    for replica in (replicas if isinstance(replicas, list) else [])[:MAX_REPLICAS_LISTED]:
        state = str(_mapping(replica).get("state", "UNKNOWN"))[:64]
        states[state] = states.get(state, 0) + 1
        ip = _mapping(replica).get("node_ip")
        if isinstance(ip, str) and ip:
            ips.add(ip[:64])
    return DeploymentStatus(
        name=str(data.get("name") or name),
        status=str(data.get("status") or "UNKNOWN")[:64],
        message=str(data.get("message") or "")[:MAX_MESSAGE],
        target_replicas=_replica_count(data.get("target_num_replicas")),
        running_replicas=states.get("RUNNING", 0),
        replica_states=states,
        replica_ips=frozenset(ips),
    )


def parse_serve_details(payload: Mapping[str, Any]) -> ServeInstance:
    """A :class:`ServeInstance` from ``GET /api/serve/applications/`` (defensive: all optional;
    parts of the wrong type are ignored, numbers clamped, strings shortened)."""
    apps: dict[str, ServeApplication] = {}
    for name, raw in _mapping(payload.get("applications")).items():
        app = _mapping(raw)
        deployments = {
            str(dname): _parse_deployment(str(dname), _mapping(d))
            for dname, d in _mapping(app.get("deployments")).items()
        }
        route, source, config = app.get("route_prefix"), app.get("source"), app.get("deployed_app_config")
        apps[str(name)] = ServeApplication(
            name=str(app.get("name") or name),
            status=str(app.get("status") or "UNKNOWN")[:64],
            message=str(app.get("message") or "")[:MAX_MESSAGE],
            route_prefix=route if isinstance(route, str) else None,
            source=source if isinstance(source, str) else None,
            deployed_config=dict(config) if isinstance(config, Mapping) else None,
            deployments=deployments,
        )
    proxy = payload.get("proxy_location")
    return ServeInstance(
        running=bool(payload.get("controller_info")),
        applications=apps,
        http_options=dict(_mapping(payload.get("http_options"))),
        proxy_location=proxy if isinstance(proxy, str) else None,
    )


def current_deploy_config(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The PUT body that would redeploy exactly what runs now (declarative apps only).

    Applications deployed imperatively (``serve.run``) have no declarative config; Serve refuses a
    declarative PUT while they exist, so they are left out and the PUT's error surfaces.
    """
    body: dict[str, Any] = {}
    if payload.get("controller_info"):  # Serve runs: keep its instance options as they are
        body.update({k: copy.deepcopy(payload[k]) for k in _INSTANCE_KEYS if payload.get(k) is not None})
    body["applications"] = [
        copy.deepcopy(app["deployed_app_config"])
        for app in (payload.get("applications") or {}).values()
        if app.get("deployed_app_config") and app.get("status") not in _GONE_STATES
    ]
    return body


def _with_defaults(body: dict[str, Any], defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    for key, value in (defaults or {}).items():
        body.setdefault(key, copy.deepcopy(value))
    return body


def upsert_app_config(
    payload: Mapping[str, Any],
    app_config: Mapping[str, Any],
    *,
    instance_defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """PUT body: the current config with ``app_config`` replacing (in place) or added after the rest.

    ``instance_defaults`` (``http_options``, ``proxy_location``) apply only while Serve is not
    running yet: Serve ignores HTTP options of a running instance.
    """
    name = app_config.get("name")
    if not name:
        raise ValueError("app_config needs a 'name'")
    body = _with_defaults(current_deploy_config(payload), instance_defaults)
    apps: list[dict[str, Any]] = body["applications"]
    new = copy.deepcopy(dict(app_config))
    for i, app in enumerate(apps):
        if app.get("name") == name:
            apps[i] = new
            break
    else:
        apps.append(new)
    return body


def remove_app_config(payload: Mapping[str, Any], name: str) -> dict[str, Any]:
    """PUT body: the current config without application ``name``."""
    body = current_deploy_config(payload)
    body["applications"] = [app for app in body["applications"] if app.get("name") != name]
    return body


def app_config_unchanged(payload: Mapping[str, Any], app_config: Mapping[str, Any]) -> bool:
    """True when ``app_config`` is exactly what Serve already deployed (so no PUT is needed)."""
    app = (payload.get("applications") or {}).get(app_config.get("name"))
    if not isinstance(app, Mapping):
        return False
    return app.get("status") not in _GONE_STATES and app.get("deployed_app_config") == dict(app_config)


_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _lock_for(url: str) -> asyncio.Lock:
    # One lock per head URL (and event loop) in this process: two reconciles of apps on one
    # (sandbox) head must not interleave their read-modify-writes and drop each other's app.
    per_loop = _locks.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(url, asyncio.Lock())


class ServeAPI:
    """``/api/serve/applications/`` of one head."""

    def __init__(self, http: RayHTTP) -> None:
        self._http = http

    async def _put(self, body: dict[str, Any]) -> None:
        await self._http.request(
            "PUT", "/api/serve/applications/", json=body, timeout=SERVE_PUT_TIMEOUT_S,
            deadline_s=SERVE_PUT_TIMEOUT_S,
        )  # fmt: skip

    async def details(self) -> dict[str, Any]:
        """The raw ``GET /api/serve/applications/`` answer (instance + apps + deployments)."""
        return await self._http.get_object("/api/serve/applications/")

    async def get_applications(self) -> ServeInstance:
        """Serve's state: whether it runs, and every application's status and replica counts."""
        path = "/api/serve/applications/"
        instance: ServeInstance = self._http.parsed(parse_serve_details, await self.details(), "GET", path)
        return instance

    async def get_application(self, name: str) -> ServeApplication | None:
        """One application's status, or None when it is not deployed."""
        return (await self.get_applications()).applications.get(name)

    async def start(self, instance_options: Mapping[str, Any]) -> bool:
        """Start Serve with ``instance_options`` (``http_options``, ``proxy_location``) if it is not
        running; True if this call started it. Serve cannot change these options later."""
        async with _lock_for(self._http.base_url):
            if (await self.get_applications()).running:
                return False
            await self._put({**copy.deepcopy(dict(instance_options)), "applications": []})
            return True

    async def put_application(
        self,
        name: str,
        app_config: Mapping[str, Any],
        *,
        instance_defaults: Mapping[str, Any] | None = None,
    ) -> bool:
        """Deploy or update application ``name`` and keep every other application as it is.

        ``app_config`` is one entry of Serve's ``applications`` list (``import_path``, ``args``,
        ``route_prefix``, ``runtime_env``, ``deployments``...); its ``name`` is set to ``name``.
        ``instance_defaults`` (e.g. ``{"http_options": {"host": "0.0.0.0", "port": 8000}}``) are
        used only if this PUT starts Serve. Returns False when the same config is already deployed
        (no PUT sent, so a reconcile loop does not redeploy), True when it was written.
        """
        config = {**app_config, "name": name}
        async with _lock_for(self._http.base_url):
            current = await self.details()
            path = "/api/serve/applications/"
            if self._http.parsed(lambda c: app_config_unchanged(c, config), current, "GET", path):
                return False
            body = self._http.parsed(
                lambda c: upsert_app_config(c, config, instance_defaults=instance_defaults),
                current,
                "GET",
                path,
            )
            await self._put(body)
            return True

    async def delete_application(self, name: str) -> bool:
        """Remove application ``name`` only; False when it was not deployed (no PUT sent)."""
        async with _lock_for(self._http.base_url):
            current = await self.details()
            if name not in _mapping(current.get("applications")):
                return False
            body = self._http.parsed(
                lambda c: remove_app_config(c, name), current, "GET", "/api/serve/applications/"
            )
            await self._put(body)
            return True
