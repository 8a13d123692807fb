"""The two state machines as tables: (what a pass saw) -> next phase. Pure, no fakes needed."""

from __future__ import annotations

import pytest

from llmray.builders.status import Blocker, ClusterHealth
from llmray.controllers.decisions import TrainingStep
from llmray.controllers.machines import (
    DeploymentSeen,
    RayProblem,
    TrainingSeen,
    deployment_next,
    training_next,
)
from llmray.ray.serve import DeploymentStatus, ServeApplication

pytestmark = pytest.mark.unit

READY = ClusterHealth(True, True, 2, 2, "ClusterReady", "ready")
NOT_READY = ClusterHealth(False, False, 0, 2, "HeadPodNotReady", "waiting for the head")
STUCK = ClusterHealth(False, False, 0, 2, "Unschedulable", "cannot be scheduled", unschedulable_for=400)
FATAL = Blocker("NameConflict", "clash", fatal=True)
WAIT = Blocker("SecretNotFound", "no secret")


def step(phase: str, action: str = "poll") -> TrainingStep:
    return TrainingStep(action, 0, 0, phase, "R", f"job {phase}")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seen", "phase"),
    [
        (TrainingSeen("Pending", health=NOT_READY), "Provisioning"),
        (TrainingSeen("Provisioning", health=READY), "Running"),
        (TrainingSeen("Provisioning", health=READY, job=step("Running")), "Running"),
        (TrainingSeen("Running", health=READY, job=step("Succeeded", "succeed")), "Succeeded"),
        (TrainingSeen("Running", health=READY, job=step("Failed", "fail")), "Failed"),
        (TrainingSeen("Running", health=NOT_READY), "Provisioning"),
        (TrainingSeen("Running", health=NOT_READY, job=step("Running")), "Running"),
        (
            TrainingSeen("Running", health=READY, ray_problem=RayProblem("RayHeadUnavailable", "down")),
            "Running",
        ),
        (TrainingSeen("Running", suspended=True), "Suspended"),
        (TrainingSeen("Suspended", health=NOT_READY), "Provisioning"),
        (TrainingSeen("Pending", blocker=WAIT), "Pending"),
        (TrainingSeen("Running", blocker=WAIT), "Running"),
        (TrainingSeen("Pending", blocker=FATAL), "Failed"),
        (TrainingSeen("Provisioning", health=STUCK), "Failed"),
        (TrainingSeen("Succeeded"), "Succeeded"),
        (TrainingSeen("Failed", keep_failure=True), "Failed"),
        (TrainingSeen("Failed", retrying=True, health=NOT_READY), "Provisioning"),
    ],
)
def test_training_transitions(seen: TrainingSeen, phase: str) -> None:
    assert training_next(seen).phase == phase


def test_training_final_phases_stamp_and_reopen_completion() -> None:
    assert training_next(TrainingSeen("Running", health=READY, job=step("Succeeded", "succeed"))).finished
    assert training_next(TrainingSeen("Provisioning", health=STUCK)).finished
    assert training_next(TrainingSeen("Failed", retrying=True, health=NOT_READY)).reopened
    assert training_next(TrainingSeen("Succeeded")).cluster == (
        False,
        "Finished",
        "job Succeeded; Ray pods deleted",
    )


def app(status: str, running: int = 1) -> ServeApplication:
    return ServeApplication(
        "chat", status, deployments={"d": DeploymentStatus("d", "HEALTHY", "", 1, running)}
    )


@pytest.mark.parametrize(
    ("seen", "phase"),
    [
        (DeploymentSeen("Pending", blocker=WAIT), "Pending"),
        (DeploymentSeen("Ready", blocker=FATAL), "Failed"),
        (DeploymentSeen("Pending", health=NOT_READY), "Deploying"),
        (DeploymentSeen("Pending", health=READY), "Deploying"),
        (DeploymentSeen("Failed", health=READY), "Deploying"),
        (DeploymentSeen("Deploying", health=READY, serve_seen=True, app=None), "Deploying"),
        (DeploymentSeen("Deploying", health=READY, serve_seen=True, app=app("RUNNING")), "Ready"),
        (DeploymentSeen("Ready", health=NOT_READY), "Degraded"),
        (DeploymentSeen("Ready", health=NOT_READY, serve_seen=True, app=app("RUNNING")), "Degraded"),
        (DeploymentSeen("Ready", health=READY, serve_seen=True, app=app("UNHEALTHY", 0)), "Degraded"),
        (DeploymentSeen("Degraded", health=READY, serve_seen=True, app=app("RUNNING")), "Ready"),
        (DeploymentSeen("Deploying", health=READY, serve_seen=True, app=app("DEPLOY_FAILED", 0)), "Failed"),
        (DeploymentSeen("Ready", health=READY, serve_seen=True, app=app("DEPLOYING")), "Ready"),
        (DeploymentSeen("Deploying", health=STUCK), "Failed"),
        (
            DeploymentSeen("Ready", health=READY, ray_problem=RayProblem("RayHeadUnavailable", "down")),
            "Ready",
        ),
    ],
)
def test_deployment_transitions(seen: DeploymentSeen, phase: str) -> None:
    assert deployment_next(seen).phase == phase
