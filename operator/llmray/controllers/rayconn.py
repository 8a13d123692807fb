"""How a controller reaches one resource's Ray head: address (with the env overrides) and token.

The token lives in Secret ``<name>-ray-auth`` (key ``auth_token``). The watch cache keeps only the
Secret's name and uid, so the token is read from the API the first time a head is contacted and kept
per Secret uid (a recreated Secret has a new uid and a new token). A deleted resource's entry is
dropped with it.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

from llmray.builders.common import auth_secret_name
from llmray.kube import Kube
from llmray.ray import NO_RETRY, RayClient, RetryPolicy, resolve_head, sandbox_token, serve_route
from llmray.ray.endpoints import HeadEndpoints, ServeRoute

from .store import Key

logger = logging.getLogger("llmray.controllers.ray")
# httpx logs every request at INFO: one line per poll of every resource is noise in the operator log.
logging.getLogger("httpx").setLevel(logging.WARNING)

AUTH_TOKEN_KEY = "auth_token"
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
    """Ray auth tokens by ``(key, Secret uid)``."""

    def __init__(self) -> None:
        self._tokens: dict[Key, tuple[str, str]] = {}

    def forget(self, key: Key) -> None:
        self._tokens.pop(key, None)

    async def token(self, kube: Kube, key: Key, auth_uid: str) -> str | None:
        cached = self._tokens.get(key)
        if cached is not None and cached[0] == auth_uid:
            return cached[1]
        secret = await kube.read("Secret", key[1], auth_secret_name(key[2]))
        if secret is None:
            return sandbox_token()
        raw = (secret.get("data") or {}).get(AUTH_TOKEN_KEY)
        token = base64.b64decode(raw).decode() if raw else sandbox_token()
        uid = str((secret.get("metadata") or {}).get("uid") or auth_uid)
        if token:
            self._tokens[key] = (uid, token)
        return token


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
