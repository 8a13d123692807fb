"""Training metrics exported through Ray's metrics agent (``ray.util.metrics`` gauges).

Names are :data:`llmray.api.telemetry.TRAINING_METRICS` without Ray's ``ray_`` prefix (the agent
adds it). Labels: ``job`` (namespace/name) and ``rank``. Rank 0 sets the run-wide figures at each
progress report; every rank sets its own GPU memory. A metrics backend that fails never fails
training: errors are logged once and the gauges go quiet.
"""

from __future__ import annotations

import logging
from typing import Any

from llmray.api.runtime import ProgressReport
from llmray.api.telemetry import RAY_METRIC_PREFIX, TRAINING_METRICS

logger = logging.getLogger(__name__)

TAG_KEYS = ("job", "rank")


def declared_name(scraped: str) -> str:
    """The name to declare with ``ray.util.metrics`` for a metric scraped as ``scraped``."""
    return scraped.removeprefix(RAY_METRIC_PREFIX)


#: ProgressReport field -> scraped metric name, for the gauges rank 0 sets.
REPORT_GAUGES: dict[str, str] = {
    "step": "ray_llmray_train_step",
    "loss": "ray_llmray_train_loss",
    "learning_rate": "ray_llmray_train_learning_rate",
    "tokens_per_second": "ray_llmray_train_tokens_per_second",
    "mfu": "ray_llmray_train_mfu",
}
GPU_MEMORY = "ray_llmray_train_gpu_memory_bytes"
assert set(REPORT_GAUGES.values()) | {GPU_MEMORY} == set(TRAINING_METRICS)


def report_values(report: ProgressReport) -> dict[str, float]:
    """Scraped metric name -> value for the fields of ``report`` that are known."""
    values: dict[str, float] = {}
    for attr, metric in REPORT_GAUGES.items():
        value = getattr(report, attr)
        if value is not None:
            values[metric] = float(value)
    return values


class TrainingMetrics:
    """The training gauges of one worker (created lazily inside the Ray worker)."""

    def __init__(self, job: str, rank: int) -> None:
        self.tags = {"job": job, "rank": str(rank)}
        self._gauges: dict[str, Any] | None = None
        self._broken = False

    def _ensure(self) -> dict[str, Any] | None:
        if self._gauges is None and not self._broken:
            try:
                from ray.util.metrics import Gauge

                self._gauges = {
                    name: Gauge(declared_name(name), description=f"llmray: {name}", tag_keys=TAG_KEYS)
                    for name in TRAINING_METRICS
                }
            except Exception:
                logger.warning("training metrics disabled: ray.util.metrics unavailable", exc_info=True)
                self._broken = True
        return self._gauges

    def set(self, values: dict[str, float]) -> None:
        gauges = self._ensure()
        if gauges is None:
            return
        try:
            for name, value in values.items():
                gauges[name].set(value, tags=self.tags)
        except Exception:
            logger.warning("training metrics disabled after an export error", exc_info=True)
            self._broken, self._gauges = True, None

    def report(self, report: ProgressReport) -> None:
        """Rank 0: the run-wide figures of a progress report."""
        self.set(report_values(report))

    def gpu_memory(self, max_allocated_bytes: int | None) -> None:
        """Every rank: peak GPU memory allocated by torch (skipped without CUDA)."""
        if max_allocated_bytes is not None:
            self.set({GPU_MEMORY: float(max_allocated_bytes)})
