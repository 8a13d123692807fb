"""LLMTrainingJob: a Ray cluster of one head and ``spec.workers.replicas`` workers for the job.

Phases set here (the cluster half): Pending -> Provisioning -> Running (head and all workers
Ready), Suspended (``spec.suspend``), Failed (invalid spec, or pods Unschedulable for longer than
``--unschedulable-timeout``). Succeeded/Failed of the job itself come from :func:`ray_steps`.
A finished job's pods are deleted ``ttlSecondsAfterFinished`` after completion (default 0).
A job Failed for a cluster reason is retried when its spec changes (generation moves).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

from llmray.api.runtime import TrainingRun, parse_progress
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
from llmray.ray import RayClient, RayError, RayHeadUnavailable, RayNotFound, submission_id
from llmray.ray.jobs import JobInfo

from .cluster import ClusterController, Pass
from .decisions import (
    META_ATTEMPT,
    META_NAME,
    META_NAMESPACE,
    META_UID,
    TRAINING_RUN_ENV,
    decide_training,
    encode_training_run,
    failure_event,
    progress_status,
    training_entrypoint,
)
from .rayconn import Head, head_for, short
from .store import Key

logger = logging.getLogger("llmray.controllers.training")

# Failures of the cluster (not of the job) that a spec change may fix.
RETRYABLE_FAILURES = frozenset({R_UNSCHEDULABLE, R_INVALID_SPEC})


COND_JOB = "JobRunning"
R_HEAD_UNAVAILABLE = "RayHeadUnavailable"
R_RAY_API_ERROR = "RayAPIError"
UNREACHABLE_REQUEUE_S = 10.0


@dataclass
class _Running:
    """What deleting or suspending a resource needs to stop its current Ray job."""

    head: Head
    submission_id: str


def _sid(p: Pass, attempt: int) -> str:
    return submission_id(p.namespace, p.name, p.uid, attempt)


def _training_run(p: Pass, attempt: int) -> TrainingRun:
    return TrainingRun(name=p.name, namespace=p.namespace, uid=p.uid or None, attempt=attempt, spec=p.spec)


async def _submit(ray: RayClient, p: Pass, attempt: int) -> JobInfo:
    sid = _sid(p, attempt)
    sub = await ray.jobs.submit(
        training_entrypoint(),
        submission_id=sid,
        runtime_env={"env_vars": {TRAINING_RUN_ENV: encode_training_run(_training_run(p, attempt))}},
        metadata={
            META_NAMESPACE: p.namespace,
            META_NAME: p.name,
            META_UID: p.uid,
            META_ATTEMPT: str(attempt),
        },
    )
    if sub.created:
        p.event("Normal", "SubmittedRayJob", f"submitted Ray job {sid} (attempt {attempt})")
    return sub.job


async def _mirror_progress(ray: RayClient, p: Pass, job: JobInfo) -> str:
    """Tail the job's log and copy its last progress line into status; returns the tail."""
    status: LLMTrainingJobStatus = p.status
    try:
        tail = await ray.jobs.tail(job.submission_id, lines=120, driver_node_id=job.driver_node_id)
    except RayError as exc:
        logger.debug("%s/%s: no log tail yet: %s", p.namespace, p.name, exc)
        return ""
    report = parse_progress(tail)
    if report is not None:
        status.progress, checkpoint = progress_status(report, status.progress, p.at)
        if checkpoint is not None:
            status.checkpoint = checkpoint
    return tail


async def ray_steps(controller: TrainingController, p: Pass) -> None:
    """The training job on Ray: submit once per attempt, poll, mirror progress, retry, finish.

    Called at the end of every pass in which the cluster is wanted and nothing blocks it (phase
    Provisioning or Running). Decisions are pure (:func:`decisions.decide_training`); this only
    talks to the head. The submission id is a function of (uid, attempt) and the attempt lives in
    status, so a pass repeated or run after an operator restart adopts the job it already
    submitted. An unreachable head is reported (condition ``JobRunning``, message) and retried.
    """
    status: LLMTrainingJobStatus = p.status
    spec: LLMTrainingJobSpec = p.spec
    assert p.cluster is not None and p.health is not None
    if not status.job_id and not p.health.ready:
        return  # nothing submitted yet, and the cluster is still coming up
    token = controller.tokens.token(p.key, p.uid)
    head = head_for(p.key, p.cluster.dashboard_url, token)
    attempt = status.attempt
    try:
        async with head.client() as ray:
            job = await ray.jobs.find(_sid(p, attempt))
            step = decide_training(
                attempt=attempt,
                restarts=status.restarts,
                max_restarts=spec.failure_policy.max_restarts,
                job=job,
                cluster_ready=p.health.ready,
                submission_id=_sid(p, attempt),
            )
            tail = ""
            if step.action == "wait":
                return
            if step.action == "submit":
                job = await _submit(ray, p, attempt)
                status.start_time = status.start_time or p.at
            elif job is not None:
                tail = await _mirror_progress(ray, p, job)
            if step.action == "restart":
                p.event("Warning", "RestartingRayJob", failure_event(step.message, tail))
                attempt = step.attempt
                job = await _submit(ray, p, attempt)
            status.attempt, status.restarts = step.attempt, step.restarts
            status.job_id = _sid(p, attempt)
            if step.phase:
                status.phase = step.phase  # type: ignore[assignment]
            status.message = step.message
            if step.action == "succeed":
                status.output.uri = spec.output.uri
                status.completion_time = status.completion_time or p.at
                status.progress.percent = 100
                status.progress.eta = ""
                p.condition(COND_JOB, False, step.reason, step.message)
                controller.running.pop(p.key, None)
                p.event("Normal", "JobSucceeded", f"{step.message}; model at {spec.output.uri}")
            elif step.action == "fail":
                status.completion_time = status.completion_time or p.at
                p.condition(COND_JOB, False, step.reason, step.message)
                controller.running.pop(p.key, None)
                p.event("Warning", "JobFailed", failure_event(step.message, tail))
            else:
                p.condition(COND_JOB, True, step.reason, step.message)
                controller.running[p.key] = _Running(head, status.job_id)
            p.requeue_after = min(p.requeue_after or step.requeue_after or 5.0, step.requeue_after or 5.0)
    except RayHeadUnavailable as exc:
        msg = f"cannot reach the Ray head at {head.dashboard_url}: {short(exc)}; retrying"
        p.condition(COND_JOB, "Unknown", R_HEAD_UNAVAILABLE, msg)
        status.message = msg
        p.requeue_after = min(p.requeue_after or UNREACHABLE_REQUEUE_S, UNREACHABLE_REQUEUE_S)
    except RayError as exc:
        msg = f"Ray head at {head.dashboard_url} refused a request: {short(exc)}; retrying"
        p.condition(COND_JOB, "Unknown", R_RAY_API_ERROR, msg)
        status.message = msg
        p.requeue_after = min(p.requeue_after or UNREACHABLE_REQUEUE_S, UNREACHABLE_REQUEUE_S)


async def _stop(head: Head, sid: str) -> bool:
    """Stop a Ray job; True when it is stopped or unknown to the head."""
    try:
        async with head.client() as ray:
            await ray.jobs.stop(sid)
        return True
    except RayNotFound:
        return True


async def ray_idle(controller: TrainingController, p: Pass) -> None:
    """Suspended: stop the current attempt's job; resuming then starts the next attempt.

    The next attempt resumes from the run's checkpoints (the train entrypoint finds them itself).
    In a real cluster the pods are deleted anyway (the job dies with them); on a shared head (the
    sandbox) the job must be stopped explicitly.
    """
    status: LLMTrainingJobStatus = p.status
    if status.phase != "Suspended" or not status.job_id or p.cluster is None:
        return
    token = controller.tokens.token(p.key, p.uid)
    head = head_for(p.key, p.cluster.dashboard_url, token)
    try:
        await _stop(head, status.job_id)
    except RayError as exc:
        if not head.shared:
            # Its own head is being deleted with the pods: nothing left to stop.
            logger.info("%s/%s: not stopping %s: %s", p.namespace, p.name, status.job_id, short(exc))
        else:
            status.message = f"could not stop Ray job {status.job_id}: {short(exc)}; retrying"
            p.requeue_after = UNREACHABLE_REQUEUE_S
            return
    p.event("Normal", "StoppedRayJob", f"stopped Ray job {status.job_id} (suspended)")
    status.attempt += 1
    status.job_id = ""
    controller.running.pop(p.key, None)
    p.condition(COND_JOB, False, "Suspended", "spec.suspend is true: Ray job stopped")


async def ray_gone(controller: TrainingController, key: Key) -> None:
    """Deleted: stop the job it was running (best effort, from the operator's memory)."""
    running = controller.running.pop(key, None)
    if running is None:
        return
    try:
        await _stop(running.head, running.submission_id)
        logger.info("%s %s/%s deleted: stopped Ray job %s", *key, running.submission_id)
    except RayError as exc:
        logger.info("%s %s/%s deleted: could not stop Ray job %s: %s", *key, running.submission_id, exc)


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.running: dict[Key, _Running] = {}

    async def ray_steps(self, p: Pass) -> None:
        await ray_steps(self, p)

    async def ray_idle(self, p: Pass) -> None:
        await ray_idle(self, p)

    async def ray_gone(self, key: Key) -> None:
        await ray_gone(self, key)
