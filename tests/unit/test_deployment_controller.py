"""Whole reconcile passes of LLMDeployments through the fakes: every phase transition, every reason."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llmray.api.deployment import KIND
from llmray.api.training import KIND as TRAINING_KIND
from llmray.controllers.settings import Settings
from llmray.controllers.topology import SharedHead
from llmray.ray import RayNotFound, ResourceDemand
from llmray.ray.cluster import ClusterStatus

from .fakes import World

pytestmark = pytest.mark.unit

NS = "team"
SPEC: dict[str, Any] = {
    "model": {"uri": "file:///models/tiny", "name": "tiny"},
    "engine": "transformers",
    "autoscaling": {"minReplicas": 1, "maxReplicas": 2},
    "resourcesPerReplica": {"cpu": "1", "memory": "1Gi"},
    "workers": {"minReplicas": 0, "maxReplicas": 2, "resources": {"cpu": "1", "memory": "2Gi"}},
}
TRAIN_SPEC: dict[str, Any] = {
    "model": {"uri": "file:///models/tiny"},
    "dataset": {"uri": "file:///data/i.jsonl", "format": "instruction"},
    "output": {"uri": "file:///out/ft"},
}


def spec(**changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(SPEC)
    out.update(changes)
    return out


async def up(world: World, **changes: Any) -> Any:
    """A deployment whose pods run (phase Deploying, app being deployed)."""
    key = world.kube.apply(KIND, NS, "chat", spec(**changes))
    await world.reconcile(key)
    world.kube.run_pods(NS)
    await world.reconcile(key)
    return key


async def test_pending_to_deploying_to_ready() -> None:
    world = World()
    key = world.kube.apply(KIND, NS, "chat", spec())
    await world.reconcile(key)
    assert world.phase(key) == "Deploying"  # cluster coming up
    services = sorted(n for (k, ns, n) in world.kube.objects if k == "Service")
    assert services == ["chat-head", "chat-serve"]
    world.kube.run_pods(NS)
    await world.reconcile(key)
    head = world.head_of(key)
    assert "chat" in head.configs  # the Serve app was deployed (own head: app "chat" at /)
    assert world.phase(key) == "Deploying"
    assert world.condition(key, "ServeReady")["reason"] == "Deploying"
    head.set_app("chat", "RUNNING", running=1, target=1)
    await world.reconcile(key)
    status = world.kube.status(key)
    assert status["phase"] == "Ready"
    assert status["replicas"] == {"ready": 1, "desired": 1}
    assert status["endpoint"] == "http://chat-serve.team.svc.cluster.local:8000/v1"
    assert world.condition(key, "ServeReady")["status"] == "True"
    await world.reconcile(key)  # converged: the config is unchanged, nothing is redeployed
    assert world.reasons().count("DeployedServeApp") == 1 and world.phase(key) == "Ready"


async def test_ready_to_degraded_when_the_app_turns_unhealthy_and_back() -> None:
    world = World()
    key = await up(world)
    head = world.head_of(key)
    head.set_app("chat", "RUNNING")
    await world.reconcile(key)
    head.set_app("chat", "UNHEALTHY", running=0, message="replica died")
    await world.reconcile(key)
    assert world.phase(key) == "Degraded"
    assert world.condition(key, "ServeReady")["reason"] == "ServeUnhealthy"
    head.set_app("chat", "RUNNING")
    await world.reconcile(key)
    assert world.phase(key) == "Ready"


async def test_ready_to_degraded_when_the_head_pod_is_lost() -> None:
    world = World()
    key = await up(world)
    world.head_of(key).set_app("chat", "RUNNING")
    await world.reconcile(key)
    world.kube.set_pod(NS, "chat-head", phase="Running", ready=False)
    await world.reconcile(key)
    assert world.phase(key) == "Degraded"
    assert world.condition(key, "RayClusterReady")["reason"] == "HeadPodNotReady"


async def test_first_deploy_failure_is_failed() -> None:
    world = World()
    key = await up(world)
    world.head_of(key).set_app("chat", "DEPLOY_FAILED", running=0, message="import error")
    await world.reconcile(key)
    assert world.phase(key) == "Failed"
    assert world.condition(key, "ServeReady")["reason"] == "ServeDeployFailed"


@pytest.mark.parametrize(
    ("job_phase", "phase", "reason"),
    [
        (None, "Pending", "TrainingJobNotFound"),
        ("Running", "Pending", "TrainingJobNotSucceeded"),
        ("Failed", "Failed", "TrainingJobFailed"),
        ("Succeeded", "Deploying", "ModelResolved"),
    ],
)
async def test_model_from_a_training_job(job_phase: str | None, phase: str, reason: str) -> None:
    world = World()
    if job_phase is not None:
        job = world.kube.apply(TRAINING_KIND, NS, "ft", TRAIN_SPEC)
        world.kube.get(*job)["status"] = {"phase": job_phase, "output": {"uri": "file:///out/ft"}}
    key = world.kube.apply(KIND, NS, "chat", spec(model={"fromTrainingJob": "ft"}))
    await world.reconcile(key)
    assert world.phase(key) == phase
    assert world.condition(key, "ModelResolved")["reason"] == reason
    if phase != "Deploying":
        assert world.kube.pods(NS) == [] and world.kube.status(key).get("endpoint", "") == ""
    else:
        assert world.kube.status(key)["model"]["uri"] == "file:///out/ft"


async def test_training_job_events_wake_only_the_deployments_that_reference_it() -> None:
    world = World()
    world.kube.apply(KIND, NS, "a", spec(model={"fromTrainingJob": "ft"}))
    world.kube.apply(KIND, NS, "b", spec(model={"fromTrainingJob": "other"}))
    world.kube.apply(KIND, NS, "c", spec())
    world.kube.apply(KIND, "elsewhere", "d", spec(model={"fromTrainingJob": "ft"}))
    assert world.deps.store.deployments_of_job(NS, "ft") == ["a"]


async def test_missing_api_key_secret_fails_naming_the_field() -> None:
    world = World()
    key = world.kube.apply(KIND, NS, "chat", spec(apiKeySecretRef={"name": "chat-key", "key": "key"}))
    await world.reconcile(key)
    assert world.phase(key) == "Failed"
    cond = world.condition(key, "RayClusterReady")
    assert cond["reason"] == "SecretNotFound" and "spec.apiKeySecretRef" in cond["message"]
    assert "SecretNotFound" in world.reasons()
    await world.kube.create(
        {"kind": "Secret", "metadata": {"name": "chat-key", "namespace": NS}, "stringData": {"key": "k"}}
    )
    await world.reconcile(key)
    assert world.phase(key) == "Deploying"  # recovers once fixed


async def test_unschedulable_past_timeout_fails() -> None:
    world = World(Settings(unschedulable_timeout=30))
    key = world.kube.apply(KIND, NS, "chat", spec())
    await world.reconcile(key)
    long_ago = (datetime.now(UTC) - timedelta(seconds=60)).isoformat()
    world.kube.set_pod(
        NS, "chat-head", phase="Pending", ready=False,
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/4 nodes", "lastTransitionTime": long_ago}],
    )  # fmt: skip
    await world.reconcile(key)
    assert world.phase(key) == "Failed"
    assert world.condition(key, "RayClusterReady")["reason"] == "Unschedulable"


async def test_serve_service_drift_is_reverted() -> None:
    """Issue 11 item 6: a `kubectl patch` of the serve Service's type is reverted, not only annotations."""
    world = World()
    key = await up(world)
    svc = world.kube.get("Service", NS, "chat-serve")
    assert svc["spec"]["type"] == "ClusterIP"
    svc["spec"]["type"] = "NodePort"  # someone patched it; the annotation is untouched
    await world.reconcile(key)
    assert world.kube.get("Service", NS, "chat-serve")["spec"]["type"] == "ClusterIP"
    assert "RevertedService" in world.reasons()
    patches = [c for c in world.kube.calls if c[:2] == ("patch", "Service")]
    await world.reconcile(key)  # converged: no further patch
    assert [c for c in world.kube.calls if c[:2] == ("patch", "Service")] == patches


async def test_unreachable_head_is_reported() -> None:
    world = World()
    key = await up(world)
    world.head_of(key).down = True
    await world.reconcile(key)
    cond = world.condition(key, "ServeReady")
    assert (cond["status"], cond["reason"]) == ("Unknown", "RayHeadUnavailable")
    assert world.phase(key) == "Deploying"


async def test_busy_ray_slots_keep_the_last_ray_message_and_write_nothing() -> None:
    """At scale every Ray slot can be busy; a pass that skips Ray must not flap the message."""
    world = World(ray_slots=1)
    key = await up(world)
    world.head_of(key).down = True
    await world.reconcile(key)
    message = world.kube.status(key)["message"]
    assert "cannot reach the Ray head" in message
    gate = world.deps.ray_gate
    assert gate is not None and gate.try_acquire()  # a slow head elsewhere holds the only slot
    writes = sum(1 for c in world.kube.calls if c[0] == "patch_status")
    await world.reconcile(key)
    assert world.kube.status(key)["message"] == message
    assert sum(1 for c in world.kube.calls if c[0] == "patch_status") == writes


async def test_shared_head_routes_by_namespace_and_reports_its_url() -> None:
    world = World(Settings(topology=SharedHead("http://127.0.0.1:8265", "http://127.0.0.1:8000")))
    key = await up(world)
    head = world.head_of(key)
    assert head.configs["team-chat"]["route_prefix"] == "/team/chat"
    assert world.kube.status(key)["endpoint"] == "http://127.0.0.1:8000/team/chat/v1"


async def test_pending_demand_adds_a_worker_pod() -> None:
    world = World()
    key = await up(world)
    head = world.head_of(key)
    head.set_app("chat", "DEPLOYING", running=0)
    head.cluster_status = ClusterStatus(demand=(ResourceDemand({"CPU": 1.0}, 1),))
    again = await world.reconcile(key)
    assert world.kube.status(key)["workers"]["desired"] == 1
    assert "AutoscaledWorkers" in world.reasons()
    assert again == 0.0
    await world.reconcile(key)
    assert any(p["metadata"]["name"].startswith("chat-worker") for p in world.kube.pods(NS))


async def test_deleted_deployment_removes_its_app_from_a_shared_head() -> None:
    world = World(Settings(topology=SharedHead("http://127.0.0.1:8265", "http://127.0.0.1:8000")))
    key = await up(world)
    world.kube.remove(key)
    await world.reconcile(key)
    await world.controllers[KIND].drain()
    assert "team-chat" not in world.head_of(key).apps


async def test_adapters_resolve_deploy_as_user_config_and_turn_ready() -> None:
    """A uri adapter and a LoRA job's output are sent in the deployment's user_config; a full
    fine-tune job is a semantic error (adapter Failed + Warning Event) that does not block the rest;
    adapters turn Ready once Serve runs a config that has them."""
    from llmray.ray.serve import ServeApplication

    world = World()
    lora = world.kube.apply(TRAINING_KIND, NS, "sql-ft", {**TRAIN_SPEC, "method": "lora"})
    world.kube.get(*lora)["status"] = {"phase": "Succeeded", "output": {"uri": "pvc://loras/sql"}}
    full = world.kube.apply(TRAINING_KIND, NS, "full-ft", TRAIN_SPEC)
    world.kube.get(*full)["status"] = {"phase": "Succeeded", "output": {"uri": "file:///out/ft"}}
    adapters = [
        {"name": "poet", "uri": "file:///loras/poet"},
        {"name": "sql", "fromTrainingJob": "sql-ft"},
        {"name": "oops", "fromTrainingJob": "full-ft"},
    ]
    key = await up(world, adapters=adapters)
    head = world.head_of(key)
    config = head.configs["chat"]
    assert config["args"]["spec"].get("adapters", []) == []
    assert config["deployments"] == [
        {
            "name": "LLMServer",
            "user_config": {
                "adapters": [
                    {"name": "poet", "source": "/loras/poet"},
                    {"name": "sql", "source": "/mnt/pvc/loras/sql"},
                ]
            },
        }
    ]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for p in world.kube.pods(NS)
        for v in p["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"loras"}
    states = {a["name"]: a["state"] for a in world.kube.status(key)["adapters"]}
    assert states == {"poet": "Loading", "sql": "Loading", "oops": "Failed"}
    assert world.reasons().count("AdapterFailed") == 1
    head.set_app("chat", "RUNNING")
    head.apps["chat"] = ServeApplication(
        "chat", "RUNNING", deployments=head.apps["chat"].deployments, deployed_config=config
    )
    await world.reconcile(key)  # no /v1/models answer: Ready from Serve's deployed config alone
    states = {a["name"]: a["state"] for a in world.kube.status(key)["adapters"]}
    assert states == {"poet": "Ready", "sql": "Ready", "oops": "Failed"}
    assert world.phase(key) == "Ready" and world.reasons().count("AdapterReady") == 2
    await world.reconcile(key)  # converged: no new events, no redeploy
    assert world.reasons().count("AdapterFailed") == 1 and world.reasons().count("DeployedServeApp") == 1
    # What a replica reports wins: poet is not listed on /v1/models, so the replica failed to load it.
    url = world.settings.topology.head("chat", NS).serve_url
    world.ray.models[url] = ["tiny", "sql"]
    await world.reconcile(key)
    adapters = {a["name"]: a for a in world.kube.status(key)["adapters"]}
    assert {n: a["state"] for n, a in adapters.items()} == {
        "poet": "Failed",
        "sql": "Ready",
        "oops": "Failed",
    }
    assert "could not load" in adapters["poet"]["message"] and world.reasons().count("AdapterFailed") == 2
    # A pass with no listing (the replica did not answer) keeps what the last listing showed:
    # no flap back to Ready, no second Warning.
    world.ray.models[url] = RayNotFound("GET", url, 503, "busy")
    await world.reconcile(key)
    states = {a["name"]: a["state"] for a in world.kube.status(key)["adapters"]}
    assert states == {"poet": "Failed", "sql": "Ready", "oops": "Failed"}
    assert world.reasons().count("AdapterFailed") == 2


async def test_retrain_into_the_same_uri_rolls_out_the_new_version() -> None:
    """A job's new export (same output URI, new status.output.version) goes into the Serve args;
    status keeps naming the old version until Serve runs the new config, then the new one."""
    world = World()
    job = world.kube.apply(TRAINING_KIND, NS, "ft", TRAIN_SPEC)
    done = {"phase": "Succeeded", "output": {"uri": "file:///out/ft", "version": "v1"}}
    world.kube.get(*job)["status"] = copy.deepcopy(done)
    key = await up(world, model={"fromTrainingJob": "ft"})
    head = world.head_of(key)
    assert head.configs["chat"]["args"]["modelVersion"] == "v1"
    head.set_app("chat", "RUNNING")
    await world.reconcile(key)
    model = world.kube.status(key)["model"]
    assert (model["version"], model["pendingVersion"]) == ("v1", "")
    assert world.phase(key) == "Ready"

    world.kube.get(*job)["status"] = {**done, "phase": "Running"}  # retraining: nothing changes
    await world.reconcile(key)
    assert head.configs["chat"]["args"]["modelVersion"] == "v1"

    world.kube.get(*job)["status"] = {**done, "output": {"uri": "file:///out/ft", "version": "v2"}}
    await world.reconcile(key)
    assert head.configs["chat"]["args"]["modelVersion"] == "v2"
    assert head.configs["chat"]["args"]["modelPath"] == "/out/ft"
    model = world.kube.status(key)["model"]
    assert (model["version"], model["pendingVersion"]) == ("v1", "v2")
    assert "RollingOutModel" in world.reasons()
    head.set_app("chat", "DEPLOYING", running=1, target=1)  # new replica starting, old one serving
    await world.reconcile(key)
    assert world.phase(key) == "Ready"
    assert world.kube.status(key)["model"]["version"] == "v1"
    assert "rolling out model version v2" in world.condition(key, "ServeReady")["message"]
    head.set_app("chat", "RUNNING")
    await world.reconcile(key)
    model = world.kube.status(key)["model"]
    assert (model["version"], model["pendingVersion"]) == ("v2", "")
    assert "RolledOutModel" in world.reasons()
    assert "rolling out" not in world.condition(key, "ServeReady")["message"]


async def test_a_model_uri_deployment_rolls_out_a_retrain_into_its_folder() -> None:
    """spec.model.uri names the folder a job exports to: each new export's version rolls out, and
    the job's events wake the deployment (a job elsewhere, or in another namespace, does not count)."""
    world = World()
    job = world.kube.apply(TRAINING_KIND, NS, "ft", TRAIN_SPEC)
    exported = {"phase": "Succeeded", "output": {"uri": "file:///out/ft", "version": "v1"}}
    world.kube.get(*job)["status"] = copy.deepcopy(exported)
    other = world.kube.apply(TRAINING_KIND, "elsewhere", "ft", TRAIN_SPEC)
    world.kube.get(*other)["status"] = {**exported, "output": {"uri": "file:///out/ft", "version": "v9"}}
    key = await up(world, model={"uri": "file:///out/ft/", "name": "tiny"})
    assert world.deps.store.deployments_of_uri(NS, "file:///out/ft") == ["chat"]
    head = world.head_of(key)
    assert head.configs["chat"]["args"]["modelVersion"] == "v1"
    head.set_app("chat", "RUNNING")
    await world.reconcile(key)
    assert world.kube.status(key)["model"]["version"] == "v1"
    world.kube.get(*job)["status"]["output"]["version"] = "v2"
    await world.reconcile(key)
    assert head.configs["chat"]["args"]["modelVersion"] == "v2"
    assert world.kube.status(key)["model"]["pendingVersion"] == "v2"


async def test_a_recreated_job_without_a_version_keeps_the_version_being_served() -> None:
    world = World()
    job = world.kube.apply(TRAINING_KIND, NS, "ft", TRAIN_SPEC)
    world.kube.get(*job)["status"] = {
        "phase": "Succeeded",
        "output": {"uri": "file:///out/ft", "version": "v1"},
    }
    key = await up(world, model={"fromTrainingJob": "ft"})
    world.head_of(key).set_app("chat", "RUNNING")
    await world.reconcile(key)
    world.kube.get(*job)["status"] = {"phase": "Running"}  # deleted and recreated: no output yet
    deployed = world.reasons().count("DeployedServeApp")
    await world.reconcile(key)
    assert world.head_of(key).configs["chat"]["args"]["modelVersion"] == "v1"
    assert world.kube.status(key)["model"]["version"] == "v1"
    assert world.reasons().count("DeployedServeApp") == deployed  # the same config: nothing rolled
