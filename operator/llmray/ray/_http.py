"""One authenticated HTTP transport to a Ray head: deadlines, size caps and bounded retries.

Every call of the jobs, serve and cluster clients goes through :meth:`RayHTTP.request`, so the
rules for an untrusted head live in one place:

- **An overall deadline per call** (``deadline_s``, retries and backoff included), enforced with
  ``asyncio.timeout`` around the whole exchange. httpx's own timeouts are per network operation:
  a head that trickles one byte every few seconds never trips them, but it trips the deadline
  (:class:`~llmray.ray.errors.RayDeadlineExceeded`).
- **A size cap on every read**: bodies are streamed and counted as they arrive (after bounded
  decompression), so a 200 MB answer is refused at the cap
  (:class:`~llmray.ray.errors.RayResponseTooLarge`) without being held in memory. Error bodies
  keep only their first ``MAX_ERROR_BODY`` bytes. A tail read (log files) keeps only the last
  ``max_bytes`` of the answer.
- **Bounded retries**: transport errors and 5xx answers are retried with jittered exponential
  backoff a bounded number of times; 4xx and unusable answers are final.
- **Pooled clients**: pass one long-lived ``httpx.AsyncClient`` (:func:`pooled_client`) to every
  :class:`RayHTTP`; the URL and token go with each request, so one pool serves every head.

The token is sent as ``Authorization: Bearer`` and never appears in an exception or log line.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import logging
import random
import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import httpx

from llmray.metrics import RAY_REQUEST_SECONDS, RAY_REQUESTS, endpoint_label, status_class

from .errors import (
    RayAPIError,
    RayBadResponse,
    RayDeadlineExceeded,
    RayHeadUnavailable,
    RayResponseTooLarge,
    api_error,
)

log = logging.getLogger(__name__)

# Per network operation (connect short, so "head down" is fast; reads patient, a loaded 2-core head
# answers slowly); the deadline bounds the whole call.
DEFAULT_TIMEOUT = httpx.Timeout(15.0, connect=3.0)
DEFAULT_DEADLINE_S = 20.0
"""Overall deadline of one call (all attempts): a poll that takes longer is reported, not awaited."""
DEFAULT_MAX_BODY = 4 * 2**20
"""Size cap of one answer: the largest real answers (nodes of a big cluster, Serve details) are a
few hundred KiB; 8 concurrent reconciles x 4 MiB stays far below the operator's memory limit."""
MAX_JSON_VALUES = 250_000
"""Most JSON values (``[``, ``{`` and ``,`` counted in the raw body) decoded from one answer. The
size cap alone does not bound memory: 4 MiB of ``[],[],...`` decodes to ~1.4 M Python objects
(~90 MB); this keeps one decoded answer to ~20 MB. A /nodes summary of 1,000 nodes is ~100 k."""
MAX_ERROR_BODY = 64 * 1024
_CHUNK = 64 * 1024


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


def pooled_client(
    *,
    max_connections: int = 64,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """A long-lived connection pool to share between every :class:`RayHTTP` (close it at exit)."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport, follow_redirects=False)


@dataclass(frozen=True)
class RayResponse:
    """A complete, size-capped answer of a Ray head (the body is read; the connection released)."""

    status_code: int
    content: bytes | bytearray
    """The body as read (a bytearray is not copied: a copy would double the peak memory)."""
    truncated: bool = False
    """A tail read dropped the start of a longer body."""

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self, max_values: int | None = MAX_JSON_VALUES) -> Any:
        """The decoded JSON body; ``ValueError`` when it is not JSON, absurdly nested, or has more
        than ``max_values`` values (an over-estimate from the raw bytes, checked before decoding)."""
        if max_values is not None:
            body = self.content
            values = body.count(b",") + body.count(b"[") + body.count(b"{")
            if values > max_values:
                raise ValueError(f"more than {max_values} JSON values")
        try:
            return jsonlib.loads(self.content)
        except RecursionError as exc:
            raise ValueError("JSON nested too deeply") from exc


class _Decoder:
    """Content-Encoding decoding with bounded output (a gzip bomb cannot expand past the cap)."""

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        self._z: Any = None
        if encoding in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._z = zlib.decompressobj(zlib.MAX_WBITS)
        elif encoding not in ("", "identity"):
            raise ValueError(f"unsupported Content-Encoding {encoding!r}")

    def decode(self, data: bytes, room: int) -> tuple[bytes, bytes]:
        """Decode ``data`` into at most ``room + 1`` bytes (and at most one chunk at a time); also
        return the input not yet used."""
        if self._z is None:
            return data, b""
        try:
            out: bytes = self._z.decompress(data, min(max(room, 0) + 1, _CHUNK))
        except zlib.error as exc:
            raise ValueError(f"bad compressed body: {exc}") from exc
        return out, self._z.unconsumed_tail


async def _memory(content: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(content), _CHUNK):
        yield content[start : start + _CHUNK]


def _source(response: httpx.Response) -> tuple[_Decoder, AsyncIterator[bytes]]:
    """The body's raw chunks and their decoder (an in-memory answer, e.g. from a test transport,
    is already decoded)."""
    if response.is_stream_consumed:
        return _Decoder(""), _memory(response.content)
    return _Decoder(response.headers.get("content-encoding", "")), response.aiter_raw(_CHUNK)


async def _read_capped(response: httpx.Response, limit: int, *, tail: bool) -> tuple[bytearray, bool]:
    """The body of ``response``, at most ``limit`` bytes after decoding.

    ``tail=False``: more than ``limit`` raises ``OverflowError`` (checked against Content-Length
    first, then while streaming). ``tail=True``: the body is read to its end, keeping only its last
    ``limit`` bytes (returns ``truncated=True`` when bytes were dropped).
    """
    length = response.headers.get("content-length", "")
    if not tail and length.isdigit() and int(length) > limit:
        raise OverflowError
    decoder, source = _source(response)
    buf = bytearray()
    truncated = False
    async for data in source:
        while data:
            out, data = decoder.decode(data, limit if tail else limit - len(buf))
            buf += out
            if len(buf) > limit:
                if not tail:
                    raise OverflowError
                del buf[: len(buf) - limit]
                truncated = True
    return buf, truncated


class HTTPOptions(TypedDict, total=False):
    """Keyword options of :class:`RayHTTP`, passed through unchanged by :class:`~llmray.ray.RayClient`."""

    timeout: httpx.Timeout
    retry: RetryPolicy
    transport: httpx.AsyncBaseTransport | None
    client: httpx.AsyncClient | None
    deadline_s: float
    max_body_bytes: int


class RayHTTP:
    """Calls to one head's dashboard URL, over an owned or a shared (pooled) ``httpx.AsyncClient``."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
        transport: httpx.AsyncBaseTransport | None = None,
        client: httpx.AsyncClient | None = None,
        deadline_s: float = DEFAULT_DEADLINE_S,
        max_body_bytes: int = DEFAULT_MAX_BODY,
    ) -> None:
        if client is not None and transport is not None:
            raise ValueError("pass either a shared client or a transport, not both")
        if deadline_s <= 0 or max_body_bytes <= 0:
            raise ValueError("deadline_s and max_body_bytes must be positive")
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self.timeout = timeout
        self.deadline_s = deadline_s
        self.max_body_bytes = max_body_bytes
        self._headers = {**auth_headers(token), "Accept-Encoding": "identity"}
        self._owned = client is None
        self._client = client or httpx.AsyncClient(
            timeout=timeout, transport=transport, follow_redirects=False
        )

    async def aclose(self) -> None:
        """Close the connections (only those of an owned client; a shared pool stays open)."""
        if self._owned:
            await self._client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
        timeout: httpx.Timeout | float | None = None,
        final: Callable[[RayResponse], bool] | None = None,
        deadline_s: float | None = None,
        max_bytes: int | None = None,
        tail: bool = False,
    ) -> RayResponse:
        """Send a request and return a complete 2xx answer, retrying transient failures.

        ``deadline_s`` (default: the client's) bounds the whole call, retries included;
        ``max_bytes`` (default: the client's cap) bounds the answer; ``tail=True`` keeps the last
        ``max_bytes`` of a longer answer instead of refusing it. ``final(response)`` marks a 5xx
        answer as not worth retrying (e.g. Ray's "job already exists", which it reports as HTTP
        500). Raises :class:`RayHeadUnavailable` (or its subclass :class:`RayDeadlineExceeded`)
        when no complete answer came, or a :class:`~llmray.ray.errors.RayAPIError` subclass for
        an error status or an unusable answer.
        """
        budget = self.deadline_s if deadline_s is None else deadline_s
        url = f"{self.base_url}{path}"
        state: dict[str, str] = {}
        endpoint = endpoint_label(path)
        started = time.monotonic()
        outcome = "error"
        try:
            async with asyncio.timeout(budget):
                response = await self._attempts(
                    method, url, state, json=json, params=params, timeout=timeout, final=final,
                    limit=self.max_body_bytes if max_bytes is None else max_bytes, tail=tail,
                )  # fmt: skip
            outcome = status_class(response.status_code)
            return response
        except TimeoutError:
            outcome = "deadline"
            last = f" (last failure: {state['last']})" if state.get("last") else ""
            reason = f"no complete answer to {method} {path} within {budget:g}s{last}"
            raise RayDeadlineExceeded(self.base_url, reason, budget) from None
        except RayAPIError as exc:
            outcome = "bad" if isinstance(exc, RayBadResponse) else status_class(exc.status)
            raise
        except RayHeadUnavailable:
            outcome = "unreachable"
            raise
        finally:
            RAY_REQUESTS.labels(endpoint, method, outcome).inc()
            RAY_REQUEST_SECONDS.labels(endpoint, method).observe(time.monotonic() - started)

    async def _attempts(
        self,
        method: str,
        url: str,
        state: dict[str, str],
        *,
        json: Any,
        params: Mapping[str, str | int] | None,
        timeout: httpx.Timeout | float | None,
        final: Callable[[RayResponse], bool] | None,
        limit: int,
        tail: bool,
    ) -> RayResponse:
        for attempt in range(self.retry.attempts):
            last = attempt == self.retry.attempts - 1
            try:
                response = await self._once(method, url, json, params, timeout, limit, tail)
            except httpx.TransportError as exc:  # connect/read errors and per-operation timeouts
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if last:
                    raise RayHeadUnavailable(self.base_url, reason) from exc
                state["last"] = reason
                log.debug("%s %s failed (%s); retrying", method, url, reason)
            else:
                if response.is_success:
                    return response
                retryable = response.status_code >= 500 and not (final and final(response))
                if last or not retryable:
                    raise api_error(method, url, response.status_code, response.text)
                state["last"] = f"HTTP {response.status_code}"
                log.debug("%s %s -> HTTP %s; retrying", method, url, response.status_code)
            await asyncio.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable: the retry loop returns or raises")  # pragma: no cover

    async def _once(
        self,
        method: str,
        url: str,
        json: Any,
        params: Mapping[str, str | int] | None,
        timeout: httpx.Timeout | float | None,
        limit: int,
        tail: bool,
    ) -> RayResponse:
        request = self._client.build_request(
            method, url, json=json, params=params, headers=self._headers,
            timeout=self.timeout if timeout is None else timeout,
        )  # fmt: skip
        response = await self._client.send(request, stream=True, follow_redirects=False)
        body: bytes | bytearray
        try:
            try:
                if response.is_success:
                    body, truncated = await _read_capped(response, limit, tail=tail)
                else:  # an error body: its start says why; the rest is never read
                    body, truncated = await _read_prefix(response, MAX_ERROR_BODY)
            except OverflowError:
                raise RayResponseTooLarge(method, url, response.status_code, limit) from None
            except ValueError as exc:  # undecodable Content-Encoding
                raise RayBadResponse(method, url, response.status_code, str(exc)) from None
        finally:
            await response.aclose()
        return RayResponse(response.status_code, body, truncated)

    async def get_json(self, path: str, *, max_values: int | None = MAX_JSON_VALUES, **kwargs: Any) -> Any:
        """GET ``path`` and decode its JSON body (a non-JSON 2xx body is a :class:`RayBadResponse`)."""
        response = await self.request("GET", path, **kwargs)
        return self.decode(response, "GET", path, max_values)

    async def get_object(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """Like :meth:`get_json`, but the answer must be a JSON object."""
        data = await self.get_json(path, **kwargs)
        if not isinstance(data, dict):
            raise RayBadResponse(
                "GET", f"{self.base_url}{path}", 200, f"expected a JSON object, got {type(data).__name__}"
            )
        return data

    def decode(
        self, response: RayResponse, method: str, path: str, max_values: int | None = MAX_JSON_VALUES
    ) -> Any:
        """The JSON body of ``response``, or :class:`RayBadResponse`."""
        try:
            return response.json(max_values)
        except ValueError as exc:
            url = f"{self.base_url}{path}"
            what = f"not JSON ({exc}): " + response.content[:200].decode("utf-8", errors="replace")
            raise RayBadResponse(method, url, response.status_code, what) from exc

    def parsed(self, parse: Callable[[Any], Any], data: Any, method: str, path: str) -> Any:
        """``parse(data)``, with any error of a malformed answer turned into :class:`RayBadResponse`."""
        try:
            return parse(data)
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
            url = f"{self.base_url}{path}"
            raise RayBadResponse(method, url, 200, f"unexpected answer: {exc}") from exc


async def _read_prefix(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """The first ``limit`` bytes of the body (the rest is never read; the connection is dropped)."""
    decoder, source = _source(response)
    buf = bytearray()
    async for data in source:
        while data:
            out, data = decoder.decode(data, limit - len(buf))
            buf += out
            if len(buf) >= limit:
                return bytes(buf[:limit]), True
    return bytes(buf), False
