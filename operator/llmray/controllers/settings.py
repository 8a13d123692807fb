"""The operator's settings: built once at start-up (``llmray operator`` flags) and passed in.

Every default lives here; the CLI reads its defaults from :class:`Settings` so a value is written
once. The Ray topology (own head per resource, or one shared head) is part of the settings.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from llmray.leader import ElectionConfig

from .topology import PerResourceHeads, Topology


@dataclass(frozen=True)
class Settings:
    """Operator-wide settings of the reconcilers."""

    unschedulable_timeout: float = 300.0
    """Seconds a pod may stay Unschedulable before the resource is marked Failed."""
    resync_seconds: float = 15.0
    """Seconds between full resyncs (drift repair without events)."""
    workers: int = 8
    """Resources reconciled concurrently."""
    pass_timeout: float = 180.0
    """Seconds one reconcile pass may take before it is abandoned and retried with backoff (above
    the Ray job submission timeout, 120 s: a loaded head answers a submit slowly)."""
    stuck_after: float = 300.0
    """Liveness fails when a pass has been running this long (the loop is wedged)."""
    ray_concurrency: int = 0
    """Passes that may talk to Ray heads at once (0: workers - 2, at least 1), so slow heads
    cannot take every worker from Kubernetes work."""
    stalled_after: float = 600.0
    """Seconds a Running training job may go without a new progress report before it is marked
    ``Stalled`` (a condition and a Warning Event; the job keeps running)."""
    queue_full_ratio: float = 0.9
    """A deployment is ``QueueFull`` when its waiting requests reach this share of
    ``spec.limits.maxQueuedRequests`` (beyond the limit clients get 503)."""
    metrics_peer: dict[str, Any] | None = None
    """NetworkPolicy peer (e.g. the monitoring namespace) allowed to scrape the Ray pods' metrics
    port (None: nobody outside the cluster's own pods)."""
    topology: Topology = field(default_factory=PerResourceHeads)
    auth_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False, compare=False)
    """Key the Ray auth tokens are derived from (the chart mounts a stable one, ``--auth-key-file``)."""
    operator_peer: dict[str, Any] | None = None
    """NetworkPolicy peer selecting the operator's pods (None: it runs outside the cluster)."""
    leader_election: ElectionConfig | None = None
    """Reconcile only while holding this Lease (None: always; one replica only)."""
    kueue_api: str = "kueue.x-k8s.io/v1beta2"
    """Kueue's API group/version the operator creates Workloads with (``--kueue-api``)."""
    kueue_served: bool = False
    """Whether the cluster serves ``workloads`` in ``kueue_api`` (detected once at start-up). A
    job labelled ``kueue.x-k8s.io/queue-name`` is held while it is not: running it would bypass the
    quota the platform meant it to wait for."""
    kueue_default_queue: bool = False
    """Kueue's LocalQueueDefaulting (GA and always on in Kueue v0.17): a job without the queue label
    goes to the LocalQueue named ``default`` of its namespace when there is one, and removing the
    label of a waiting job puts it there instead of letting it run unqueued (``--kueue-default-queue``)."""
    kueue_queue_required: bool = False
    """Jobs without a queue (no label, no ``default`` LocalQueue) are held instead of running outside
    Kueue, like Kueue's ``manageJobsWithoutQueueName`` (``--kueue-require-queue``)."""

    @property
    def ray_slots(self) -> int:
        return self.ray_concurrency if self.ray_concurrency > 0 else max(1, self.workers - 2)
