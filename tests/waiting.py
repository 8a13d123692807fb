"""Condition waiting for tests: poll a probe until it holds, fail with what was last seen."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """Raised when a condition did not hold in time; the message carries the last observation."""


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
) -> T:
    """Call ``probe`` until it returns a truthy value and return it.

    Exceptions from the probe count as "not yet" (the world is still converging) and the last
    one is reported on timeout together with ``what`` so a failure says what was awaited.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except Exception as exc:  # reported on timeout
            last = exc
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")
        time.sleep(interval)


async def async_wait_for(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
) -> T:
    """Async twin of :func:`wait_for`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = await probe()
            if value:
                return value
            last = value
        except Exception as exc:  # reported on timeout
            last = exc
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")
        await asyncio.sleep(interval)


def restore_environ(saved: dict[str, str | None]) -> None:
    """Put back environment variables saved as ``{name: value or None (was unset)}``."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
