"""One authenticated HTTP transport to a Ray head, with timeouts and bounded retries.

Every call of the jobs, serve and cluster clients goes through :meth:`RayHTTP.request`, so the
retry and error rules live in one place: transport errors and 5xx answers are retried with
exponential backoff (jittered) a bounded number of times; 4xx answers are final. The token is
sent as ``Authorization: Bearer`` and never appears in an exception or log line.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from .errors import RayHeadUnavailable, api_error

log = logging.getLogger(__name__)

# Generous reads: a loaded 2-core head answers slowly; connect stays short so "head down" is fast.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=3.0)
MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is retried (total sleep ~ backoff * (2**attempts - 1))."""

    attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 4.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based): exponential, half-jittered."""
        base = min(self.max_backoff_s, self.backoff_s * (2**retry))
        return base * (0.5 + random.random() / 2)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)


def auth_headers(token: str | None) -> dict[str, str]:
    """Headers for a token-auth Ray head (none when auth is off)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


class RayHTTP:
    """Thin wrapper over ``httpx.AsyncClient`` bound to one head's dashboard URL."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=auth_headers(token),
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
        timeout: httpx.Timeout | float | None = None,
        final: Callable[[httpx.Response], bool] | None = None,
    ) -> httpx.Response:
        """Send a request and return a 2xx response, retrying transient failures.

        ``final(response)`` marks a 5xx answer as not worth retrying (e.g. Ray's "job already
        exists", which it reports as HTTP 500). Raises :class:`RayHeadUnavailable` when no answer
        came, or a :class:`~llmray.ray.errors.RayAPIError` subclass for an error status.
        """
        url = f"{self.base_url}{path}"
        kwargs: dict[str, Any] = {"json": json, "params": params}
        if timeout is not None:
            kwargs["timeout"] = timeout
        for attempt in range(self.retry.attempts):
            last = attempt == self.retry.attempts - 1
            try:
                response = await self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # connect/read errors and timeouts
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if last:
                    raise RayHeadUnavailable(self.base_url, reason) from exc
                log.debug("%s %s failed (%s); retrying", method, url, reason)
            else:
                if response.is_success:
                    return response
                body = response.text[:MAX_ERROR_BODY]
                retryable = response.status_code >= 500 and not (final and final(response))
                if last or not retryable:
                    raise api_error(method, url, response.status_code, body)
                log.debug("%s %s -> HTTP %s; retrying", method, url, response.status_code)
            await asyncio.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable: the retry loop returns or raises")  # pragma: no cover

    async def get_json(self, path: str, **kwargs: Any) -> Any:
        """GET ``path`` and decode its JSON body (a non-JSON 2xx body is an API error)."""
        response = await self.request("GET", path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            url = f"{self.base_url}{path}"
            raise api_error("GET", url, response.status_code, "not JSON: " + response.text[:200]) from exc
