"""How a controller reaches one resource's Ray head: address (from the topology), token, client.

The controllers see Ray only through the :class:`RayAPI` protocol, handed out by a
:class:`RayProvider` (production: :class:`PooledRay`, one pooled ``RayClient`` per head; tests: an
in-memory fake). Addresses come from the :data:`~llmray.controllers.topology.Topology` chosen at start-up.

The token the pods read from Secret ``<name>-ray-auth`` (key ``auth_token``) is derived from the
operator's key and the resource's identity (:func:`llmray.builders.cluster.derive_auth_token`), so
the operator recomputes it instead of reading the Secret; a shared head (the sandbox) has one token
for every resource. A head that refuses the token (401/403) loses its pooled client, so the next
pass reconnects.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from llmray.api.telemetry import ServingStats
from llmray.builders.cluster import derive_auth_token
from llmray.builders.common import Owner
from llmray.ray import (
    RayClient,
    RayError,
    RayHeadUnavailable,
    RayNode,
    RetryPolicy,
    pooled_client,
    serve_route,
)
from llmray.ray._http import RayHTTP
from llmray.ray.cluster import ClusterStatus
from llmray.ray.endpoints import HeadEndpoints, ServeRoute
from llmray.ray.jobs import JobInfo, Submission
from llmray.ray.serve import ServeApplication
from llmray.ray.serving import fetch_model_ids, fetch_serving_stats, stats_http

from .machines import RayProblem
from .store import Key
from .topology import Topology

logger = logging.getLogger("llmray.controllers.ray")
# httpx logs every request at INFO: one line per poll of every resource is noise in the operator log.
logging.getLogger("httpx").setLevel(logging.WARNING)

# Polls retry once: the next pass comes in seconds anyway, and a head that is down (or a name
# that does not resolve, an operator outside the cluster) must not hold a worker for long.
POLL_RETRY = RetryPolicy(attempts=2, backoff_s=0.3, max_backoff_s=1.0)


# --- what the controllers call on a head (RayClient satisfies it; tests pass a fake) -------------


class JobsAPI(Protocol):
    async def find(self, submission_id: str) -> JobInfo | None: ...
    async def submit(
        self,
        entrypoint: str,
        *,
        submission_id: str,
        runtime_env: Mapping[str, Any] | None = ...,
        metadata: Mapping[str, str] | None = ...,
    ) -> Submission: ...
    async def tail(
        self, submission_id: str, *, lines: int = ..., driver_node_id: str | None = ...
    ) -> str: ...
    async def stop(self, submission_id: str) -> bool: ...


class ServeAPI(Protocol):
    async def put_application(
        self, name: str, app_config: Mapping[str, Any], *, instance_defaults: Mapping[str, Any] | None = ...
    ) -> bool: ...
    async def get_application(self, name: str) -> ServeApplication | None: ...
    async def delete_application(self, name: str) -> bool: ...


class ClusterAPI(Protocol):
    async def status(self) -> ClusterStatus: ...
    async def nodes(self) -> list[RayNode]: ...


class RayAPI(Protocol):
    """One head's Jobs, Serve and cluster-status APIs."""

    @property
    def jobs(self) -> JobsAPI: ...
    @property
    def serve(self) -> ServeAPI: ...
    @property
    def cluster(self) -> ClusterAPI: ...


class ServingAPI(Protocol):
    """One Serve application's stats route."""

    async def stats(self) -> ServingStats | None: ...

    async def models(self) -> list[str]: ...


class RayProvider(Protocol):
    """Hands out a :class:`RayAPI` per head; drops it when the head refuses its token."""

    def client(self, key: Key, head: Head) -> RayAPI: ...
    def serving(self, url: str, api_key: str | None) -> ServingAPI:
        """The stats route of the Serve app at ``url`` (its route's base URL), with its API key."""
        ...

    def forget(self, key: Key) -> None: ...
    async def aclose(self) -> None: ...


# --- heads ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """Where one resource's head is and what it takes to call it."""

    endpoints: HeadEndpoints
    token: str | None

    @property
    def dashboard_url(self) -> str:
        return self.endpoints.dashboard_url

    @property
    def shared(self) -> bool:
        return self.endpoints.shared

    def route(self, name: str, namespace: str) -> ServeRoute:
        return serve_route(name, namespace, self.endpoints)


class PooledRay:
    """Production :class:`RayProvider`: one connection pool for every head, one client per head.

    All ``RayClient`` objects share one long-lived ``httpx.AsyncClient``
    (:func:`llmray.ray.pooled_client`), so a pass reuses the connections of the previous one instead
    of opening new ones. Clients are keyed by (dashboard URL, token) and shared by the resources
    using that head (all of them on a shared head); one nobody uses any more is dropped.
    """

    def __init__(self, retry: RetryPolicy = POLL_RETRY) -> None:
        self._retry = retry
        self._http: httpx.AsyncClient | None = None
        self._clients: dict[tuple[str, str | None], RayClient] = {}
        self._users: dict[Key, tuple[str, str | None]] = {}

    def client(self, key: Key, head: Head) -> RayClient:
        target = (head.dashboard_url, head.token)
        previous = self._users.get(key)
        self._users[key] = target
        if previous is not None and previous != target:
            self._release(previous)
        found = self._clients.get(target)
        if found is None:
            if self._http is None:
                self._http = pooled_client()
            found = RayClient(head.dashboard_url, head.token, retry=self._retry, client=self._http)
            self._clients[target] = found
        return found

    def serving(self, url: str, api_key: str | None) -> ServingAPI:
        if self._http is None:
            self._http = pooled_client()
        return _Serving(stats_http(url, api_key, self._http))

    def forget(self, key: Key) -> None:
        previous = self._users.pop(key, None)
        if previous is not None:
            self._release(previous)

    def _release(self, target: tuple[str, str | None]) -> None:
        if target not in self._users.values():
            self._clients.pop(target, None)  # the shared pool stays open: nothing to close

    def __len__(self) -> int:
        return len(self._clients)

    async def aclose(self) -> None:
        self._clients.clear()
        self._users.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None


@dataclass(frozen=True)
class _Serving:
    http: RayHTTP

    async def stats(self) -> ServingStats | None:
        return await fetch_serving_stats(self.http)

    async def models(self) -> list[str]:
        return await fetch_model_ids(self.http)


class Heads:
    """Everything a controller needs to reach the head of a resource: topology, tokens, clients."""

    def __init__(self, topology: Topology, provider: RayProvider, auth_key: bytes) -> None:
        self.topology = topology
        self.provider = provider
        self._auth_key = auth_key

    def token(self, key: Key, uid: str) -> str:
        """The Ray token of resource ``key`` (incarnation ``uid``): the shared head's, or derived."""
        return self.topology.token or derive_auth_token(
            self._auth_key, Owner(kind=key[0], namespace=key[1], name=key[2], uid=uid)
        )

    def head(self, key: Key, uid: str) -> Head:
        return Head(self.topology.head(key[2], key[1]), self.token(key, uid))

    def client(self, key: Key, head: Head) -> RayAPI:
        return self.provider.client(key, head)

    def serving(self, url: str, api_key: str | None) -> ServingAPI:
        return self.provider.serving(url, api_key)

    def refused(self, key: Key) -> None:
        """The head answered 401/403: drop its client (the next pass reconnects)."""
        self.provider.forget(key)

    def forget(self, key: Key) -> None:
        self.provider.forget(key)


R_HEAD_UNAVAILABLE = "RayHeadUnavailable"
R_RAY_API_ERROR = "RayAPIError"


def ray_problem(exc: RayError, head: Head) -> RayProblem:
    """How an unreachable or refusing head is reported (condition reason and status message)."""
    if isinstance(exc, RayHeadUnavailable):
        return RayProblem(
            R_HEAD_UNAVAILABLE, f"cannot reach the Ray head at {head.dashboard_url}: {short(exc)}; retrying"
        )
    return RayProblem(
        R_RAY_API_ERROR, f"Ray head at {head.dashboard_url} refused a request: {short(exc)}; retrying"
    )


def short(exc: BaseException) -> str:
    """An error for status messages (one line, bounded)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


__all__ = [
    "POLL_RETRY",
    "Head",
    "Heads",
    "PooledRay",
    "RayAPI",
    "RayProvider",
    "ray_problem",
    "short",
]
