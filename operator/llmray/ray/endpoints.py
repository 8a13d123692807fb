"""Where a Ray head's endpoints are, the Serve route of a deployment, and the ids of Ray jobs.

Which head serves which resource (one per resource, or one shared head) is the operator's
topology, chosen at start-up: :mod:`llmray.controllers.topology`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

SUBMISSION_ID_MAX = 63


@dataclass(frozen=True)
class HeadEndpoints:
    """Base URLs of one Ray cluster's dashboard and Serve HTTP proxy (no trailing slash)."""

    dashboard_url: str
    serve_url: str
    overridden: bool = False
    """The addresses are not the in-cluster defaults (status then reports the Serve URL used)."""
    shared: bool = False
    """One head serves every cluster."""


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
