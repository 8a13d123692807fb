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

from typing import ClassVar

from llmray.api.deployment import KIND, PLURAL, LLMDeploymentSpec, LLMDeploymentStatus
from llmray.api.training import KIND as TRAINING_KIND
from llmray.builders.cluster import deployment_cluster, serve_endpoint, serve_service
from llmray.builders.model import resolve_model
from llmray.builders.status import (
    COND_CLUSTER_READY,
    COND_MODEL_RESOLVED,
    R_MODEL_RESOLVED,
    R_UNSCHEDULABLE,
)

from .cluster import ClusterController, Pass


async def ray_steps(controller: DeploymentController, p: Pass) -> None:
    """INTEGRATION HOOK -- Serve application and autoscaling (filled by the Ray integration issue).

    Called at the end of every pass in which the cluster is wanted and nothing blocks it, after the
    cluster phase was decided (``p.status.phase`` is Deploying/Degraded, ``p.health`` says whether
    head and workers are Ready, ``p.status.model.uri`` is the resolved model). It may deploy the
    Serve app (``ServeAppArgs`` with ``model_path`` and ``api_key_env="LLMRAY_API_KEY"`` when
    ``p.spec.api_key_secret_ref`` is set) through ``llmray.ray``, read Serve status and Ray's
    pending demand, and set on ``p.status``: phase (Ready, Degraded, Failed), replicas, message,
    conditions; and ``p.status.workers.desired`` (the autoscaler's worker target, applied on the
    next pass, clamped to spec.workers min/max; request an immediate pass with
    ``p.requeue_after = 0``). It must not raise for Ray being unreachable.
    """
    return None


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

    async def ray_steps(self, p: Pass) -> None:
        await ray_steps(self, p)
