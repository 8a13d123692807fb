"""LLMDeployment: a Ray cluster (head + autoscaled workers) and the ``<name>-serve`` Service.

Phases set here (the cluster half): Pending (waiting for its model, e.g. a training job) ->
Deploying (cluster coming up, or up and waiting for Serve) ; Degraded (was Ready, lost pods) ;
Failed (a referenced Secret is missing, the training job Failed, a name clash, or pods
Unschedulable for longer than ``--unschedulable-timeout``; it recovers once fixed). Ready and
replica counts come from :func:`ray_steps`.

Worker count: ``status.workers.desired`` is the autoscaler's last decision (kept in status so an
operator restart does not scale the cluster back down), clamped to spec.workers min/max.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from llmray.api.common import local_path
from llmray.api.deployment import KIND, PLURAL, LLMDeploymentSpec, LLMDeploymentStatus
from llmray.api.training import KIND as TRAINING_KIND
from llmray.autoscaling import WorkerState, decide, worker_offer, worker_states
from llmray.builders.cluster import deployment_cluster, serve_endpoint, serve_service
from llmray.builders.model import resolve_model
from llmray.builders.status import (
    COND_CLUSTER_READY,
    COND_MODEL_RESOLVED,
    R_MODEL_RESOLVED,
    R_UNSCHEDULABLE,
)
from llmray.ray import RayClient, RayError, RayHeadUnavailable, RayNode
from llmray.ray.endpoints import SERVE_PORT

from .cluster import ClusterController, Pass
from .decisions import serve_app_config, serve_verdict
from .rayconn import Head, head_for, short
from .store import Key

logger = logging.getLogger("llmray.controllers.deployment")


COND_SERVE = "ServeReady"
COND_AUTOSCALING = "WorkersScaled"
R_HEAD_UNAVAILABLE = "RayHeadUnavailable"
POLL_DEPLOYING_S = 3.0
UNREACHABLE_REQUEUE_S = 10.0


@dataclass
class _App:
    """What deleting the resource needs to remove its Serve application."""

    head: Head
    app_name: str


async def _api_key(controller: DeploymentController, p: Pass) -> str | None:
    """The API key from spec.apiKeySecretRef (read only when it must go into the app's env)."""
    ref = p.spec.api_key_secret_ref
    if ref is None:
        return None
    secret = await controller.kube.read("Secret", p.namespace, ref.name)
    data = (secret or {}).get("data") or {}
    raw = data.get(ref.key)
    return base64.b64decode(raw).decode() if raw else None


def _worker_states(
    controller: DeploymentController, p: Pass, nodes: list[RayNode], has_demand: bool, shared: bool
) -> list[WorkerState]:
    """Worker pods joined with Ray nodes (see :func:`llmray.autoscaling.worker_states`).

    On a shared head (the sandbox) worker pods are simulated and never join Ray: a Ready pod with
    no Ray node counts as capacity on its way while demand is pending (so it absorbs that demand
    once), and as idle since it became Ready (or since demand was last seen) otherwise, so it is
    removed after idleTimeoutSeconds.
    """
    live = [w for w in p.workers if not w.deleting]
    now = time.time()
    states = worker_states([(w.name, w.pod_ip or None) for w in live], nodes, now=now)
    seen = controller.ready_since.setdefault(p.key, {})
    for name in list(seen):
        if name not in {w.name for w in live if w.ready}:
            del seen[name]
    if not shared:
        return states
    out: list[WorkerState] = []
    for pod, state in zip(live, states, strict=True):
        matched = bool(pod.pod_ip) and any(n.ip == pod.pod_ip and n.alive and not n.is_head for n in nodes)
        if matched or not pod.ready:
            out.append(state)
            continue
        if has_demand:  # idle time counts from the last pass that saw demand
            seen[pod.name] = now
            out.append(WorkerState(pod.name, in_ray=False))
        else:
            since = seen.setdefault(pod.name, now)
            out.append(WorkerState(pod.name, in_ray=True, idle_seconds=now - since))
    return out


async def _autoscale(controller: DeploymentController, p: Pass, ray: RayClient, shared: bool) -> None:
    """Worker pods from Ray's pending demand, within spec.workers min/max; idle ones removed."""
    spec: LLMDeploymentSpec = p.spec
    status: LLMDeploymentStatus = p.status
    pool = spec.workers
    cluster = await ray.cluster.status()
    if not cluster.reported:
        return  # a fresh head: no report yet, so an empty demand means nothing
    nodes = await ray.cluster.nodes()
    offer = worker_offer(pool.resources.cpu, pool.resources.gpu, pool.resources.memory)
    states = _worker_states(controller, p, nodes, cluster.has_demand, shared)
    decision = decide(
        [*cluster.demand, *cluster.requested],
        offer,
        states,
        min_replicas=pool.min_replicas,
        max_replicas=pool.max_replicas,
        idle_timeout_s=float(pool.idle_timeout_seconds),
        gangs=cluster.gang_demand,
    )
    if decision.infeasible or decision.unmet:
        p.condition(COND_AUTOSCALING, False, "DemandNotPlaceable", decision.reason)
    else:
        p.condition(COND_AUTOSCALING, True, "AsDemanded", "worker pods match Ray's pending demand")
    if not decision.changed:
        return
    by_name = {w.name: w for w in p.workers}
    for name in decision.remove:
        pod = by_name.get(name)
        if pod is not None and not pod.deleting:
            await controller.kube.delete("Pod", p.namespace, pod.name, pod.uid)
            controller.expectations.deleted(p.key, pod.uid)
    desired = min(pool.max_replicas, max(pool.min_replicas, decision.desired))
    if desired != status.workers.desired or decision.remove:
        status.workers.desired = desired
        p.event("Normal", "AutoscaledWorkers", f"{decision.reason}; {desired} worker pod(s) desired")
        p.requeue_after = 0.0  # create the new pods now


async def ray_steps(controller: DeploymentController, p: Pass) -> None:
    """The Serve application on Ray, its status, and worker autoscaling.

    Deploys (read-modify-write of Serve's application set: other apps on a shared head are kept)
    only when the config differs from what Serve runs, so an unchanged deployment sends no PUT; a
    spec change is a PUT of the new config, which Serve rolls out without dropping requests.
    """
    status: LLMDeploymentStatus = p.status
    spec: LLMDeploymentSpec = p.spec
    assert p.cluster is not None and p.health is not None
    if not p.health.head_ready:
        return
    token = controller.tokens.token(p.key, p.uid)
    head = head_for(p.key, p.cluster.dashboard_url, token)
    route = head.route(p.name, p.namespace)
    if head.endpoints.overridden:
        status.endpoint = route.url + "/v1"
    api_key = await _api_key(controller, p) if head.shared else None
    config = serve_app_config(
        app_name=route.app_name,
        route_prefix=route.route_prefix,
        resource_name=p.name,
        spec=spec,
        model_path=local_path(status.model.uri),
        api_key=api_key,
        api_key_in_pods=not head.shared,
    )
    defaults = None if head.shared else {"http_options": {"host": "0.0.0.0", "port": SERVE_PORT}}
    try:
        async with head.client() as ray:
            written = await ray.serve.put_application(route.app_name, config, instance_defaults=defaults)
            controller.apps[p.key] = _App(head, route.app_name)
            if written:
                p.event("Normal", "DeployedServeApp", f"deployed Serve application {route.app_name}")
            app = await ray.serve.get_application(route.app_name)
            verdict = serve_verdict(app, status.phase, spec.autoscaling.min_replicas)
            status.replicas.ready = verdict.ready_replicas
            if verdict.desired_replicas is not None:
                status.replicas.desired = verdict.desired_replicas
            if p.health.ready or verdict.phase != "Ready":
                status.phase = verdict.phase  # type: ignore[assignment]
                status.message = verdict.message
            p.condition(COND_SERVE, verdict.phase == "Ready", verdict.reason, verdict.message)
            if status.phase != "Ready":
                p.requeue_after = min(p.requeue_after or POLL_DEPLOYING_S, POLL_DEPLOYING_S)
            await _autoscale(controller, p, ray, head.shared)
    except RayHeadUnavailable as exc:
        msg = f"cannot reach the Ray head at {head.dashboard_url}: {short(exc)}; retrying"
        p.condition(COND_SERVE, "Unknown", R_HEAD_UNAVAILABLE, msg)
        status.message = msg
        p.requeue_after = min(p.requeue_after or UNREACHABLE_REQUEUE_S, UNREACHABLE_REQUEUE_S)
    except RayError as exc:
        msg = f"Ray head at {head.dashboard_url} refused a request: {short(exc)}; retrying"
        p.condition(COND_SERVE, "Unknown", "RayAPIError", msg)
        status.message = msg
        p.requeue_after = min(p.requeue_after or UNREACHABLE_REQUEUE_S, UNREACHABLE_REQUEUE_S)


async def ray_gone(controller: DeploymentController, key: Key) -> None:
    """Deleted: remove its Serve application (best effort; its own head goes with its pods)."""
    controller.ready_since.pop(key, None)
    app = controller.apps.pop(key, None)
    if app is None:
        return
    try:
        async with app.head.client() as ray:
            await ray.serve.delete_application(app.app_name)
        logger.info("%s %s/%s deleted: removed Serve application %s", *key, app.app_name)
    except RayError as exc:
        logger.info("%s %s/%s deleted: could not remove Serve app %s: %s", *key, app.app_name, exc)


class DeploymentController(ClusterController):
    """Reconciles LLMDeployments."""

    kind: ClassVar[str] = KIND
    plural: ClassVar[str] = PLURAL
    spec_model = LLMDeploymentSpec
    status_model = LLMDeploymentStatus
    workers_field = "spec.workers"

    def prepare(self, p: Pass) -> None:
        spec: LLMDeploymentSpec = p.spec
        status: LLMDeploymentStatus = p.status
        job = None
        if spec.model.from_training_job:
            job = self.store.resource(TRAINING_KIND, p.namespace, spec.model.from_training_job)
        uri, blocker, message = resolve_model(spec, job, status.model.uri)
        status.model.name = spec.model.name or p.name
        if uri is None:
            assert blocker is not None
            p.blocker = blocker
            p.want_cluster = False
            status.model.uri = ""
            p.condition(COND_MODEL_RESOLVED, False, blocker.reason, blocker.message)
            return
        status.model.uri = uri
        p.condition(COND_MODEL_RESOLVED, True, R_MODEL_RESOLVED, message)
        p.cluster = deployment_cluster(p.owner, spec, uri)
        pool = spec.workers
        p.desired_workers = min(pool.max_replicas, max(pool.min_replicas, status.workers.desired))

    def wanted_services(self, p: Pass) -> list[dict[str, object]]:
        assert p.cluster is not None
        return [*super().wanted_services(p), serve_service(p.cluster)]

    def decide_status(self, p: Pass) -> None:
        status: LLMDeploymentStatus = p.status
        spec: LLMDeploymentSpec | None = p.spec
        if spec is not None:
            auto = spec.autoscaling
            status.replicas.desired = min(auto.max_replicas, max(auto.min_replicas, status.replicas.desired))
        if p.cluster is not None and p.want_cluster:
            status.endpoint = serve_endpoint(p.cluster)
        if p.blocker is not None:
            p.condition(COND_CLUSTER_READY, False, p.blocker.reason, p.blocker.message)
            status.phase = "Failed" if p.blocker.fatal else "Pending"
            status.message = p.blocker.message
            if not p.want_cluster:
                status.endpoint = ""
                status.replicas.ready = 0
            return
        health = p.health
        if health is None:
            return
        if health.unschedulable_for > self.options.unschedulable_timeout:
            status.phase = "Failed"
            status.message = health.message
            p.condition(COND_CLUSTER_READY, False, R_UNSCHEDULABLE, health.message)
            return
        p.condition(COND_CLUSTER_READY, health.ready, health.reason, health.message)
        if health.ready:
            if status.phase in ("Pending", "Failed"):
                status.phase = "Deploying"
            if status.phase == "Deploying":
                status.message = "Ray cluster ready; deploying the Serve application"
        else:
            status.phase = "Degraded" if status.phase in ("Ready", "Degraded") else "Deploying"
            status.message = health.message

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.apps: dict[Key, _App] = {}
        self.ready_since: dict[Key, dict[str, float]] = {}

    async def ray_steps(self, p: Pass) -> None:
        await ray_steps(self, p)

    async def ray_gone(self, key: Key) -> None:
        await ray_gone(self, key)
