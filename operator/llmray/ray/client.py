""":class:`RayClient`: one authenticated connection to a Ray head with its three APIs."""

from __future__ import annotations

from types import TracebackType
from typing import Unpack

from ._http import HTTPOptions, RayHTTP
from .cluster import ClusterAPI
from .jobs import JobsAPI
from .serve import ServeAPI


class RayClient:
    """Async client of a Ray head's dashboard REST API.

    Use as ``async with RayClient(url, token) as ray: await ray.jobs.get(...)``. Every call has an
    overall deadline (``deadline_s``), a size cap on its answer (``max_body_bytes``) and bounded
    retries; failures raise :class:`~llmray.ray.errors.RayHeadUnavailable` (no complete answer in
    time) or :class:`~llmray.ray.errors.RayAPIError` (an error or unusable answer). Pass a shared
    ``client`` (:func:`llmray.ray.pooled_client`) to reuse connections across passes and heads;
    closing this object then leaves the shared pool open.
    """

    def __init__(self, dashboard_url: str, token: str | None, **options: Unpack[HTTPOptions]) -> None:
        """``options``: timeout, retry, transport or a shared client, deadline_s, max_body_bytes."""
        self.http = RayHTTP(dashboard_url, token, **options)
        self.jobs = JobsAPI(self.http)
        self.serve = ServeAPI(self.http)
        self.cluster = ClusterAPI(self.http)

    @property
    def dashboard_url(self) -> str:
        return self.http.base_url

    async def version(self) -> str:
        """The head's Ray version; a cheap liveness and auth check."""
        data = await self.http.get_object("/api/version")
        return str(data.get("ray_version", ""))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> RayClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
