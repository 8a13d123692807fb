"""Exceptions of the Ray head clients.

Two families, because the controller reacts differently: :class:`RayHeadUnavailable` means "the
head did not answer" (not started yet, restarting, network): report it in status and requeue.
:class:`RayAPIError` means the head answered and refused: the status code and body say why.
"""

from __future__ import annotations

MAX_BODY_IN_MESSAGE = 500


class RayError(Exception):
    """Base of every error raised by :mod:`llmray.ray`."""


class RayHeadUnavailable(RayError):
    """The head could not be reached in time (connection refused, DNS, timeout) after retries."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"Ray head at {url} is unavailable: {reason}")


class RayAPIError(RayError):
    """The head answered with an error status; ``status`` and ``body`` carry its answer."""

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


class RayNotFound(RayAPIError):
    """404: the job (or other object) does not exist on this head."""


def api_error(method: str, url: str, status: int, body: str) -> RayAPIError:
    """The most specific :class:`RayAPIError` subclass for an HTTP error status."""
    if status in (401, 403):
        return RayAuthError(method, url, status, body)
    if status == 404:
        return RayNotFound(method, url, status, body)
    return RayAPIError(method, url, status, body)
