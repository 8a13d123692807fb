"""Exceptions of the Ray head clients.

Two families, because the controller reacts differently: :class:`RayHeadUnavailable` means "the
head did not answer" (not started yet, restarting, network, or no complete answer within the
call's deadline): report it in status and requeue. :class:`RayAPIError` means the head answered
and refused (the status code and body say why) or answered something unusable
(:class:`RayBadResponse`: too large, not JSON, the wrong shape).

Every class carries ``status_reason``: a CamelCase word for a condition's ``reason``, so a
controller can map any :class:`RayError` to status without a chain of ``isinstance`` checks.
"""

from __future__ import annotations

from typing import ClassVar

MAX_BODY_IN_MESSAGE = 500


class RayError(Exception):
    """Base of every error raised by :mod:`llmray.ray`."""

    status_reason: ClassVar[str] = "RayError"


class RayHeadUnavailable(RayError):
    """The head could not be reached in time (connection refused, DNS, timeout) after retries."""

    status_reason: ClassVar[str] = "RayHeadUnavailable"

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"Ray head at {url} is unavailable: {reason}")


class RayDeadlineExceeded(RayHeadUnavailable):
    """No complete answer within the call's overall deadline (retries and backoff included).

    Raised for a head that accepts the connection but answers too slowly, e.g. one byte every few
    seconds, which per-read timeouts never catch.
    """

    status_reason: ClassVar[str] = "RayHeadTimeout"

    def __init__(self, url: str, reason: str, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        super().__init__(url, reason)


class RayAPIError(RayError):
    """The head answered with an error status; ``status`` and ``body`` carry its answer."""

    status_reason: ClassVar[str] = "RayAPIError"

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.body = body
        short = body.strip().splitlines()[-1] if body.strip() else ""
        if len(short) > MAX_BODY_IN_MESSAGE:
            short = short[:MAX_BODY_IN_MESSAGE] + "..."
        super().__init__(f"{method} {url} -> HTTP {status}: {short}")


class RayAuthError(RayAPIError):
    """401/403: the token is missing or does not match the cluster's (check the auth Secret)."""

    status_reason: ClassVar[str] = "RayAuthError"


class RayNotFound(RayAPIError):
    """404: the job (or other object) does not exist on this head."""

    status_reason: ClassVar[str] = "RayNotFound"


class RayBadResponse(RayAPIError):
    """The head answered, but not with something usable: not JSON, the wrong shape, bad values.

    Not retried: a head that answers garbage answers it again.
    """

    status_reason: ClassVar[str] = "RayBadResponse"


class RayResponseTooLarge(RayBadResponse):
    """The answer exceeded the call's size cap; it was refused without being read whole."""

    status_reason: ClassVar[str] = "RayResponseTooLarge"

    def __init__(self, method: str, url: str, status: int, limit: int) -> None:
        self.limit = limit
        super().__init__(method, url, status, f"response larger than {limit} bytes refused")


def api_error(method: str, url: str, status: int, body: str) -> RayAPIError:
    """The most specific :class:`RayAPIError` subclass for an HTTP error status."""
    if status in (401, 403):
        return RayAuthError(method, url, status, body)
    if status == 404:
        return RayNotFound(method, url, status, body)
    return RayAPIError(method, url, status, body)
