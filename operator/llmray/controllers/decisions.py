"""Pure decisions of the Ray integration (no I/O): training job lifecycle, progress, Serve status.

The controllers' ``ray_steps`` observe Ray (job state, log tail, Serve status, demand), call these
functions and apply what they return. Everything here is unit-tested without Ray or Kubernetes
(``tests/unit/test_ray_decisions.py``).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from llmray.api.deployment import LLMDeploymentSpec
from llmray.api.runtime import (
    API_KEY_ENV,
    SERVE_APP_IMPORT_PATH,
    SERVE_DEPLOYMENT_NAME,
    TRAIN_ENTRYPOINT_MODULE,
    AdapterSource,
    ProgressReport,
    ServeAppArgs,
    ServeUserConfig,
    TrainingRun,
)
from llmray.api.training import CheckpointStatus, Progress
from llmray.ray.jobs import JobInfo, JobStatus
from llmray.ray.serve import ServeApplication

# --- training ------------------------------------------------------------------------------------

TRAINING_RUN_ENV = "LLMRAY_TRAINING_RUN_B64"
"""Environment variable of the Ray job holding the TrainingRun JSON, base64-encoded (no quoting
issues in the shell entrypoint, no file to share between operator and head)."""
POLL_RUNNING_S = 5.0
"""Requeue while a job runs: progress in status is at most this (plus one pass) old."""
POLL_PENDING_S = 3.0

# Metadata on every Ray job the operator submits (``ray job list`` shows whose it is).
META_NAMESPACE = "llmray.io/namespace"
META_NAME = "llmray.io/name"
META_UID = "llmray.io/uid"
META_ATTEMPT = "llmray.io/attempt"

TrainingAction = Literal["wait", "backoff", "submit", "poll", "succeed", "restart", "fail"]
MAX_BACKOFF_S = 3600.0
"""Longest wait between restarts, whatever failurePolicy.backoffSeconds doubles to."""
R_DEADLINE = "DeadlineExceeded"
R_BACKING_OFF = "BackingOff"


@dataclass(frozen=True)
class TrainingStep:
    """What to do with a training job's current attempt, and what status then says."""

    action: TrainingAction
    attempt: int
    restarts: int
    phase: str
    reason: str
    message: str
    requeue_after: float | None = None
    delay: float = 0.0
    """restart: seconds to wait before submitting the next attempt (failurePolicy.backoffSeconds)."""


def restart_delay(backoff_seconds: int, restart: int) -> float:
    """Wait before restart number ``restart`` (1, 2, ...): exponential, like a Job's pod backoff.

    ``backoff_seconds`` x 2^(restart-1), at most :data:`MAX_BACKOFF_S`; 0 means no wait.
    """
    if backoff_seconds <= 0 or restart <= 0:
        return 0.0
    return float(min(MAX_BACKOFF_S, backoff_seconds * 2 ** min(restart - 1, 32)))


def deadline_left(start: datetime | None, deadline_seconds: int | None, at: datetime) -> float | None:
    """Seconds left before ``spec.activeDeadlineSeconds`` (<= 0: exceeded); None when it does not apply.

    It counts from ``status.startTime`` (the first submission) and runs through restarts and
    backoffs; a job not started yet has no deadline running.
    """
    if deadline_seconds is None or start is None:
        return None
    return deadline_seconds - (at - start).total_seconds()


def deadline_message(deadline_seconds: int) -> str:
    """status.message of a job stopped at its deadline."""
    return (
        f"the job ran longer than spec.activeDeadlineSeconds ({deadline_seconds}s, counted from "
        "status.startTime across restarts): stopped; raise the deadline or lower the work "
        "(e.g. hyperparameters.maxSteps) and re-create the job"
    )


def training_entrypoint() -> str:
    """The Ray job entrypoint: the TrainingRun comes from the job's env (base64 JSON) on stdin."""
    return f'echo "${TRAINING_RUN_ENV}" | base64 -d | python -m {TRAIN_ENTRYPOINT_MODULE} --config -'


def encode_training_run(run: TrainingRun) -> str:
    """The TrainingRun as the base64 text the entrypoint decodes."""
    raw = json.dumps(run.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=True)
    return base64.b64encode(raw.encode()).decode()


def decide_training(
    *,
    attempt: int,
    restarts: int,
    max_restarts: int,
    job: JobInfo | None,
    cluster_ready: bool,
    submission_id: str,
    submitted: bool = False,
    backoff_seconds: int = 0,
    not_before: datetime | None = None,
    at: datetime | None = None,
) -> TrainingStep:
    """The next step of one training job from what Ray says about attempt ``attempt``.

    - no job for this attempt: submit it once the cluster is ready (the id is deterministic, so a
      repeated submit after a crash adopts the running job instead of starting a second one);
    - no job for an attempt status says was ``submitted``: the head lost it (a restarted head
      forgets its jobs). That is a failed attempt like any other: the next one (once the cluster
      is ready again) while restarts are left, else Failed -- never a resubmission of the same
      attempt forever;
    - PENDING/RUNNING: keep polling (progress mirrored by the caller);
    - SUCCEEDED: Succeeded;
    - FAILED/STOPPED: the next attempt while ``restarts < max_restarts`` (it resumes from the run's
      checkpoints by itself), else Failed. With ``backoff_seconds`` the restart carries a delay
      (:func:`restart_delay`): the caller records ``not_before`` and submits nothing until then;
      until ``at`` reaches it the step is ``backoff`` ("restarting at <time> (backoff Ns)").
    """
    if job is None and not submitted and not_before is not None and at is not None and at < not_before:
        left = math.ceil((not_before - at).total_seconds())
        delay = math.ceil(restart_delay(backoff_seconds, restarts))
        backoff = f"backoff {delay}s, " if delay > 0 else ""
        # the absolute time, not the seconds left: the condition stays the same on every pass
        return TrainingStep(
            "backoff",
            attempt,
            restarts,
            "Running",
            R_BACKING_OFF,
            f"attempt {attempt - 1} failed; restarting at {_utc(not_before)} ({backoff}restart "
            f"{restarts}/{max_restarts}, failurePolicy.backoffSeconds)",
            float(left),
        )
    if job is None and submitted:
        if restarts < max_restarts and not cluster_ready:
            return TrainingStep(
                "wait", attempt, restarts, "", "WaitingForCluster", "waiting for the Ray cluster"
            )
        lost = f"Ray job {submission_id} is gone from the Ray head (the head restarted or lost it)"
        return _failed_attempt(
            lost,
            "JobLost",
            attempt=attempt,
            restarts=restarts,
            max_restarts=max_restarts,
            backoff=backoff_seconds,
            at=at,
        )
    if job is None:
        if not cluster_ready:
            return TrainingStep(
                "wait", attempt, restarts, "", "WaitingForCluster", "waiting for the Ray cluster"
            )
        return TrainingStep(
            "submit",
            attempt,
            restarts,
            "Running",
            "Submitted",
            f"submitted Ray job {submission_id} (attempt {attempt})",
            POLL_PENDING_S,
        )
    if job.status == JobStatus.PENDING:
        return TrainingStep(
            "poll",
            attempt,
            restarts,
            "Running",
            "JobPending",
            f"Ray job {submission_id} is starting (attempt {attempt})",
            POLL_PENDING_S,
        )
    if job.status == JobStatus.RUNNING:
        return TrainingStep(
            "poll",
            attempt,
            restarts,
            "Running",
            "JobRunning",
            f"Ray job {submission_id} is running (attempt {attempt})",
            POLL_RUNNING_S,
        )
    if job.status == JobStatus.SUCCEEDED:
        return TrainingStep(
            "succeed", attempt, restarts, "Succeeded", "JobSucceeded", f"Ray job {submission_id} succeeded"
        )
    why = f"Ray job {submission_id} {job.status.value}" + (f": {job.message}" if job.message else "")
    return _failed_attempt(
        why,
        "JobFailed",
        attempt=attempt,
        restarts=restarts,
        max_restarts=max_restarts,
        backoff=backoff_seconds,
        at=at,
    )


def _utc(when: datetime) -> str:
    """``2026-11-29T18:40:00Z``: the form status timestamps take."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _failed_attempt(
    why: str,
    reason: str,
    *,
    attempt: int,
    restarts: int,
    max_restarts: int,
    backoff: int = 0,
    at: datetime | None = None,
) -> TrainingStep:
    """A failed (or lost) attempt: the next one (after the backoff) while restarts are left, else Failed."""
    if restarts < max_restarts:
        delay = restart_delay(backoff, restarts + 1)
        when = ""
        if delay > 0:
            start = f" at {_utc(at + timedelta(seconds=delay))}" if at is not None else ""
            when = f"{start} (backoff {math.ceil(delay)}s)"
        return TrainingStep(
            "restart",
            attempt + 1,
            restarts + 1,
            "Running",
            R_BACKING_OFF if delay > 0 else "Restarting",
            f"{why}; restarting{when}: restart {restarts + 1}/{max_restarts} resumes from the latest "
            "checkpoint",
            delay or 0.0,
            delay,
        )
    return TrainingStep(
        "fail",
        attempt,
        restarts,
        "Failed",
        reason,
        f"{why}; no restarts left (failurePolicy.maxRestarts={max_restarts})",
    )


def format_duration(seconds: float) -> str:
    """``3m20s``-style duration (``1h02m``, ``45s``)."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None or not math.isfinite(value) else format(value, fmt)


def bounded(value: float | None, cap: float) -> float:
    """An untrusted figure as a finite number in [0, cap] (NaN, None and negatives: 0)."""
    if value is None or not math.isfinite(value) or value < 0:
        return 0.0
    return min(float(value), cap)


def mfu_text(value: float | None) -> str:
    """MFU for status, as a percentage with one decimal; "" when unknown or impossible (the report
    is untrusted: NaN, negative or above 100% of peak are not shown)."""
    if value is None or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        return ""
    return f"{value * 100:.1f}%"


def _uri(path: str) -> str:
    return f"file://{path}" if path.startswith("/") else path


def progress_status(
    report: ProgressReport, previous: Progress, at: datetime
) -> tuple[Progress, CheckpointStatus | None]:
    """Status progress (and latest checkpoint) from the job's last progress line.

    ``updatedAt`` moves only when the report itself changed, so an unchanged job costs no write.
    """
    total = report.total_steps
    percent = min(100, int(100 * report.step / total)) if total > 0 else 0
    if report.state == "finished":
        percent = 100
    eta = ""
    if 0 < report.step < total and report.elapsed_seconds:
        eta = format_duration((total - report.step) * report.elapsed_seconds / report.step)
    elif report.state == "finished" or (total and report.step >= total):
        eta = "0s"
    progress = Progress(
        step=report.step,
        total_steps=total,
        percent=percent,
        epoch=round(report.epoch, 3),
        loss=_num(report.loss, ".4f"),
        eval_loss=_num(report.eval_loss, ".4f"),
        learning_rate=_num(report.learning_rate, ".2e"),
        tokens_per_second=int(bounded(report.tokens_per_second, 1e12)),
        mfu=mfu_text(report.mfu),
        eta=eta,
        updated_at=previous.updated_at,
    )
    if progress.model_dump(exclude={"updated_at"}) != previous.model_dump(exclude={"updated_at"}):
        progress.updated_at = at
    checkpoint = None
    if report.checkpoint_path:
        checkpoint = CheckpointStatus(uri=_uri(report.checkpoint_path), step=report.checkpoint_step or 0)
    return progress, checkpoint


def output_version(report: ProgressReport | None, uid: str, attempt: int) -> str:
    """``status.output.version`` of a Succeeded job: the export's own version from its final report;
    from a runtime that reports none, ``<uid prefix>-<attempt>`` (still new for every run)."""
    if report is not None and report.model_version:
        return report.model_version[:128]
    return f"{(uid or 'job')[:8]}-{attempt}"


def failure_event(message: str, log_tail: str, max_chars: int = 1000) -> str:
    """Event text for a failed job: what happened plus the end of its log (whole lines)."""
    lines = [ln for ln in log_tail.splitlines() if ln.strip() and "LLMRAY_PROGRESS" not in ln]
    room = max_chars - len(message) - len("\nlast log lines:\n")
    tail: list[str] = []
    for line in reversed(lines[-20:]):
        if room - len(line) - 1 < 0:
            break
        tail.insert(0, line)
        room -= len(line) + 1
    return message + ("\nlast log lines:\n" + "\n".join(tail) if tail else "")


# --- serving -------------------------------------------------------------------------------------


def serve_app_config(
    *,
    app_name: str,
    route_prefix: str,
    resource_name: str,
    spec: LLMDeploymentSpec,
    model_path: str | None,
    api_key: str | None,
    api_key_in_pods: bool,
    adapters: Sequence[AdapterSource] = (),
    model_version: str = "",
) -> dict[str, Any]:
    """One entry of Serve's ``applications`` for an LLMDeployment.

    ``api_key_in_pods``: the Ray pods carry ``LLMRAY_API_KEY`` from the Secret (a real cluster);
    otherwise (one shared head, the sandbox) ``api_key`` goes into the app's runtime_env.

    ``adapters`` (resolved spec.adapters) stay out of ``args``: a change of ``args`` rebuilds the
    application and restarts every replica. The transformers engine gets them as its deployment's
    ``user_config``, which Serve hands to the running replicas' ``reconfigure()`` (a lightweight
    update, no restart); vLLM (Ray Serve LLM) takes them at build time, in ``args``.
    ``model_version`` is part of the args: a new version is a new Serve code version, which Serve
    rolls out replica by replica (new ones up before old ones stop, see the deployment options).
    """
    transformers = spec.engine == "transformers"
    args = ServeAppArgs(
        name=resource_name,
        spec=spec.model_copy(update={"adapters": []}),
        model_path=model_path,
        api_key_env=API_KEY_ENV if spec.api_key_secret_ref is not None else None,
        route_prefix=route_prefix,
        adapters=[] if transformers else list(adapters),
        model_version=model_version or None,
    )
    config: dict[str, Any] = {
        "name": app_name,
        "route_prefix": route_prefix,
        "import_path": SERVE_APP_IMPORT_PATH,
        "args": args.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    if transformers:
        user_config = ServeUserConfig(adapters=list(adapters))
        config["deployments"] = [
            {"name": SERVE_DEPLOYMENT_NAME, "user_config": user_config.model_dump(mode="json", by_alias=True)}
        ]
    if spec.api_key_secret_ref is not None and not api_key_in_pods and api_key:
        config["runtime_env"] = {"env_vars": {API_KEY_ENV: api_key}}
    return config


def deployed_model_version(app: ServeApplication | None) -> str | None:
    """The model version in the config Serve has deployed (None: no app or no config)."""
    if app is None or app.deployed_config is None:
        return None
    args = app.deployed_config.get("args")
    version = args.get("modelVersion") if isinstance(args, dict) else None
    return version[:128] if isinstance(version, str) else ""


@dataclass(frozen=True)
class Rollout:
    """Which model version serves, and which one is on its way."""

    serving: str
    pending: str

    @property
    def rolling(self) -> bool:
        return bool(self.pending)


def model_rollout(serving: str, target: str, app: ServeApplication | None, *, just_written: bool) -> Rollout:
    """The version the replicas serve once Serve says the config carrying ``target`` is RUNNING.

    Until then (just written, still DEPLOYING, or failed) the previous version keeps serving: Serve
    starts the new replicas before it stops the old ones. A config written in this very pass is
    never taken as rolled out (Serve may still report the old state for a moment).
    """
    if target == serving:
        return Rollout(serving, "")
    done = (
        not just_written
        and app is not None
        and app.status == "RUNNING"
        and deployed_model_version(app) == target
    )
    return Rollout(target, "") if done else Rollout(serving, target)


@dataclass(frozen=True)
class ServeVerdict:
    """Phase, reason and message of a deployment from its Serve application's status."""

    phase: str
    reason: str
    message: str
    ready_replicas: int
    desired_replicas: int | None


def serve_verdict(app: ServeApplication | None, previous_phase: str, min_replicas: int) -> ServeVerdict:
    """Ready when Serve says RUNNING; Degraded when a Ready app turns unhealthy; Deploying else."""
    if app is None:
        return ServeVerdict("Deploying", "Deploying", "deploying the Serve application", 0, None)
    ready = app.running_replicas
    desired = app.target_replicas if app.deployments else None
    detail = app.message or "; ".join(
        f"{d.name}: {d.status}" + (f" ({d.message})" if d.message else "")
        for d in app.deployments.values()
        if d.status != "HEALTHY"
    )
    if app.status == "RUNNING":
        return ServeVerdict(
            "Ready", "ServeRunning", f"Serve application {app.name} is running", ready, desired
        )
    if app.status in ("UNHEALTHY", "DEPLOY_FAILED"):
        phase = "Degraded" if previous_phase in ("Ready", "Degraded") else "Deploying"
        if app.status == "DEPLOY_FAILED" and previous_phase not in ("Ready", "Degraded"):
            phase = "Failed"
        return ServeVerdict(
            phase,
            "ServeUnhealthy" if app.status == "UNHEALTHY" else "ServeDeployFailed",
            f"Serve application {app.name} is {app.status}" + (f": {detail}" if detail else ""),
            ready,
            desired,
        )
    # DEPLOYING, NOT_STARTED, DELETING: an update of a Ready app keeps serving the old replicas.
    if previous_phase == "Ready" and ready >= max(1, min_replicas):
        return ServeVerdict(
            "Ready",
            "ServeUpdating",
            f"Serve application {app.name} is updating ({app.status})",
            ready,
            desired,
        )
    return ServeVerdict(
        "Deploying",
        "Deploying",
        f"Serve application {app.name} is {app.status}" + (f": {detail}" if detail else ""),
        ready,
        desired,
    )


def deployed_adapters(app: ServeApplication | None) -> dict[str, str] | None:
    """Adapter name -> source in the user_config Serve has deployed (None: no such config).

    Read defensively: the deployed config comes from the (untrusted) head.
    """
    config: Mapping[str, Any] = (app.deployed_config or {}) if app is not None else {}
    deployments = config.get("deployments")
    for entry in deployments if isinstance(deployments, list) else []:
        if not isinstance(entry, Mapping) or entry.get("name") != SERVE_DEPLOYMENT_NAME:
            continue
        user_config = entry.get("user_config")
        adapters = user_config.get("adapters") if isinstance(user_config, Mapping) else None
        if not isinstance(adapters, list):
            return None
        out: dict[str, str] = {}
        for item in adapters[:64]:
            if isinstance(item, Mapping) and isinstance(item.get("name"), str):
                out[str(item["name"])[:63]] = str(item.get("source", ""))[:2048]
        return out
    return None
