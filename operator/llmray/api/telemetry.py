"""Names shared by the operator and the workloads for what they measure.

The workloads export their metrics through Ray's metrics agent (``ray.util.metrics``), which
prefixes every name with ``ray_``; :data:`TRAINING_METRICS` and :data:`SERVING_METRICS` list the
names *as scraped*, so the chart's Grafana dashboard (and its test) can only name metrics that
exist. :class:`ServingStats` is the JSON the serving app answers on :data:`SERVING_STATS_PATH`,
aggregated over all replicas, which the operator mirrors into ``LLMDeployment.status.serving``.
"""

from __future__ import annotations

from .common import StatusModel

#: Ray's metrics agent prefixes custom metrics with this.
RAY_METRIC_PREFIX = "ray_"

#: Training metrics (gauges unless noted), labelled by ``job`` (namespace/name) and ``rank``.
TRAINING_METRICS: tuple[str, ...] = (
    "ray_llmray_train_step",
    "ray_llmray_train_loss",
    "ray_llmray_train_learning_rate",
    "ray_llmray_train_tokens_per_second",
    "ray_llmray_train_mfu",
    "ray_llmray_train_gpu_memory_bytes",
)

#: Serving metrics, labelled by ``model`` (served model id, adapters included).
SERVING_METRICS: tuple[str, ...] = (
    "ray_llmray_serve_requests_total",  # counter; also labelled by route and status code
    "ray_llmray_serve_time_to_first_token_seconds",  # histogram (_bucket/_sum/_count)
    "ray_llmray_serve_inter_token_latency_seconds",  # histogram
    "ray_llmray_serve_generated_tokens_total",  # counter
    "ray_llmray_serve_running_sequences",
    "ray_llmray_serve_waiting_sequences",
    "ray_llmray_serve_batch_size",
    "ray_llmray_serve_cache_usage_ratio",
)

#: Path of the serving app's aggregated stats (same API key as the OpenAI routes).
SERVING_STATS_PATH = "/llmray/stats"


class ServingStats(StatusModel):
    """Serving figures over the last minute, summed/merged across every replica."""

    requests_per_second: float = 0.0
    ttft_p50_seconds: float | None = None
    running: int = 0
    waiting: int = 0
    replicas: int = 0
