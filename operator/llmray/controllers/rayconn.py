"""How a controller reaches one resource's Ray head: address (with the env overrides) and token.

The token the pods read from Secret ``<name>-ray-auth`` (key ``auth_token``) is derived from the
operator's key and the resource's identity, so the operator recomputes it instead of reading the
Secret (see :class:`TokenCache`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from llmray.builders.cluster import derive_auth_token
from llmray.builders.common import Owner
from llmray.ray import NO_RETRY, RayClient, RetryPolicy, resolve_head, sandbox_token, serve_route
from llmray.ray.endpoints import HeadEndpoints, ServeRoute

from .store import Key

logger = logging.getLogger("llmray.controllers.ray")
# httpx logs every request at INFO: one line per poll of every resource is noise in the operator log.
logging.getLogger("httpx").setLevel(logging.WARNING)

# Polls retry once: the next pass comes in seconds anyway, and a head that is down (or a name
# that does not resolve, an operator outside the cluster) must not hold a worker for long.
POLL_RETRY = RetryPolicy(attempts=2, backoff_s=0.3, max_backoff_s=1.0)


@dataclass(frozen=True)
class Head:
    """Where one resource's head is and what it takes to call it."""

    endpoints: HeadEndpoints
    dashboard_url: str
    token: str | None

    @property
    def shared(self) -> bool:
        return self.endpoints.shared

    def client(self, retry: RetryPolicy = POLL_RETRY) -> RayClient:
        return RayClient(self.dashboard_url, self.token, retry=retry)

    def route(self, name: str, namespace: str) -> ServeRoute:
        return serve_route(name, namespace, self.endpoints)


class TokenCache:
    """Ray auth tokens, derived from the operator's key (never read back from a Secret).

    Each cluster's token is HMAC(key, kind/namespace/name/uid) (:func:`derive_auth_token`): the
    operator computes it again after a restart, so it needs no permission to read Secrets. The
    sandbox's shared head has one token for every resource (``LLMRAY_SANDBOX_RAY_TOKEN``).
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    def forget(self, key: Key) -> None:
        """Nothing is cached per resource (kept for the controllers' deletion path)."""

    def token(self, key: Key, uid: str) -> str:
        return sandbox_token() or derive_auth_token(
            self._key, Owner(kind=key[0], namespace=key[1], name=key[2], uid=uid)
        )


def head_for(key: Key, in_cluster_dashboard_url: str, token: str | None) -> Head:
    """The head of resource ``key``: the override address when set, else the in-cluster Service."""
    endpoints = resolve_head(key[2], key[1])
    url = endpoints.dashboard_url if endpoints.overridden else in_cluster_dashboard_url
    return Head(endpoints=endpoints, dashboard_url=url, token=token)


def short(exc: BaseException) -> str:
    """An error for status messages (one line, bounded)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


__all__ = ["NO_RETRY", "POLL_RETRY", "Head", "TokenCache", "head_for", "short"]
