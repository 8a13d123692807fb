"""LLMTrainingJob: a Ray cluster of one head and ``spec.workers.replicas`` workers for the job.

Phases set here (the cluster half): Pending -> Provisioning -> Running (head and all workers
Ready), Suspended (``spec.suspend``), Failed (invalid spec, or pods Unschedulable for longer than
``--unschedulable-timeout``). Succeeded/Failed of the job itself come from :func:`ray_steps`.
A finished job's pods are deleted ``ttlSecondsAfterFinished`` after completion (default 0).
A job Failed for a cluster reason is retried when its spec changes (generation moves).
"""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar

from llmray.api.training import (
    KIND,
    PLURAL,
    TERMINAL_PHASES,
    LLMTrainingJobSpec,
    LLMTrainingJobStatus,
)
from llmray.builders.cluster import training_cluster
from llmray.builders.status import (
    COND_CLUSTER_READY,
    R_FINISHED,
    R_INVALID_SPEC,
    R_SUSPENDED,
    R_UNSCHEDULABLE,
    get_condition,
)

from .cluster import ClusterController, Pass

# Failures of the cluster (not of the job) that a spec change may fix.
RETRYABLE_FAILURES = frozenset({R_UNSCHEDULABLE, R_INVALID_SPEC})


async def ray_steps(controller: TrainingController, p: Pass) -> None:
    """INTEGRATION HOOK -- training job on Ray (filled by the Ray integration issue).

    Called at the end of every pass in which the cluster is wanted and nothing blocks it, after the
    cluster phase was decided (``p.status.phase`` is Provisioning or Running, ``p.health`` says
    whether head and workers are Ready). It may submit/poll the Ray job through
    ``llmray.ray`` (head at ``p.cluster.dashboard_url``, token in Secret
    ``<name>-ray-auth`` key ``auth_token``), and set on ``p.status``: phase (Running, Succeeded,
    Failed), job_id, restarts, progress, checkpoint, output, start/completion times, message and
    conditions (``p.condition(...)``); ``p.requeue_after`` to poll again; ``p.event(...)``.
    It must not raise for Ray being unreachable: report it in status and requeue instead.
    """
    return None


class TrainingController(ClusterController):
    """Reconciles LLMTrainingJobs."""

    kind: ClassVar[str] = KIND
    plural: ClassVar[str] = PLURAL
    spec_model = LLMTrainingJobSpec
    status_model = LLMTrainingJobStatus
    workers_field = "spec.workers"

    def prepare(self, p: Pass) -> None:
        spec: LLMTrainingJobSpec = p.spec
        status: LLMTrainingJobStatus = p.status
        p.cluster = training_cluster(p.owner, spec)
        p.desired_workers = spec.workers.replicas
        if status.phase in TERMINAL_PHASES:
            cond = get_condition(status.conditions, COND_CLUSTER_READY)
            if (
                status.phase == "Failed"
                and cond is not None
                and cond.reason in RETRYABLE_FAILURES
                and p.generation > status.observed_generation
            ):
                status.phase = "Pending"
                status.message = "spec changed after a cluster failure: retrying"
                status.completion_time = None
                return
            p.want_cluster = False
            ttl = spec.ttl_seconds_after_finished or 0
            if status.completion_time is not None and ttl > 0:
                p.teardown_delay = max(0.0, ttl - (p.at - status.completion_time).total_seconds())
            return
        if spec.suspend:
            p.want_cluster = False

    def decide_status(self, p: Pass) -> None:
        status: LLMTrainingJobStatus = p.status
        if status.phase in TERMINAL_PHASES and p.blocker is None:
            kept = p.teardown_delay > 0
            cond = get_condition(status.conditions, COND_CLUSTER_READY)
            if cond is not None and cond.status == "False" and cond.reason != R_FINISHED:
                return  # keep the failure's reason (a spec change may retry it)
            until = ""
            if kept and status.completion_time is not None and p.spec is not None:
                ttl = timedelta(seconds=p.spec.ttl_seconds_after_finished or 0)
                until = (status.completion_time + ttl).isoformat()
            pods = f"kept until {until} (ttlSecondsAfterFinished)" if kept else "deleted"
            p.condition(COND_CLUSTER_READY, False, R_FINISHED, f"job {status.phase}; Ray pods {pods}")
            return
        if p.blocker is not None:
            p.condition(COND_CLUSTER_READY, False, p.blocker.reason, p.blocker.message)
            status.message = p.blocker.message
            if p.blocker.fatal:
                status.phase = "Failed"
                status.completion_time = status.completion_time or p.at
            elif status.phase not in ("Running",):
                status.phase = "Pending"
            return
        if not p.want_cluster:  # suspended
            status.phase = "Suspended"
            status.message = "spec.suspend is true: Ray pods removed; set it to false to resume"
            p.condition(COND_CLUSTER_READY, False, R_SUSPENDED, status.message)
            return
        health = p.health
        if health is None:
            return
        if health.unschedulable_for > self.options.unschedulable_timeout:
            status.phase = "Failed"
            status.completion_time = p.at
            status.message = f"gave up after {int(self.options.unschedulable_timeout)}s: {health.message}"
            p.condition(COND_CLUSTER_READY, False, R_UNSCHEDULABLE, status.message)
            return
        p.condition(COND_CLUSTER_READY, health.ready, health.reason, health.message)
        if health.ready:
            if status.phase in ("Pending", "Provisioning", "Suspended"):
                status.phase = "Running"
                status.message = "Ray cluster ready"
        else:
            status.phase = "Provisioning"
            status.message = health.message

    async def ray_steps(self, p: Pass) -> None:
        await ray_steps(self, p)
