"""LLMTrainingJob: a Ray cluster of one head and ``spec.workers.replicas`` workers for the job.

The phase comes from :func:`llmray.controllers.machines.training_next` only: Pending ->
Provisioning -> Running (head and all workers Ready, then the Ray job) -> Succeeded | Failed;
Suspended (``spec.suspend``); Failed (invalid spec, pods Unschedulable for longer than
``--unschedulable-timeout``, or the job failed with no restarts left). A finished job's pods are
deleted ``ttlSecondsAfterFinished`` after completion (default 0). A job Failed for a cluster reason
is retried when its spec changes (generation moves).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar

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
    R_FINISHED,
    R_INVALID_SPEC,
    R_UNSCHEDULABLE,
)
from llmray.ray import RayAuthError, RayError, RayNotFound, submission_id
from llmray.ray.jobs import JobInfo

from .cluster import ClusterController, Deps, Pass
from .decisions import (
    META_ATTEMPT,
    META_NAME,
    META_NAMESPACE,
    META_UID,
    TRAINING_RUN_ENV,
    deadline_left,
    deadline_message,
    decide_training,
    encode_training_run,
    failure_event,
    output_version,
    progress_status,
    training_entrypoint,
)
from .machines import COND_STALLED, Next, TrainingSeen, training_next, training_stalled
from .rayconn import Head, RayAPI, ray_problem, short
from .store import Key

logger = logging.getLogger("llmray.controllers.training")

# Failures of the cluster (not of the job) that a spec change may fix.
RETRYABLE_FAILURES = frozenset({R_UNSCHEDULABLE, R_INVALID_SPEC})

COND_JOB = "JobRunning"
UNREACHABLE_REQUEUE_S = 10.0

TrainingPass = Pass[LLMTrainingJobSpec, LLMTrainingJobStatus]


@dataclass
class _Running:
    """What deleting or suspending a resource needs to stop its current Ray job."""

    head: Head
    submission_id: str


def _sid(p: TrainingPass, attempt: int) -> str:
    return submission_id(p.namespace, p.name, p.uid, attempt)


def _training_run(p: TrainingPass, attempt: int) -> TrainingRun:
    """What the Ray job runs: the spec, plus the identity its checkpoints are scoped to."""
    return TrainingRun(name=p.name, namespace=p.namespace, uid=p.uid or None, attempt=attempt, spec=p.parsed)


class TrainingController(ClusterController[LLMTrainingJobSpec, LLMTrainingJobStatus]):
    """Reconciles LLMTrainingJobs."""

    kind: ClassVar[str] = KIND
    plural: ClassVar[str] = PLURAL
    spec_model = LLMTrainingJobSpec
    status_model = LLMTrainingJobStatus

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self.running: dict[Key, _Running] = {}

    # --- cluster half ------------------------------------------------------------------------------

    def _retrying(self, p: TrainingPass) -> bool:
        """Failed for a cluster reason, and the spec changed since: start over."""
        cond = self.previous_cluster_condition(p)
        return (
            p.phase == "Failed"
            and cond is not None
            and cond.reason in RETRYABLE_FAILURES
            and p.generation > p.status.observed_generation
        )

    def prepare(self, p: TrainingPass, spec: LLMTrainingJobSpec) -> None:
        p.cluster = training_cluster(p.owner, spec)
        p.desired_workers = spec.workers.replicas
        p.reopened = self._retrying(p)
        if p.phase in TERMINAL_PHASES and not p.reopened:
            p.want_cluster = False
            ttl = spec.ttl_seconds_after_finished or 0
            if p.status.completion_time is not None and ttl > 0:
                p.teardown_delay = max(0.0, ttl - (p.at - p.status.completion_time).total_seconds())
            return
        if spec.suspend:
            p.want_cluster = False

    # --- the state machine -------------------------------------------------------------------------

    def decide(self, p: TrainingPass) -> Next:
        status = p.status
        cond = self.previous_cluster_condition(p)
        pods = "deleted"
        if p.teardown_delay > 0 and status.completion_time is not None and p.spec is not None:
            until = status.completion_time + timedelta(seconds=p.spec.ttl_seconds_after_finished or 0)
            pods = f"kept until {until.isoformat()} (ttlSecondsAfterFinished)"
        retrying = p.reopened
        deadline: str | None = None
        spec = p.spec
        if spec is not None and p.phase not in TERMINAL_PHASES and not spec.suspend:
            left = deadline_left(status.start_time, spec.active_deadline_seconds, p.at)
            if left is not None and left <= 0 and spec.active_deadline_seconds is not None:
                deadline = deadline_message(spec.active_deadline_seconds)
            elif left is not None:
                p.requeue(left)  # come back when it passes
        return training_next(
            TrainingSeen(
                phase=p.phase,
                blocker=p.blocker,
                retrying=retrying,
                suspended=p.spec is not None
                and p.spec.suspend
                and not p.want_cluster
                and not (p.phase in TERMINAL_PHASES and not retrying),
                health=p.health if p.want_cluster else None,
                unschedulable_timeout=self.settings.unschedulable_timeout,
                job=p.job_step,
                ray_problem=p.ray_problem,
                keep_failure=cond is not None and cond.status == "False" and cond.reason != R_FINISHED,
                pods_after_finish=pods,
                deadline=deadline,
            )
        )

    def apply(self, p: TrainingPass, nxt: Next) -> None:
        status = p.status
        status.phase = nxt.phase  # type: ignore[assignment]  # the one place a training phase is set
        self.apply_common(p, nxt)
        if nxt.reopened:
            status.completion_time = None
        if nxt.finished:
            status.completion_time = status.completion_time or p.at
        last = status.progress.updated_at or status.start_time if status.job_id else None
        self.alarm(p, training_stalled(status.phase, last, p.at, self.settings.stalled_after), COND_STALLED)

    # --- Ray half ----------------------------------------------------------------------------------

    async def ray_steps(self, p: TrainingPass) -> None:
        """The training job on Ray: submit once per attempt, poll, mirror progress, retry, finish.

        Decisions are pure (:func:`decisions.decide_training`); this only talks to the head. The
        submission id is a function of (uid, attempt) and the attempt lives in status, so a pass
        repeated or run after an operator restart adopts the job it already submitted. An
        unreachable head is reported (condition ``JobRunning``, message) and retried.
        """
        status, spec = p.status, p.parsed
        assert p.health is not None
        if not status.job_id and not p.health.ready and status.next_attempt_at is None:
            return  # nothing submitted yet, and the cluster is still coming up
        head = self.heads.head(p.key, p.uid)
        ray = self.heads.client(p.key, head)
        attempt = status.attempt
        left = deadline_left(status.start_time, spec.active_deadline_seconds, p.at)
        try:
            if left is not None and left <= 0:
                await self._stop_at_deadline(p, head)
                return
            job = await ray.jobs.find(_sid(p, attempt))
            step = decide_training(
                attempt=attempt,
                restarts=status.restarts,
                max_restarts=spec.failure_policy.max_restarts,
                job=job,
                cluster_ready=p.health.ready,
                submission_id=_sid(p, attempt),
                submitted=status.job_id == _sid(p, attempt),
                backoff_seconds=spec.failure_policy.backoff_seconds,
                not_before=status.next_attempt_at,
                at=p.at,
            )
            if step.action == "wait":
                return
            if step.action == "backoff":
                p.job_step = step
                p.condition(COND_JOB, False, step.reason, step.message)
                p.requeue(step.requeue_after or 1.0)
                return
            tail = ""
            if step.action == "submit":
                await self._submit(ray, p, attempt)
                status.start_time = status.start_time or p.at
                status.next_attempt_at = None
            elif job is not None:
                tail = await self._mirror_progress(ray, p, job)
            if step.action == "restart":
                p.event("Warning", "RestartingRayJob", failure_event(step.message, tail))
                attempt = step.attempt
                if step.delay > 0:
                    # Backing off: the next attempt is submitted by a later pass, at next_attempt_at.
                    status.attempt, status.restarts = step.attempt, step.restarts
                    status.next_attempt_at = p.at + timedelta(seconds=step.delay)
                    status.job_id = ""
                    self.running.pop(p.key, None)
                    p.job_step = step
                    p.condition(COND_JOB, False, step.reason, step.message)
                    p.requeue(step.delay)
                    return
                await self._submit(ray, p, attempt)
            status.attempt, status.restarts = step.attempt, step.restarts
            status.job_id = _sid(p, attempt)
            p.job_step = step
            if step.action == "succeed":
                status.output.uri = spec.output.uri
                status.output.version = output_version(parse_progress(tail), p.uid, attempt)
                status.progress.percent = 100
                status.progress.eta = ""
                p.condition(COND_JOB, False, step.reason, step.message)
                self.running.pop(p.key, None)
                p.event("Normal", "JobSucceeded", f"{step.message}; model at {spec.output.uri}")
            elif step.action == "fail":
                p.condition(COND_JOB, False, step.reason, step.message)
                self.running.pop(p.key, None)
                p.event("Warning", "JobFailed", failure_event(step.message, tail))
            else:
                p.condition(COND_JOB, True, step.reason, step.message)
                self.running[p.key] = _Running(head, status.job_id)
            p.requeue(step.requeue_after or 5.0)
        except RayError as exc:
            if isinstance(exc, RayAuthError):
                self.heads.refused(p.key)
            p.ray_problem = ray_problem(exc, head)
            p.condition(COND_JOB, "Unknown", p.ray_problem.reason, p.ray_problem.message)
            p.requeue(UNREACHABLE_REQUEUE_S)

    async def _stop_at_deadline(self, p: TrainingPass, head: Head) -> None:
        """spec.activeDeadlineSeconds passed: stop the running attempt (the machine fails the job)."""
        status = p.status
        if status.job_id:
            try:
                await self._stop(p.key, head, status.job_id)
            except RayError as exc:  # its pods are deleted next anyway (a shared head: best effort)
                logger.info("%s/%s: could not stop %s: %s", p.namespace, p.name, status.job_id, short(exc))
        self.running.pop(p.key, None)
        status.next_attempt_at = None
        p.condition(
            COND_JOB, False, "StoppedAtDeadline", "spec.activeDeadlineSeconds passed: Ray job stopped"
        )

    async def _submit(self, ray: RayAPI, p: TrainingPass, attempt: int) -> JobInfo:
        sid = _sid(p, attempt)
        run = TrainingRun(
            name=p.name, namespace=p.namespace, uid=p.uid or None, attempt=attempt, spec=p.parsed
        )
        sub = await ray.jobs.submit(
            training_entrypoint(),
            submission_id=sid,
            runtime_env={"env_vars": {TRAINING_RUN_ENV: encode_training_run(run)}},
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

    async def _mirror_progress(self, ray: RayAPI, p: TrainingPass, job: JobInfo) -> str:
        """Tail the job's log and copy its last progress line into status; returns the tail."""
        status = p.status
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

    async def _stop(self, key: Key, head: Head, sid: str) -> None:
        """Stop a Ray job (unknown to the head counts as stopped)."""
        try:
            await self.heads.client(key, head).jobs.stop(sid)
        except RayNotFound:
            return

    async def ray_idle(self, p: TrainingPass) -> None:
        """Suspended: stop the current attempt's job; resuming then starts the next attempt.

        The next attempt resumes from the run's checkpoints (the train entrypoint finds them
        itself). In a real cluster the pods are deleted anyway (the job dies with them); on a
        shared head (the sandbox) the job must be stopped explicitly.
        """
        status = p.status
        suspended = p.parsed.suspend and p.phase not in TERMINAL_PHASES
        if not suspended or not status.job_id or p.cluster is None:
            return
        head = self.heads.head(p.key, p.uid)
        try:
            await self._stop(p.key, head, status.job_id)
        except RayError as exc:
            if not head.shared:
                # Its own head is being deleted with the pods: nothing left to stop.
                logger.info("%s/%s: not stopping %s: %s", p.namespace, p.name, status.job_id, short(exc))
            else:
                status.message = f"could not stop Ray job {status.job_id}: {short(exc)}; retrying"
                p.requeue(UNREACHABLE_REQUEUE_S)
                return
        p.event("Normal", "StoppedRayJob", f"stopped Ray job {status.job_id} (suspended)")
        status.attempt += 1
        status.job_id = ""
        status.start_time = None  # like a Job: activeDeadlineSeconds restarts on resume
        status.next_attempt_at = None
        self.running.pop(p.key, None)
        p.condition(COND_JOB, False, "Suspended", "spec.suspend is true: Ray job stopped")

    async def ray_gone(self, key: Key) -> None:
        """Deleted: stop the job it was running (best effort, from the operator's memory)."""
        running = self.running.pop(key, None)
        if running is None:
            return
        try:
            await self._stop(key, running.head, running.submission_id)
            logger.info("%s %s/%s deleted: stopped Ray job %s", *key, running.submission_id)
        except RayError as exc:
            logger.info("%s %s/%s deleted: could not stop Ray job %s: %s", *key, running.submission_id, exc)
