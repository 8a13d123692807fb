"""The two state machines: what phase a resource is in next, from what one pass observed.

Pure functions (no I/O, no clock), the only place a phase is chosen. The controllers gather the
inputs (spec, the cluster's health, what Ray said), call :func:`training_next` or
:func:`deployment_next`, and write the :class:`Next` they return into status. What to *do* on Ray
is decided by the pure functions of :mod:`llmray.controllers.decisions` (``decide_training``,
``serve_app_config``); ``docs/how-the-operator-decides.md`` draws both machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from llmray.api.training import TERMINAL_PHASES
from llmray.builders.status import R_FINISHED, R_SUSPENDED, R_UNSCHEDULABLE, Blocker, ClusterHealth
from llmray.ray.serve import ServeApplication

from .decisions import R_DEADLINE, ServeVerdict, TrainingStep, serve_verdict

R_QUEUED = "Queued"
CLUSTER_READY_MESSAGE = "Ray cluster ready"
SUSPENDED_MESSAGE = "spec.suspend is true: Ray pods removed; set it to false to resume"
DEPLOYING_MESSAGE = "Ray cluster ready; deploying the Serve application"


@dataclass(frozen=True)
class RayProblem:
    """The head could not be reached, or refused a request (reported, retried)."""

    reason: str
    message: str


@dataclass(frozen=True)
class Next:
    """A machine's decision: the phase, and what status says about it."""

    phase: str
    message: str | None = None
    """New ``status.message`` (None: keep the current one)."""
    cluster: tuple[bool | str, str, str] | None = None
    """(status, reason, message) of the ``RayClusterReady`` condition (None: leave it)."""
    finished: bool = False
    """The resource reached a final phase now: stamp ``completionTime`` if unset."""
    reopened: bool = False
    """A finished resource starts over (clear ``completionTime``)."""
    serve: ServeVerdict | None = None
    """Deployments: the Serve application's verdict, when the pass saw it."""


# --- LLMTrainingJob ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSeen:
    """What a pass observed about one LLMTrainingJob."""

    phase: str
    """The phase the pass started from."""
    blocker: Blocker | None = None
    retrying: bool = False
    """It Failed for a cluster reason and its spec changed since: start over."""
    suspended: bool = False
    health: ClusterHealth | None = None
    unschedulable_timeout: float = 300.0
    job: TrainingStep | None = None
    """What the Ray step did with the current attempt (None: Ray not consulted this pass)."""
    ray_problem: RayProblem | None = None
    keep_failure: bool = False
    """Finished with a failure condition on the cluster that must stay (it names the cause)."""
    pods_after_finish: str = "deleted"
    """What happened to the pods of a finished job (for the condition message)."""
    deadline: str | None = None
    """spec.activeDeadlineSeconds has passed: why it fails (see ``decisions.deadline_left``)."""
    queued: str | None = None
    """Held by its Kueue queue (not admitted, or evicted): why (see ``queueing.decide_queue``)."""


def training_next(s: TrainingSeen) -> Next:
    """Pending -> [Queued ->] Provisioning -> Running -> Succeeded | Failed; Suspended; Failed on
    cluster errors.

    Order: a finished job stays finished (unless retrying); a blocker fails it (fatal) or holds
    it Pending; suspension; held by its Kueue queue (Queued: not admitted yet, or evicted); a
    passed deadline fails it (DeadlineExceeded, whatever Ray said); an
    Unschedulable timeout fails it; then the Ray job's own state; then the cluster's (ready:
    Running, else Provisioning).
    """
    phase = "Pending" if s.retrying else s.phase
    if phase in TERMINAL_PHASES and s.blocker is None:
        if s.keep_failure:
            return Next(phase)
        return Next(phase, cluster=(False, R_FINISHED, f"job {phase}; Ray pods {s.pods_after_finish}"))
    if s.blocker is not None:
        cluster = (False, s.blocker.reason, s.blocker.message)
        if s.blocker.fatal:
            return Next("Failed", s.blocker.message, cluster, finished=True)
        return Next("Running" if phase == "Running" else "Pending", s.blocker.message, cluster)
    if s.suspended:
        return Next("Suspended", SUSPENDED_MESSAGE, (False, R_SUSPENDED, SUSPENDED_MESSAGE))
    if s.queued is not None:
        return Next("Queued", s.queued, (False, R_QUEUED, s.queued), reopened=s.retrying)
    if s.deadline is not None:
        return Next("Failed", s.deadline, (False, R_DEADLINE, s.deadline), finished=True)
    health = s.health
    if health is None:
        return Next(phase, reopened=s.retrying)
    if health.unschedulable_for > s.unschedulable_timeout:
        gave_up = f"gave up after {int(s.unschedulable_timeout)}s: {health.message}"
        return Next("Failed", gave_up, (False, R_UNSCHEDULABLE, gave_up), finished=True)
    cluster = (health.ready, health.reason, health.message)
    message: str | None
    if s.job is not None and s.job.phase:
        return Next(
            s.job.phase, s.job.message, cluster, finished=s.job.phase in TERMINAL_PHASES, reopened=s.retrying
        )
    if health.ready:
        nxt = "Running" if phase in ("Pending", "Queued", "Provisioning", "Suspended") else phase
        message = CLUSTER_READY_MESSAGE if nxt != phase else None
    else:
        nxt, message = "Provisioning", health.message
    if s.ray_problem is not None:
        message = s.ray_problem.message
    return Next(nxt, message, cluster, reopened=s.retrying)


# --- LLMDeployment -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentSeen:
    """What a pass observed about one LLMDeployment."""

    phase: str
    blocker: Blocker | None = None
    health: ClusterHealth | None = None
    unschedulable_timeout: float = 300.0
    serve_seen: bool = False
    """The pass read the Serve application's status (``app`` None: Serve does not have it yet)."""
    app: ServeApplication | None = None
    min_replicas: int = 1
    ray_problem: RayProblem | None = None


def deployment_next(s: DeploymentSeen) -> Next:
    """Pending -> Deploying -> Ready <-> Degraded; Failed on blockers, timeouts, a failed deploy.

    Order: a blocker (no model yet: Pending; a missing Secret, a failed training job, a name
    clash: Failed); an Unschedulable timeout; the cluster (not ready: Deploying, or Degraded once it
    was Ready); then Serve's verdict on the application, which a not-ready cluster can only lower.
    """
    phase = s.phase
    if s.blocker is not None:
        cluster = (False, s.blocker.reason, s.blocker.message)
        return Next("Failed" if s.blocker.fatal else "Pending", s.blocker.message, cluster)
    health = s.health
    if health is None:
        return Next(phase)
    if health.unschedulable_for > s.unschedulable_timeout:
        return Next("Failed", health.message, (False, R_UNSCHEDULABLE, health.message))
    cluster = (health.ready, health.reason, health.message)
    message: str | None
    if health.ready:
        base = "Deploying" if phase in ("Pending", "Failed") else phase
        message = DEPLOYING_MESSAGE if base == "Deploying" else None
    else:
        base = "Degraded" if phase in ("Ready", "Degraded") else "Deploying"
        message = health.message
    if s.serve_seen:
        verdict = serve_verdict(s.app, base, s.min_replicas)
        if health.ready or verdict.phase != "Ready":
            return Next(verdict.phase, verdict.message, cluster, serve=verdict)
        return Next(base, message, cluster, serve=verdict)
    if s.ray_problem is not None:
        message = s.ray_problem.message
    return Next(base, message, cluster)


# --- thresholds a user must act on (a condition and an Event each) -------------------------------

COND_STALLED = "Stalled"
COND_QUEUE_FULL = "QueueFull"


@dataclass(frozen=True)
class Alarm:
    """A threshold condition: ``active`` True means the user should act (Warning Event)."""

    type: str
    active: bool
    reason: str
    message: str


def training_stalled(phase: str, last_progress: datetime | None, at: datetime, after: float) -> Alarm | None:
    """``Stalled`` of a training job: Running, and no new progress report for ``after`` seconds.

    ``last_progress`` is when the report last changed (or the job started, before any report).
    None: not applicable (not Running, or nothing submitted yet): the condition is removed.
    """
    if phase != "Running" or last_progress is None or after <= 0:
        return None
    quiet = (at - last_progress).total_seconds()
    if quiet >= after:
        return Alarm(
            COND_STALLED,
            True,
            "NoProgress",
            # stable text (the threshold, not the time elapsed): no status write on every pass
            f"no new progress report for more than {_duration(after)}: check the Ray job's logs "
            "(`ray job logs`) or the workers' pods",
        )
    return Alarm(COND_STALLED, False, "Progressing", "progress reports keep coming")


def _duration(seconds: float) -> str:
    """``600`` -> ``10m``, ``90`` -> ``90s``."""
    whole = int(seconds)
    return f"{whole // 60}m" if whole >= 60 and whole % 60 == 0 else f"{whole}s"


def queue_full(waiting: int, max_queued: int, ratio: float) -> Alarm:
    """``QueueFull`` of a deployment: waiting requests at ``ratio`` of spec.limits.maxQueuedRequests
    (past the limit, clients get 503)."""
    limit = max(1, int(max_queued * ratio)) if max_queued > 0 else 1
    if waiting >= limit:
        return Alarm(
            COND_QUEUE_FULL,
            True,
            "Saturated",
            f"{waiting} requests waiting (limit {max_queued}): raise spec.autoscaling.maxReplicas or "
            "spec.workers.maxReplicas, or spec.limits.maxQueuedRequests",
        )
    return Alarm(COND_QUEUE_FULL, False, "BelowLimit", f"{waiting} requests waiting (limit {max_queued})")
