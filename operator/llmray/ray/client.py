""":class:`RayClient`: one authenticated connection to a Ray head with its three APIs."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

import httpx

from ._http import DEFAULT_RETRY, DEFAULT_TIMEOUT, RayHTTP, RetryPolicy
from .cluster import ClusterAPI
from .endpoints import resolve_head
from .jobs import JobsAPI
from .serve import ServeAPI


class RayClient:
    """Async client of a Ray head's dashboard REST API.

    Use as ``async with RayClient(url, token) as ray: await ray.jobs.get(...)``. Every call has a
    timeout and bounded retries; failures raise :class:`~llmray.ray.errors.RayHeadUnavailable`
    (no answer) or :class:`~llmray.ray.errors.RayAPIError` (an error answer).
    """

    def __init__(
        self,
        dashboard_url: str,
        token: str | None,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.http = RayHTTP(dashboard_url, token, timeout=timeout, retry=retry, transport=transport)
        self.jobs = JobsAPI(self.http)
        self.serve = ServeAPI(self.http)
        self.cluster = ClusterAPI(self.http)

    @classmethod
    def for_cluster(
        cls, name: str, namespace: str, token: str | None, *, env: Mapping[str, str] | None = None
    ) -> RayClient:
        """A client for the head of Ray cluster ``name`` (address from :func:`resolve_head`)."""
        return cls(resolve_head(name, namespace, env).dashboard_url, token)

    @property
    def dashboard_url(self) -> str:
        return self.http.base_url

    async def version(self) -> str:
        """The head's Ray version; a cheap liveness and auth check."""
        data = await self.http.get_json("/api/version")
        return str(data.get("ray_version", ""))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> RayClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
