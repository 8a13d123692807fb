"""The serving app's own stats route (:data:`~llmray.api.telemetry.SERVING_STATS_PATH`).

Read through :class:`~llmray.ray._http.RayHTTP` like every call to a head (deadline, size cap);
the answer is untrusted, so every figure is bounded before it reaches status. An app without the
route (404, e.g. the vLLM engine) has no stats: that is not an error.
"""

from __future__ import annotations

import math
from typing import Any

from llmray.api.deployment import ServingStatus
from llmray.api.telemetry import SERVING_STATS_PATH, ServingStats

from ._http import NO_RETRY, RayHTTP
from .errors import RayNotFound

STATS_MAX_BYTES = 16 * 1024
"""The stats are a handful of numbers: anything larger is refused."""
STATS_DEADLINE_S = 5.0
MAX_RPS = 1e6
MAX_TTFT_S = 3600.0
MAX_SEQUENCES = 10_000_000
SERVING_TOLERANCE = 0.2
"""status.serving is rewritten when a figure moves by more than this fraction (or to/from zero):
under a steady load the figures jitter on every poll, and each change would cost a status write."""


async def fetch_serving_stats(http: RayHTTP) -> ServingStats | None:
    """The app's stats, or None when it has no stats route (HTTP 404)."""
    try:
        data = await http.get_object(
            SERVING_STATS_PATH, max_bytes=STATS_MAX_BYTES, deadline_s=STATS_DEADLINE_S, max_values=1000
        )
    except RayNotFound:
        return None
    stats: ServingStats = http.parsed(ServingStats.model_validate, data, "GET", SERVING_STATS_PATH)
    return stats


MODELS_PATH = "/v1/models"
MAX_MODEL_IDS = 64
"""Model ids read from ``/v1/models`` (a deployment serves at most 1 + 16)."""


def parse_model_ids(data: Any) -> list[str]:
    """Model ids of an OpenAI ``/v1/models`` answer (defensive: malformed entries are skipped)."""
    entries = data.get("data") if isinstance(data, dict) else None
    ids: list[str] = []
    for entry in (entries if isinstance(entries, list) else [])[:MAX_MODEL_IDS]:
        model_id = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(model_id, str):
            ids.append(model_id[:256])
    return ids


async def fetch_model_ids(http: RayHTTP) -> list[str]:
    """The model ids a replica of the app serves now (its ``/v1/models``)."""
    data = await http.get_object(
        MODELS_PATH, max_bytes=STATS_MAX_BYTES * 4, deadline_s=STATS_DEADLINE_S, max_values=1000
    )
    ids: list[str] = http.parsed(parse_model_ids, data, "GET", MODELS_PATH)
    return ids


def _finite(value: Any, cap: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return min(number, cap) if math.isfinite(number) and number > 0 else 0.0


def significant(value: float, digits: int = 2) -> float:
    """``value`` rounded to ``digits`` significant figures (1234.5 -> 1200.0, 0.04567 -> 0.046)."""
    return float(f"{value:.{digits}g}")


def serving_status(stats: ServingStats) -> ServingStatus:
    """Status figures from untrusted stats: finite, non-negative, capped; the rate and TTFT to two
    significant figures (more would be noise, and a status change to write)."""
    ttft = stats.ttft_p50_seconds
    ttft_ms = (
        None
        if ttft is None or not math.isfinite(ttft) or ttft < 0
        else round(significant(min(ttft, MAX_TTFT_S) * 1000))
    )
    return ServingStatus(
        requests_per_second=significant(_finite(stats.requests_per_second, MAX_RPS)),
        ttft_p50_ms=ttft_ms,
        running=int(_finite(stats.running, MAX_SEQUENCES)),
        waiting=int(_finite(stats.waiting, MAX_SEQUENCES)),
    )


def serving_moved(shown: ServingStatus, fresh: ServingStatus, tolerance: float) -> bool:
    """Whether ``fresh`` differs from the figures status shows by more than jitter: a figure went
    to or from zero (or TTFT to or from unknown), or moved by more than ``tolerance`` of the larger."""
    pairs: list[tuple[float | None, float | None]] = [
        (shown.requests_per_second, fresh.requests_per_second),
        (shown.ttft_p50_ms, fresh.ttft_p50_ms),
        (shown.running, fresh.running),
        (shown.waiting, fresh.waiting),
    ]
    for old, new in pairs:
        if old is None or new is None:
            if old != new:
                return True
        elif (old == 0) != (new == 0) or abs(new - old) > tolerance * max(abs(old), abs(new)):
            return True
    return False


def steady_serving(
    shown: ServingStatus | None, fresh: ServingStatus | None, tolerance: float = SERVING_TOLERANCE
) -> ServingStatus | None:
    """What status.serving says after a poll: ``fresh``, or ``shown`` unchanged (no status write)
    while every figure is within ``tolerance`` of it. Compared with what status shows, not with the
    last poll, so a slow drift is written once it adds up."""
    if shown is None or fresh is None or serving_moved(shown, fresh, tolerance):
        return fresh
    return shown


def stats_http(base_url: str, api_key: str | None, client: Any) -> RayHTTP:
    """A one-shot (no retry) transport to a Serve app's route, over the shared pool ``client``."""
    return RayHTTP(
        base_url,
        api_key,
        client=client,
        retry=NO_RETRY,
        deadline_s=STATS_DEADLINE_S,
        max_body_bytes=STATS_MAX_BYTES,
    )
