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


def serving_status(stats: ServingStats) -> ServingStatus:
    """Status figures from untrusted stats: finite, non-negative, capped, rounded (so an idle
    deployment's status does not change, and cost a write, on every poll)."""
    ttft = stats.ttft_p50_seconds
    ttft_ms = (
        None if ttft is None or not math.isfinite(ttft) or ttft < 0 else round(min(ttft, MAX_TTFT_S) * 1000)
    )
    return ServingStatus(
        requests_per_second=round(_finite(stats.requests_per_second, MAX_RPS), 2),
        ttft_p50_ms=ttft_ms,
        running=int(_finite(stats.running, MAX_SEQUENCES)),
        waiting=int(_finite(stats.waiting, MAX_SEQUENCES)),
    )


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
