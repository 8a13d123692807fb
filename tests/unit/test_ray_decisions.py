"""Pure decisions of the Ray integration: training lifecycle, progress mirroring, Serve status."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llmray.api.deployment import LLMDeploymentSpec
from llmray.api.runtime import API_KEY_ENV, SERVE_APP_IMPORT_PATH, ProgressReport, ServeAppArgs, TrainingRun
from llmray.api.training import LLMTrainingJobSpec, Progress
from llmray.controllers.decisions import (
    Rollout,
    deadline_left,
    decide_training,
    deployed_model_version,
    encode_training_run,
    failure_event,
    format_duration,
    model_rollout,
    output_version,
    progress_status,
    restart_delay,
    serve_app_config,
    serve_verdict,
    training_entrypoint,
)
from llmray.ray.jobs import JobInfo, JobStatus
from llmray.ray.serve import DeploymentStatus, ServeApplication

pytestmark = pytest.mark.unit

AT = datetime(2026, 1, 1, tzinfo=UTC)


def job(status: JobStatus, message: str = "") -> JobInfo:
    return JobInfo(submission_id="sid", status=status, message=message)


def step(
    j: JobInfo | None, *, attempt: int = 0, restarts: int = 0, max_restarts: int = 1, ready: bool = True
):  # type: ignore[no-untyped-def]
    return decide_training(
        attempt=attempt,
        restarts=restarts,
        max_restarts=max_restarts,
        job=j,
        cluster_ready=ready,
        submission_id="sid",
    )


def test_submit_only_when_ready_and_unknown() -> None:
    assert step(None, ready=False).action == "wait"
    s = step(None)
    assert (s.action, s.attempt, s.phase) == ("submit", 0, "Running")
    # A known job is adopted, never resubmitted (operator restart, repeated pass).
    assert step(job(JobStatus.RUNNING)).action == "poll"
    assert step(job(JobStatus.PENDING), ready=False).action == "poll"


def test_running_polls_every_few_seconds() -> None:
    s = step(job(JobStatus.RUNNING))
    assert s.requeue_after is not None and s.requeue_after <= 5


def test_success() -> None:
    s = step(job(JobStatus.SUCCEEDED))
    assert (s.action, s.phase) == ("succeed", "Succeeded")


@pytest.mark.parametrize("status", [JobStatus.FAILED, JobStatus.STOPPED])
def test_failure_restarts_then_fails(status: JobStatus) -> None:
    s = step(job(status, "boom"), attempt=2, restarts=0, max_restarts=2)
    assert (s.action, s.attempt, s.restarts, s.phase) == ("restart", 3, 1, "Running")
    assert "boom" in s.message and "1/2" in s.message
    s = step(job(status, "boom"), attempt=3, restarts=2, max_restarts=2)
    assert (s.action, s.attempt, s.restarts, s.phase) == ("fail", 3, 2, "Failed")
    assert "maxRestarts=2" in s.message


def test_entrypoint_round_trip() -> None:
    spec = LLMTrainingJobSpec.model_validate(
        {"model": {"uri": "file:///m"}, "dataset": {"uri": "file:///d.jsonl"}, "output": {"uri": "file:///o"}}
    )
    run = TrainingRun(name="x", namespace="ns", attempt=2, spec=spec)
    decoded = json.loads(base64.b64decode(encode_training_run(run)))
    assert TrainingRun.model_validate(decoded) == run
    assert "--config -" in training_entrypoint() and "base64 -d" in training_entrypoint()


def test_progress_mapping_and_updated_at() -> None:
    report = ProgressReport(
        step=5, total_steps=20, epoch=0.25, loss=1.23456, tokens_per_second=812.7, elapsed_seconds=10,
        checkpoint_path="/tmp/ck/5", checkpoint_step=5, learning_rate=0.001,
    )  # fmt: skip
    progress, ckpt = progress_status(report, Progress(), AT)
    assert (progress.step, progress.total_steps, progress.percent) == (5, 20, 25)
    assert (progress.loss, progress.tokens_per_second, progress.eta) == ("1.2346", 812, "30s")
    assert progress.learning_rate == "1.00e-03" and progress.updated_at == AT
    assert ckpt is not None and (ckpt.uri, ckpt.step) == ("file:///tmp/ck/5", 5)
    later = datetime(2026, 1, 2, tzinfo=UTC)
    again, _ = progress_status(report, progress, later)
    assert again.updated_at == AT  # same report: no change, no write
    done, _ = progress_status(report.model_copy(update={"step": 20, "state": "finished"}), progress, later)
    assert (done.percent, done.eta, done.updated_at) == (100, "0s", later)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 45, 200, 3725)] == ["0s", "45s", "3m20s", "1h02m"]


def test_failure_event_bounded_without_progress_lines() -> None:
    tail = "\n".join([f"line {i}" for i in range(500)] + ['LLMRAY_PROGRESS {"step": 1}', "Traceback: x"])
    text = failure_event("job failed", tail, max_chars=200)
    assert len(text) <= 200 and text.startswith("job failed") and text.endswith("Traceback: x")
    assert "LLMRAY_PROGRESS" not in text


def dep_spec(**extra: object) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate({"model": {"uri": "file:///m", "name": "m"}, **extra})


def test_serve_app_config_shared_head_carries_api_key() -> None:
    spec = dep_spec(apiKeySecretRef={"name": "k", "key": "key"})
    cfg = serve_app_config(
        app_name="ns-x", route_prefix="/ns/x", resource_name="x", spec=spec,
        model_path="/m", api_key="s3cret", api_key_in_pods=False,
    )  # fmt: skip
    assert cfg["import_path"] == SERVE_APP_IMPORT_PATH and cfg["route_prefix"] == "/ns/x"
    args = ServeAppArgs.model_validate(cfg["args"])
    assert (args.api_key_env, args.model_path, args.route_prefix) == (API_KEY_ENV, "/m", "/ns/x")
    assert cfg["runtime_env"] == {"env_vars": {API_KEY_ENV: "s3cret"}}
    own = serve_app_config(
        app_name="x", route_prefix="/", resource_name="x", spec=spec,
        model_path=None, api_key="s3cret", api_key_in_pods=True,
    )  # fmt: skip
    assert "runtime_env" not in own  # the pods have it from the Secret


def app(status: str, running: int = 1, target: int = 1) -> ServeApplication:
    dep = DeploymentStatus(name="LLM", status="HEALTHY", target_replicas=target, running_replicas=running)
    return ServeApplication(name="a", status=status, deployments={"LLM": dep})


def test_serve_verdict() -> None:
    assert serve_verdict(None, "Deploying", 1).phase == "Deploying"
    v = serve_verdict(app("RUNNING", 2, 2), "Deploying", 1)
    assert (v.phase, v.ready_replicas, v.desired_replicas) == ("Ready", 2, 2)
    assert serve_verdict(app("DEPLOYING", 1, 2), "Ready", 1).phase == "Ready"  # rolling update
    assert serve_verdict(app("DEPLOYING", 0, 1), "Deploying", 1).phase == "Deploying"
    assert serve_verdict(app("UNHEALTHY", 0, 1), "Ready", 1).phase == "Degraded"
    assert serve_verdict(app("DEPLOY_FAILED", 0, 1), "Deploying", 1).phase == "Failed"


def test_sandbox_workers_without_ray_node_absorb_demand_then_idle() -> None:
    """Shared head: a Ready worker pod with no Ray node is capacity on its way while demand is
    pending, and idle since the demand was last seen once it is gone."""
    from llmray.builders.observe import PodView
    from llmray.controllers.deployment import joined_worker_states

    seen: dict[str, float] = {}
    workers = [
        PodView(name="x-worker-gpu-aaaaa", ready=True, started=True),
        PodView(name="x-worker-gpu-bbbbb"),
    ]
    with_demand = joined_worker_states(workers, [], seen, has_demand=True, shared=True, now=100.0)
    assert [(w.in_ray, w.idle_seconds) for w in with_demand] == [(False, None), (False, None)]
    idle = joined_worker_states(workers, [], seen, has_demand=False, shared=True, now=103.0)
    assert idle[0].in_ray and idle[0].idle_seconds == 3.0
    assert not idle[1].in_ray  # not Ready yet: still starting
    own_head = joined_worker_states(workers, [], seen, has_demand=False, shared=False, now=104.0)
    assert not any(w.in_ray for w in own_head)  # a real cluster never guesses: no node, not in Ray


def test_own_head_worker_without_a_replica_is_idle_since_first_seen_so() -> None:
    """Own head (real pods): Ray keeps a worker ACTIVE with no idle time while Serve's actors linger,
    so a joined worker that hosts no replica while nothing is pending is idle since the last pass
    that saw it busy (a replica on it, or demand pending) (found on kind)."""
    from llmray.builders.observe import PodView
    from llmray.controllers.deployment import joined_worker_states
    from llmray.ray.cluster import RayNode

    pod = PodView(name="x-worker-cpu-aaaaa", ready=False, started=True, pod_ip="10.244.0.9")
    ip = "10.244.0.9"
    node = RayNode(node_id="n1", ip=ip, is_head=False, alive=True, idle_seconds=None, start_time_s=0.0)
    seen: dict[str, float] = {}

    def idle(now: float, **kw: object) -> float | None:
        args: dict[str, object] = {"has_demand": False, "shared": False, "now": now, **kw}
        (state,) = joined_worker_states([pod], [node], seen, **args)  # type: ignore[arg-type]
        assert state.in_ray
        return state.idle_seconds

    assert idle(100.0, replica_ips=frozenset({"10.244.0.9"})) is None  # hosts a replica: busy
    assert idle(110.0) == 10.0  # the replica is gone: idle since the last pass that saw it busy
    assert idle(140.0) == 40.0
    assert idle(141.0, has_demand=True) is None  # demand pending: busy again
    assert idle(150.0) == 9.0


def test_serve_details_list_the_nodes_that_host_replicas() -> None:
    from llmray.ray.serve import parse_serve_details

    inst = parse_serve_details(
        {
            "applications": {
                "a": {
                    "status": "RUNNING",
                    "deployments": {
                        "LLMServer": {
                            "status": "HEALTHY",
                            "replicas": [
                                {"state": "RUNNING", "node_ip": "10.0.0.2"},
                                {"state": "STARTING", "node_ip": "10.0.0.3"},
                                {"state": "RUNNING", "node_ip": 7},
                            ],
                        }
                    },
                }
            }
        }
    )
    assert inst.applications["a"].replica_ips == frozenset({"10.0.0.2", "10.0.0.3"})


@pytest.mark.parametrize(
    ("backoff", "restart", "delay"),
    [(0, 1, 0.0), (10, 1, 10.0), (10, 2, 20.0), (10, 3, 40.0), (600, 5, 3600.0), (10, 200, 3600.0)],
)
def test_restart_delay_doubles_up_to_an_hour(backoff: int, restart: int, delay: float) -> None:
    assert restart_delay(backoff, restart) == delay


def test_deadline_counts_from_start_with_the_clock_passed_in() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert deadline_left(None, 60, start) is None  # not started: no clock running
    assert deadline_left(start, None, start) is None  # no deadline
    assert deadline_left(start, 60, start + timedelta(seconds=45)) == 15.0
    left = deadline_left(start, 60, start + timedelta(seconds=61))
    assert left is not None and left < 0


def test_backoff_holds_the_next_attempt_until_its_time() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    failed = JobInfo(submission_id="a0", status=JobStatus.FAILED, message="oom")
    step = decide_training(
        attempt=0, restarts=0, max_restarts=2, job=failed, cluster_ready=True, submission_id="a0",
        submitted=True, backoff_seconds=15, at=at,
    )  # fmt: skip
    assert (step.action, step.attempt, step.delay, step.reason) == ("restart", 1, 15.0, "BackingOff")
    assert "restarting at 2026-01-01T00:00:15Z (backoff 15s)" in step.message and "oom" in step.message
    not_before = at + timedelta(seconds=step.delay)
    kwargs = {"attempt": 1, "restarts": 1, "max_restarts": 2, "job": None, "cluster_ready": True,
              "backoff_seconds": 15}  # fmt: skip
    waiting = decide_training(
        **kwargs, submission_id="a1", not_before=not_before, at=at + timedelta(seconds=5)
    )
    assert (waiting.action, waiting.requeue_after) == ("backoff", 10.0)
    assert "restarting at 2026-01-01T00:00:15Z (backoff 15s" in waiting.message
    again = decide_training(**kwargs, submission_id="a1", not_before=not_before, at=at + timedelta(seconds=9))
    assert (again.message, again.requeue_after) == (waiting.message, 6.0)  # same text every pass
    due = decide_training(**kwargs, submission_id="a1", not_before=not_before, at=not_before)
    assert due.action == "submit"


# --- model versions ------------------------------------------------------------------------------


def _app(status: str, version: str | None) -> ServeApplication:
    args = {"name": "chat"} if version is None else {"name": "chat", "modelVersion": version}
    return ServeApplication("chat", status, deployed_config={"name": "chat", "args": args})


@pytest.mark.parametrize(
    ("serving", "target", "app", "written", "expected"),
    [
        ("v1", "v1", None, False, Rollout("v1", "")),
        ("", "v1", None, False, Rollout("", "v1")),
        ("v1", "v2", _app("RUNNING", "v2"), True, Rollout("v1", "v2")),  # just written: not yet
        ("v1", "v2", _app("DEPLOYING", "v2"), False, Rollout("v1", "v2")),
        ("v1", "v2", _app("RUNNING", "v1"), False, Rollout("v1", "v2")),  # another config runs
        ("v1", "v2", _app("DEPLOY_FAILED", "v2"), False, Rollout("v1", "v2")),
        ("v1", "v2", _app("RUNNING", "v2"), False, Rollout("v2", "")),
        ("", "v1", _app("RUNNING", "v1"), False, Rollout("v1", "")),
        ("v1", "", _app("RUNNING", None), False, Rollout("", "")),  # back to an unversioned uri
    ],
)
def test_model_rollout(
    serving: str, target: str, app: ServeApplication | None, written: bool, expected: Rollout
) -> None:
    assert model_rollout(serving, target, app, just_written=written) == expected


def test_deployed_model_version_reads_the_args_defensively() -> None:
    assert deployed_model_version(None) is None
    assert deployed_model_version(ServeApplication("a", "RUNNING")) is None
    assert deployed_model_version(_app("RUNNING", None)) == ""
    assert deployed_model_version(_app("RUNNING", "v" * 500)) == "v" * 128
    odd = ServeApplication("a", "RUNNING", deployed_config={"args": ["not", "a", "dict"]})
    assert deployed_model_version(odd) == ""


def test_output_version_prefers_the_reported_one() -> None:
    reported = ProgressReport(step=1, model_version="20261129-1-ab")
    assert output_version(reported, "0123456789ab", 2) == "20261129-1-ab"
    assert output_version(ProgressReport(step=1), "0123456789ab", 2) == "01234567-2"
    assert output_version(None, "", 0) == "job-0"


def test_serve_app_config_carries_the_model_version() -> None:
    spec = LLMDeploymentSpec.model_validate({"model": {"fromTrainingJob": "ft"}})
    kwargs: dict[str, Any] = {
        "app_name": "chat",
        "route_prefix": "/",
        "resource_name": "chat",
        "spec": spec,
        "model_path": "/out/ft",
        "api_key": None,
        "api_key_in_pods": True,
    }
    assert "modelVersion" not in serve_app_config(**kwargs)["args"]
    v1 = serve_app_config(**kwargs, model_version="v1")
    assert v1["args"]["modelVersion"] == "v1"
    assert serve_app_config(**kwargs, model_version="v2") != v1  # a new code version for Serve
