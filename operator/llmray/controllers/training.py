"""LLMTrainingJob: a Ray cluster of one head and ``spec.workers.replicas`` workers for the job.

The phase comes from :func:`llmray.controllers.machines.training_next` only: Pending ->
Provisioning -> Running (head and all workers Ready, then the Ray job) -> Succeeded | Failed;
Suspended (``spec.suspend``); Failed (invalid spec, pods Unschedulable for longer than
``--unschedulable-timeout``, or the job failed with no restarts left). A finished job's pods are
deleted ``ttlSecondsAfterFinished`` after completion (default 0). A job Failed for a cluster reason
is retried when its spec changes (generation moves).
"""

from __future__ import annotations

import dataclasses
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
    QueueStatus,
)
from llmray.builders.cluster import Assigned, training_cluster
from llmray.builders.common import stable_hash
from llmray.builders.kueue import (
    DEFAULT_LOCAL_QUEUE,
    POD_SET_HEAD,
    POD_SET_WORKERS,
    PRIORITY_LABEL,
    QUEUE_LABEL,
    WorkloadState,
    active_patch,
    admission_id,
    build_workload,
    controller_uid,
    finish_patch,
    flavor_placement,
    placement_annotation,
    pod_sets,
    quota_fingerprint,
    recorded_placement,
    requeue_patch,
    workload_name,
    workload_state,
)
from llmray.builders.status import (
    R_FINISHED,
    R_INVALID_SPEC,
    R_UNSCHEDULABLE,
)
from llmray.kube import AlreadyExists
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
from .queueing import COND_ADMITTED, QueueSeen, QueueStep, decide_queue
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
        # Kueue: our own Workload writes (the watch may lag behind them), Workloads we deleted, and
        # the placement resolved from each admission's ResourceFlavors.
        self._wl_written: dict[Key, dict[str, Any]] = {}
        self._wl_deleted: dict[Key, str] = {}
        self._placements: dict[Key, tuple[Any, tuple[Assigned, Assigned]]] = {}

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

    # --- Kueue ------------------------------------------------------------------------------------

    def _workload_of(self, p: TrainingPass) -> dict[str, Any] | None:
        """The job's Workload: the watched one, or our own newer write; never a previous job's.

        Our write is remembered only until the watch delivers it (or something newer): kept longer,
        it would stand in for a Workload an admin deleted, and the job would wait on it forever.
        """
        watched = self.deps.store.workloads.get(p.key)
        written = self._wl_written.get(p.key)
        deleted = self._wl_deleted.get(p.key)

        def fresh(w: dict[str, Any]) -> bool:
            return controller_uid(w) == p.uid and (w.get("metadata") or {}).get("uid") != deleted

        def version(w: dict[str, Any]) -> int:
            rv = str((w.get("metadata") or {}).get("resourceVersion") or "0")
            return int(rv) if rv.isdigit() else 0

        if watched is not None and written is not None and version(watched) >= version(written):
            self._wl_written.pop(p.key, None)
            written = None
        candidates = [w for w in (watched, written) if w]
        live = sorted((w for w in candidates if fresh(w)), key=version)
        return live[-1] if live else None

    async def step_gate(self, p: TrainingPass) -> None:
        """Kueue: a job labelled kueue.x-k8s.io/queue-name runs only while its Workload is admitted.

        The decision is :func:`queueing.decide_queue`; this applies it. The hold is set before any
        request, so a failed write can never let a held job create pods.
        """
        spec, status = p.parsed, p.status
        queue = str((p.meta.get("labels") or {}).get(QUEUE_LABEL) or "")
        body = self._workload_of(p)
        state = workload_state(body) if body is not None else None
        if not queue:
            queue = await self._implicit_queue(p, state)
            if not queue and self._queue_required(p, state):
                p.want_cluster = False
                p.queue_hold = (
                    f"this operator runs training jobs only through Kueue (--kueue-require-queue): set "
                    f"label {QUEUE_LABEL} to a LocalQueue of namespace {p.namespace}"
                )
                p.condition(COND_ADMITTED, False, "NoQueue", p.queue_hold)
                return
        if not queue and body is None:
            status.queue = None
            status.conditions = [c for c in status.conditions if c.type != COND_ADMITTED]
            return
        assert p.cluster is not None
        wanted = pod_sets(p.cluster, spec.workers.replicas)
        step = decide_queue(
            QueueSeen(
                queue=queue,
                served=self.settings.kueue_served,
                workload=state,
                wanted_hash=stable_hash(wanted),
                wanted_quota=quota_fingerprint(wanted),
                finished=p.phase in TERMINAL_PHASES and not p.reopened,
                succeeded=p.phase == "Succeeded",
                suspended=spec.suspend,
                pods_left=p.head is not None or bool(p.workers),
            )
        )
        if step is None:
            return
        if step.hold:
            p.want_cluster = False
            p.queue_hold = step.message
        name = state.name if state is not None else workload_name(p.kind, p.name, p.uid)
        previous = status.queue or QueueStatus()
        status.queue = QueueStatus(
            name=queue or (state.queue if state else ""),
            workload=name,
            cluster_queue=state.cluster_queue if state is not None and step.admitted else "",
            preemptions=previous.preemptions,
        )
        was_admitted = any(c.type == COND_ADMITTED and c.status == "True" for c in status.conditions)
        await self._apply_queue_step(p, step, queue, body, state)
        if step.admitted and state is not None:
            head, workers = await self._placement(p, state, body)
            p.cluster = dataclasses.replace(p.cluster, head_assigned=head, workers_assigned=workers)
            if not was_admitted:
                p.event("Normal", "Admitted", f"Workload {state.name} {step.message}")
        if step.action == "requeue" and state is not None and not state.deactivated_by_suspend:
            status.queue.preemptions += 1  # the user's own spec.suspend is no preemption
        p.condition(COND_ADMITTED, step.admitted, step.reason or "Pending", step.message)

    def _started(self, p: TrainingPass) -> bool:
        return p.head is not None or bool(p.workers) or p.phase in TERMINAL_PHASES

    async def _implicit_queue(self, p: TrainingPass, state: WorkloadState | None) -> str:
        """Kueue's LocalQueueDefaulting for a job without the label: ``default`` when that LocalQueue
        exists. Asked only of a job about to start (no pods, no Workload) or one whose label was
        removed while it had a Workload: a job already running unqueued is left alone (Kueue too
        defaults only at creation), and an idle pass makes no call."""
        if not (self.settings.kueue_served and self.settings.kueue_default_queue):
            return ""
        if state is None and (self._started(p) or p.parsed.suspend):
            return ""
        if state is not None and state.queue == DEFAULT_LOCAL_QUEUE:
            return DEFAULT_LOCAL_QUEUE  # already there: no call on every pass of a queued/running job
        found = await self.kube.read("LocalQueue", p.namespace, DEFAULT_LOCAL_QUEUE)
        return DEFAULT_LOCAL_QUEUE if found is not None else ""

    def _queue_required(self, p: TrainingPass, state: WorkloadState | None) -> bool:
        """--kueue-require-queue holds a queue-less job that has not started (one running on an
        admitted Workload keeps it; a running job is not stopped by turning the setting on)."""
        if not self.settings.kueue_queue_required or p.parsed.suspend:
            return False
        if state is not None:
            return not state.quota_reserved
        return not self._started(p)

    async def _apply_queue_step(
        self,
        p: TrainingPass,
        step: QueueStep,
        queue: str,
        body: dict[str, Any] | None,
        state: WorkloadState | None,
    ) -> None:
        """The Workload write a step asks for (every one idempotent, conditional where it matters)."""
        ns = p.namespace
        if step.action == "create":
            created = await self._create_workload(p, queue)
            if created is not None:
                self._wl_written[p.key] = created
                p.event(
                    "Normal",
                    "CreatedWorkload",
                    f"created Kueue Workload {created['metadata']['name']} in LocalQueue {queue}",
                )
            return
        if body is None or state is None:
            return
        if step.action == "delete":
            await self.kube.delete("Workload", ns, state.name, state.uid)
            self._wl_deleted[p.key] = state.uid
            self._wl_written.pop(p.key, None)
            self._placements.pop(p.key, None)
            p.event("Normal", "DeletedWorkload", f"deleted Kueue Workload {state.name}: {step.message}")
        elif step.action == "set-queue":
            self._wl_written[p.key] = await self.kube.patch(
                "Workload", ns, state.name, {"spec": {"queueName": queue}}
            )
        elif step.action == "set-active":
            patch = active_patch(not p.parsed.suspend)
            self._wl_written[p.key] = await self.kube.patch("Workload", ns, state.name, patch)
        elif step.action == "requeue" and step.evicted is not None:
            self._wl_written[p.key] = await self.kube.patch_status(
                "workloads", ns, state.name, requeue_patch(body, step.evicted, p.at),
                resource_version=state.resource_version or None,
            )  # fmt: skip
            self._placements.pop(p.key, None)
            if not state.deactivated_by_suspend:
                reason = "Preempted" if step.evicted.reason == "Preempted" else "Evicted"
                p.event("Warning", reason, f"{step.message} (attempt {p.status.attempt} stopped)")
        elif step.action == "finish":
            succeeded = p.phase == "Succeeded"
            self._wl_written[p.key] = await self.kube.patch_status(
                "workloads", ns, state.name, finish_patch(body, succeeded, p.status.message, p.at),
                resource_version=state.resource_version or None,
            )  # fmt: skip
            p.event("Normal", "FinishedWorkload", f"Kueue Workload {state.name} finished: quota released")

    async def _create_workload(self, p: TrainingPass, queue: str) -> dict[str, Any] | None:
        """Create the Workload (priority from its WorkloadPriorityClass); None: held with a message."""
        assert p.cluster is not None
        priority_class = str((p.meta.get("labels") or {}).get(PRIORITY_LABEL) or "")
        priority: int | None = None
        if priority_class:
            wpc = await self.kube.read("WorkloadPriorityClass", "", priority_class)
            if wpc is None:
                p.queue_hold = (
                    f"WorkloadPriorityClass {priority_class} (label {PRIORITY_LABEL}) not found: create it "
                    "or fix the label"
                )
                p.want_cluster = False
                return None
            priority = int(wpc.get("value") or 0)
        obj = build_workload(
            p.cluster, p.parsed.workers.replicas, queue=queue, api_version=self.settings.kueue_api,
            priority_class=priority_class, priority=priority, active=not p.parsed.suspend,
        )  # fmt: skip
        try:
            return await self.kube.create(obj)
        except AlreadyExists:
            name = obj["metadata"]["name"]
            found = await self.kube.read("Workload", p.namespace, name)
        if found is None or controller_uid(found) == p.uid:
            return found  # ours (a restart before the watch delivered it), or gone: created next pass
        # Someone else's object under the name this job's Workload must have: never adopted.
        p.queue_hold = (
            f"Workload {name} already exists and is not this job's (its controller is not this "
            "LLMTrainingJob): delete it so the job's own Workload can be created"
        )
        p.want_cluster = False
        p.event("Warning", "WorkloadNameTaken", p.queue_hold)
        return None

    async def _placement(
        self, p: TrainingPass, state: WorkloadState, body: dict[str, Any] | None
    ) -> tuple[Assigned, Assigned]:
        """nodeSelector and tolerations of the ResourceFlavors Kueue assigned to each pod set.

        Resolved once per admission and recorded on the Workload: later flavor edits, and an
        operator restart, never change (and so never recreate) the pods of a running job.
        """
        signature = admission_id(state)
        cached = self._placements.get(p.key)
        if cached is not None and cached[0] == signature:
            return cached[1]
        recorded = recorded_placement(body or {}, signature)
        if recorded is not None:
            self._placements[p.key] = (signature, recorded)
            return recorded
        names = {f for pod_set in (POD_SET_HEAD, POD_SET_WORKERS) for f in state.flavors.get(pod_set, ())}
        read = {name: await self.kube.read("ResourceFlavor", "", name) for name in sorted(names)}
        head, workers = (
            flavor_placement([f for name in state.flavors.get(s, ()) if (f := read[name]) is not None])
            for s in (POD_SET_HEAD, POD_SET_WORKERS)
        )
        result = (head, workers)
        patch = placement_annotation(signature, *result)
        self._wl_written[p.key] = await self.kube.patch("Workload", p.namespace, state.name, patch)
        self._placements[p.key] = (signature, result)
        return result

    def forget(self, key: Key) -> None:
        self._wl_written.pop(key, None)
        self._wl_deleted.pop(key, None)
        self._placements.pop(key, None)
        super().forget(key)

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
        if spec is not None and p.phase not in TERMINAL_PHASES and not spec.suspend and p.queue_hold is None:
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
                queued=p.queue_hold if not (p.phase in TERMINAL_PHASES and not retrying) else None,
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
        held = p.parsed.suspend or p.queue_hold is not None
        suspended = held and p.phase not in TERMINAL_PHASES
        if not suspended or not status.job_id or p.cluster is None:
            return
        why = "suspended" if p.parsed.suspend else "held by its Kueue queue"
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
        p.event("Normal", "StoppedRayJob", f"stopped Ray job {status.job_id} ({why})")
        status.attempt += 1
        status.job_id = ""
        status.start_time = None  # like a Job: activeDeadlineSeconds restarts on resume
        status.next_attempt_at = None
        self.running.pop(p.key, None)
        if p.parsed.suspend:
            p.condition(COND_JOB, False, "Suspended", "spec.suspend is true: Ray job stopped")
        else:
            p.condition(COND_JOB, False, "Queued", f"{p.queue_hold}: Ray job stopped")

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
