"""Where the operator finds each resource's Ray head: the topology, chosen once at start-up.

It is built from the operator's settings (``llmray operator``
flags) and passed to the controllers; nothing reads the environment during a reconcile:

:class:`PerResourceHeads` (the default)
    every resource has its own head, reached at its in-cluster Service
    (``http://<name>-head.<ns>.svc.cluster.local:8265``) with the token of its own
    ``<name>-ray-auth`` Secret. Templates with ``{name}``/``{namespace}`` placeholders move the
    addresses (an operator outside the cluster reaching heads through an ingress).
:class:`SharedHead`
    one head serves every resource (the sandbox, the e2e tier): a fixed dashboard and Serve URL,
    and one token that every auth Secret carries.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import ClassVar

from llmray.builders.common import DASHBOARD_PORT, SERVE_PORT
from llmray.ray.endpoints import HeadEndpoints

DEFAULT_DASHBOARD_TEMPLATE = "http://{name}-head.{namespace}.svc.cluster.local:" + str(DASHBOARD_PORT)
DEFAULT_SERVE_TEMPLATE = "http://{name}-serve.{namespace}.svc.cluster.local:" + str(SERVE_PORT)
_PLACEHOLDERS = {"name", "namespace"}


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def check_url(template: str, what: str, *, placeholders: bool) -> str:
    """``template`` without a trailing slash; ValueError naming ``what`` when it is unusable."""
    fields = _fields(template)
    unknown = fields - _PLACEHOLDERS if placeholders else fields
    if unknown:
        allowed = "only {name} and {namespace} are allowed" if placeholders else "none are allowed here"
        raise ValueError(f"{what}={template!r}: unknown placeholder(s) {sorted(unknown)}; {allowed}")
    sample = template.format(name="n", namespace="ns") if fields else template
    if not re.match(r"^https?://[^/]+", sample):
        raise ValueError(f"{what}={template!r} is not an http(s) URL")
    return template.rstrip("/")


@dataclass(frozen=True)
class PerResourceHeads:
    """Each resource has its own head; addresses from templates (default: in-cluster Services)."""

    dashboard_template: str = DEFAULT_DASHBOARD_TEMPLATE
    serve_template: str = DEFAULT_SERVE_TEMPLATE
    shared: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_url(self.dashboard_template, "dashboard URL", placeholders=True)
        check_url(self.serve_template, "serve URL", placeholders=True)

    @property
    def token(self) -> str | None:
        """No fixed token: each head's comes from its resource's auth Secret."""
        return None

    def head(self, name: str, namespace: str) -> HeadEndpoints:
        overridden = (self.dashboard_template, self.serve_template) != (
            DEFAULT_DASHBOARD_TEMPLATE,
            DEFAULT_SERVE_TEMPLATE,
        )
        return HeadEndpoints(
            dashboard_url=self.dashboard_template.format(name=name, namespace=namespace).rstrip("/"),
            serve_url=self.serve_template.format(name=name, namespace=namespace).rstrip("/"),
            overridden=overridden,
        )


@dataclass(frozen=True)
class SharedHead:
    """One head for every resource (the sandbox): fixed URLs, and the token all auth Secrets carry."""

    dashboard_url: str
    serve_url: str
    token: str | None = None
    shared: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_url(self.dashboard_url, "dashboard URL", placeholders=False)
        check_url(self.serve_url, "serve URL", placeholders=False)

    def head(self, name: str, namespace: str) -> HeadEndpoints:
        return HeadEndpoints(
            dashboard_url=self.dashboard_url.rstrip("/"),
            serve_url=self.serve_url.rstrip("/"),
            overridden=True,
            shared=True,
        )


Topology = PerResourceHeads | SharedHead


def topology_of(dashboard_url: str | None, serve_url: str | None, token: str | None) -> Topology:
    """The topology from the operator's settings (flags, or their environment fallbacks).

    - nothing set: :class:`PerResourceHeads` at the in-cluster addresses;
    - URLs with ``{name}``/``{namespace}``: :class:`PerResourceHeads` at those templates;
    - a dashboard URL without placeholders: :class:`SharedHead` (the Serve URL is then required).
    """
    if not dashboard_url:
        if token:
            raise ValueError("a shared-head token needs a shared head: set the dashboard URL too")
        return PerResourceHeads(serve_template=serve_url or DEFAULT_SERVE_TEMPLATE)
    if _fields(dashboard_url):
        if token:
            raise ValueError("a shared-head token needs a dashboard URL without {name}/{namespace}")
        return PerResourceHeads(dashboard_url, serve_url or DEFAULT_SERVE_TEMPLATE)
    if not serve_url:
        raise ValueError("a shared head (dashboard URL without placeholders) needs its Serve URL too")
    return SharedHead(dashboard_url, serve_url, token or None)
