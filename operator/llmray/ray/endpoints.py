"""Where the operator finds a cluster's Ray head, and the ids it gives Ray jobs.

In a cluster the operator reaches each head by its Service DNS name. An operator running outside
the cluster (the sandbox, a developer laptop with port-forwards) cannot resolve those names, so two
environment variables override the addresses for every cluster:

``LLMRAY_RAY_DASHBOARD_URL``
    Dashboard (Jobs/Serve/cluster REST) base URL, e.g. ``http://127.0.0.1:8265``.
``LLMRAY_RAY_SERVE_URL``
    Serve HTTP base URL, e.g. ``http://127.0.0.1:8000``.

Both may contain ``{name}`` and ``{namespace}`` placeholders (a template per cluster, e.g.
``http://{name}-head.{namespace}.example.internal:8265``); without placeholders one URL serves every
cluster, which is what the sandbox does with its single local head.
``LLMRAY_SANDBOX_RAY_TOKEN`` makes every auth Secret carry that token, so resources created in the
sandbox can talk to the one shared head (see :func:`sandbox_token`).
"""

from __future__ import annotations

import hashlib
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass

DASHBOARD_URL_ENV = "LLMRAY_RAY_DASHBOARD_URL"
SERVE_URL_ENV = "LLMRAY_RAY_SERVE_URL"
SANDBOX_TOKEN_ENV = "LLMRAY_SANDBOX_RAY_TOKEN"

DASHBOARD_PORT = 8265
SERVE_PORT = 8000
DEFAULT_DASHBOARD_TEMPLATE = "http://{name}-head.{namespace}.svc:" + str(DASHBOARD_PORT)
DEFAULT_SERVE_TEMPLATE = "http://{name}-serve.{namespace}.svc:" + str(SERVE_PORT)
_PLACEHOLDERS = {"name", "namespace"}
SUBMISSION_ID_MAX = 63


@dataclass(frozen=True)
class HeadEndpoints:
    """Base URLs of one Ray cluster's dashboard and Serve HTTP proxy (no trailing slash)."""

    dashboard_url: str
    serve_url: str
    overridden: bool = False
    shared: bool = False  # one head serves every cluster (an override without placeholders)


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def _render(template: str, env_name: str, name: str, namespace: str) -> str:
    unknown = _fields(template) - _PLACEHOLDERS
    if unknown:
        raise ValueError(
            f"{env_name}={template!r}: unknown placeholder(s) {sorted(unknown)}; "
            "only {name} and {namespace} are allowed"
        )
    url = template.format(name=name, namespace=namespace).rstrip("/")
    if not re.match(r"^https?://[^/]+", url):
        raise ValueError(f"{env_name}={template!r} is not an http(s) URL")
    return url


def resolve_head(name: str, namespace: str, env: Mapping[str, str] | None = None) -> HeadEndpoints:
    """The dashboard and Serve URLs of cluster ``name`` in ``namespace`` (env overrides first)."""
    env = os.environ if env is None else env
    dash_t = env.get(DASHBOARD_URL_ENV) or DEFAULT_DASHBOARD_TEMPLATE
    serve_t = env.get(SERVE_URL_ENV) or DEFAULT_SERVE_TEMPLATE
    return HeadEndpoints(
        dashboard_url=_render(dash_t, DASHBOARD_URL_ENV, name, namespace),
        serve_url=_render(serve_t, SERVE_URL_ENV, name, namespace),
        overridden=bool(env.get(DASHBOARD_URL_ENV) or env.get(SERVE_URL_ENV)),
        shared=bool(env.get(DASHBOARD_URL_ENV)) and not _fields(dash_t),
    )


@dataclass(frozen=True)
class ServeRoute:
    """Where one LLMDeployment's Serve application lives on its head."""

    app_name: str
    route_prefix: str
    url: str  # serve_url + route_prefix, without a trailing slash


def serve_route(name: str, namespace: str, head: HeadEndpoints) -> ServeRoute:
    """Serve application name and route prefix of LLMDeployment ``namespace/name``.

    Its own head serves only it: application ``name`` at ``/``. A shared head (the sandbox) serves
    every deployment behind one proxy, where Serve requires unique names and route prefixes: the
    application is ``<namespace>-<name>`` at ``/<namespace>/<name>``.
    """
    if head.shared:
        prefix = f"/{namespace}/{name}"
        return ServeRoute(f"{namespace}-{name}", prefix, head.serve_url + prefix)
    return ServeRoute(name, "/", head.serve_url)


def sandbox_token(env: Mapping[str, str] | None = None) -> str | None:
    """The token every auth Secret must carry in the sandbox (one shared head), else None."""
    env = os.environ if env is None else env
    return env.get(SANDBOX_TOKEN_ENV) or None


def _dns_safe(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def submission_id(namespace: str, name: str, uid: str, attempt: int) -> str:
    """Deterministic Ray job submission id of one training attempt.

    Stable across operator restarts (so a resubmission after a crash hits Ray's "already exists"
    and adopts the running job instead of starting a second one), unique per resource incarnation
    (the uid digest: a deleted and recreated resource never adopts the old job), DNS-safe and at
    most 63 characters; the readable prefix is truncated first.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    digest = hashlib.sha256(f"{namespace}/{name}/{uid}".encode()).hexdigest()[:10]
    suffix = f"-{digest}-{attempt}"
    prefix = _dns_safe(f"{namespace}-{name}")[: SUBMISSION_ID_MAX - len(suffix)].rstrip("-") or "llmray"
    return prefix + suffix
