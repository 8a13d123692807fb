"""Training jobs end to end: operator -> Ray Jobs API -> Ray Train -> status, retries, deletion."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.test_operator_fixtures import condition, owned_children, status_of
from tests.e2e.conftest import E2E
from tests.kube import apply_yaml
from tests.waiting import wait_for

pytestmark = pytest.mark.e2e

KIND = "LLMTrainingJob"


def status(e2e: E2E, name: str) -> dict[str, Any]:
    return status_of(e2e.kube, KIND, e2e.namespace, name)


def uid_of(e2e: E2E, name: str) -> str:
    obj = e2e.custom().get_namespaced_custom_object(
        "llmray.io", "v1alpha1", e2e.namespace, "llmtrainingjobs", name
    )
    return str(obj["metadata"]["uid"])


def wait_phase(e2e: E2E, name: str, phase: str, timeout: float) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        st = status(e2e, name)
        if st.get("phase") == "Failed" and phase != "Failed":
            raise AssertionError(f"job Failed: {st.get('message')}")
        return st if st.get("phase") == phase else None

    try:
        return wait_for(probe, timeout=timeout, what=f"{name} phase {phase}", interval=1)
    except AssertionError:
        print(json.dumps(status(e2e, name), indent=1))
        raise


def progress_steps(log: str) -> list[int]:
    return [json.loads(m)["step"] for m in re.findall(r"LLMRAY_PROGRESS (\{.*\})", log)]


def test_training_succeeds_across_operator_restart(e2e: E2E) -> None:
    """(a) Succeeded with live progress and a loadable model; (e) a kill -9 of the operator mid-run
    neither starts a second Ray job nor stops status updates."""
    name = "train-ok"
    apply_yaml(e2e.kube, e2e.training(name, max_steps=24, every=8), e2e.namespace)
    running = wait_for(
        lambda: (
            (st := status(e2e, name)).get("phase") == "Running"
            and st.get("progress", {}).get("step", 0) > 0
            and st
        ),
        timeout=240,
        what="progress in status while Running",
        interval=0.5,
    )
    progress = running["progress"]
    assert progress["totalSteps"] == 24 and 0 < progress["percent"] <= 100 and progress["loss"]
    assert running["jobId"] and condition(running, "JobRunning")["status"] == "True"
    seen_step = progress["step"]

    e2e.operator.kill()
    e2e.operator.start()
    final = wait_phase(e2e, name, "Succeeded", timeout=300)
    assert final["progress"]["step"] == 24 >= seen_step and final["progress"]["percent"] == 100
    assert final["restarts"] == 0 and final.get("attempt", 0) == 0
    jobs = e2e.jobs_of(uid_of(e2e, name))
    assert [j["submission_id"] for j in jobs] == [final["jobId"]], "exactly one Ray job for one attempt"
    out = final["output"]["uri"]
    assert out.startswith("file://")

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    path = out[len("file://") :]
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError):
        model = AutoPeftModelForCausalLM.from_pretrained(path)
    assert model.num_parameters() > 0
    e2e.delete(KIND, name)


def test_stopped_job_is_retried_and_resumes(e2e: E2E) -> None:
    """(b) A job stopped through the Ray Jobs API mid-run is resubmitted once and resumes from its
    checkpoint (the new attempt's first step is past the checkpoint)."""
    name = "train-retry"
    apply_yaml(e2e.kube, e2e.training(name, max_steps=30, every=5, max_restarts=1), e2e.namespace)
    st = wait_for(
        lambda: (s := status(e2e, name)).get("checkpoint", {}).get("step", 0) >= 5 and s,
        timeout=300,
        what="a checkpoint in status",
        interval=0.5,
    )
    first = st["jobId"]
    # status.checkpoint follows the worker's report (the upload is done); the retry resumes from
    # what Ray Train's controller registered a moment later in the run's checkpoint manager
    # snapshot. Stop the job once that is written, or the retry may rightly start over.
    run_dir = Path(str(st["checkpoint"]["uri"]).removeprefix("file://")).parent
    wait_for(
        lambda: _registered_checkpoint(run_dir),
        timeout=120,
        what=f"a checkpoint in Ray Train's checkpoint manager snapshot in {run_dir}",
        interval=0.2,
    )
    e2e.stop_job(first)
    final = wait_phase(e2e, name, "Succeeded", timeout=300)
    assert final["restarts"] == 1 and final["attempt"] == 1 and final["jobId"] != first
    assert e2e.job(first)["status"] == "STOPPED"
    resumed = progress_steps(e2e.job_logs(final["jobId"]))
    assert resumed and resumed[0] > 5 - 1, f"attempt 1 started over: {resumed[:5]}"
    assert resumed[-1] == 30
    reasons = {ev.reason for ev in _events(e2e, name)}
    assert "RestartingRayJob" in reasons
    e2e.delete(KIND, name)


def _registered_checkpoint(run_dir: Path) -> str | None:
    """The checkpoint a retry of the run in ``run_dir`` would resume from, once Ray Train recorded one."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None
    latest = snapshot.get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name") or None


def _events(e2e: E2E, name: str) -> list[Any]:
    from kubernetes import client

    core = client.CoreV1Api(e2e.kube.api_client)
    return list(core.list_namespaced_event(e2e.namespace, field_selector=f"involvedObject.name={name}").items)


def test_deleting_running_job_stops_it(e2e: E2E) -> None:
    """(f) Deleting a running LLMTrainingJob stops its Ray job and leaves no child object."""
    name = "train-delete"
    apply_yaml(e2e.kube, e2e.training(name, max_steps=2000, every=1000, max_restarts=0), e2e.namespace)
    st = wait_for(
        lambda: (s := status(e2e, name)).get("jobId") and e2e.job(s["jobId"])["status"] == "RUNNING" and s,
        timeout=240,
        what="the Ray job RUNNING",
        interval=0.5,
    )
    sid = st["jobId"]
    e2e.delete(KIND, name)
    wait_for(
        lambda: e2e.job(sid)["status"] in ("STOPPED", "FAILED"), timeout=60, what=f"Ray job {sid} stopped"
    )
    wait_for(
        lambda: not any(owned_children(e2e.kube, e2e.namespace, name).values()),
        timeout=60,
        what="no children left",
    )
