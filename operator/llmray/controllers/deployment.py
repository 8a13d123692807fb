"""LLMDeployment: a Ray cluster (head + autoscaled workers) and the ``<name>-serve`` Service.

The phase comes from :func:`llmray.controllers.machines.deployment_next` only: Pending (waiting
for its model, e.g. a training job) -> Deploying (cluster coming up, or up and waiting for Serve)
-> Ready; Degraded (was Ready, lost pods or replicas); Failed (a referenced Secret is missing, the
training job Failed, a name clash, a failed first deploy, or pods Unschedulable for longer than
``--unschedulable-timeout``; it recovers once fixed).

Worker count: ``status.workers.desired`` is the autoscaler's last decision (kept in status so an
operator restart does not scale the cluster back down), clamped to spec.workers min/max.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from llmray.api.deployment import KIND, PLURAL, LLMDeploymentSpec, LLMDeploymentStatus
from llmray.api.runtime import AdapterSource
from llmray.api.telemetry import ServingStats
from llmray.api.training import KIND as TRAINING_KIND
from llmray.autoscaling import WorkerState, decide, worker_offer, worker_states
from llmray.builders.cluster import deployment_cluster, serve_endpoint, serve_service
from llmray.builders.common import SERVE_PORT
from llmray.builders.model import (
    HOLD_OVER_RESOLUTION,
    HOLD_WITHOUT_LISTING,
    adapter_source,
    adapter_statuses,
    hold_verdicts,
    latest_export,
    model_version,
    resolve_adapters,
    resolve_model,
    serve_model_path,
)
from llmray.builders.observe import PodView
from llmray.builders.status import COND_MODEL_RESOLVED, R_MODEL_RESOLVED
from llmray.ray import RayAuthError, RayError, RayNode, serve_route
from llmray.ray.serving import serving_status, steady_serving

from .cluster import ClusterController, Deps, Pass
from .decisions import deployed_adapters, model_rollout, serve_app_config
from .machines import COND_QUEUE_FULL, DeploymentSeen, Next, deployment_next, queue_full
from .rayconn import Head, RayAPI, ray_problem
from .store import Key

logger = logging.getLogger("llmray.controllers.deployment")

SERVE_INSTANCE_DEFAULTS: dict[str, Any] = {
    "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
    "proxy_location": "EveryNode",
}
"""Options of the Serve instance an own head starts with: a proxy on every node that runs replicas
(the serve Service selects each pod whose proxy is ready; see builders.cluster.serve_service)."""
COND_SERVE = "ServeReady"
COND_AUTOSCALING = "WorkersScaled"
POLL_DEPLOYING_S = 3.0
UNREACHABLE_REQUEUE_S = 10.0

DeploymentPass = Pass[LLMDeploymentSpec, LLMDeploymentStatus]


@dataclass
class _App:
    """What deleting the resource needs to remove its Serve application."""

    head: Head
    app_name: str


def joined_worker_states(
    workers: list[PodView],
    nodes: list[RayNode],
    ready_since: dict[str, float],
    *,
    has_demand: bool,
    shared: bool,
    now: float,
    replica_ips: frozenset[str] = frozenset(),
) -> list[WorkerState]:
    """Worker pods joined with Ray nodes (see :func:`llmray.autoscaling.worker_states`), with idle time.

    Own head: a worker node that hosts no Serve replica while nothing is pending is idle since the
    last pass that saw it busy (Ray itself keeps such a node ACTIVE while Serve's actors linger, and
    reports no idle time). On a shared head (the sandbox) worker pods are simulated and never join
    Ray: a Ready pod with no Ray node counts as capacity on its way while demand is pending (so it
    absorbs that demand once), and as idle since it became Ready (or since demand was last seen)
    otherwise. Either way it is removed after idleTimeoutSeconds. ``ready_since`` (pod name ->
    time the idle clock started) is updated in place.
    """
    live = [w for w in workers if not w.deleting]
    states = worker_states([(w.name, w.pod_ip or None) for w in live], nodes, now=now)
    ready = {w.name for w in live if w.started}  # Ready means "proxy ready" on serving pods
    for name in [n for n in ready_since if n not in ready]:
        del ready_since[name]
    if not shared:
        own: list[WorkerState] = []
        for pod, state in zip(live, states, strict=True):
            if not state.in_ray or state.idle_seconds is not None:
                own.append(state)
            elif has_demand or pod.pod_ip in replica_ips:
                ready_since[pod.name] = now
                own.append(state)
            else:
                since = ready_since.setdefault(pod.name, now)
                own.append(WorkerState(pod.name, in_ray=True, idle_seconds=now - since))
        return own
    out: list[WorkerState] = []
    for pod, state in zip(live, states, strict=True):
        matched = bool(pod.pod_ip) and any(n.ip == pod.pod_ip and n.alive and not n.is_head for n in nodes)
        if matched or not pod.started:
            out.append(state)
            continue
        if has_demand:  # idle time counts from the last pass that saw demand
            ready_since[pod.name] = now
            out.append(WorkerState(pod.name, in_ray=False))
        else:
            since = ready_since.setdefault(pod.name, now)
            out.append(WorkerState(pod.name, in_ray=True, idle_seconds=now - since))
    return out


class DeploymentController(ClusterController[LLMDeploymentSpec, LLMDeploymentStatus]):
    """Reconciles LLMDeployments."""

    kind: ClassVar[str] = KIND
    plural: ClassVar[str] = PLURAL
    spec_model = LLMDeploymentSpec
    status_model = LLMDeploymentStatus

    def __init__(self, deps: Deps, clock: Any = time.time) -> None:
        super().__init__(deps)
        self.apps: dict[Key, _App] = {}
        self.ready_since: dict[Key, dict[str, float]] = {}
        self._clock = clock

    # --- cluster half ------------------------------------------------------------------------------

    def prepare(self, p: DeploymentPass, spec: LLMDeploymentSpec) -> None:
        status = p.status
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
        self._resolve_adapters(p, spec)
        adapter_uris = tuple(a.uri for a in p.adapters if a.uri is not None)
        p.cluster = deployment_cluster(p.owner, spec, uri, adapter_uris)
        pool = spec.workers
        p.desired_workers = min(pool.max_replicas, max(pool.min_replicas, status.workers.desired))

    def _resolve_adapters(self, p: DeploymentPass, spec: LLMDeploymentSpec) -> None:
        """spec.adapters resolved into ``p.adapters`` and status.adapters (Ready ones stay Ready
        until the Serve step says otherwise); an adapter newly Failed gets a Warning Event."""
        jobs = {
            a.from_training_job: self.store.resource(TRAINING_KIND, p.namespace, a.from_training_job)
            for a in spec.adapters
            if a.from_training_job
        }
        previous = {a.name: a for a in p.status.adapters}
        p.adapters = resolve_adapters(spec, jobs, p.status.adapters, p.status.model.name)
        statuses = hold_verdicts(
            adapter_statuses(p.adapters, None, running=False), p.status.adapters, HOLD_OVER_RESOLUTION
        )
        self._adapter_events(p, previous, statuses)
        p.status.adapters = statuses

    @staticmethod
    def _adapter_events(p: DeploymentPass, previous: dict[str, Any], now: list[Any]) -> None:
        for adapter in now:
            before = previous.get(adapter.name)
            if before is not None and (before.state, before.message) == (adapter.state, adapter.message):
                continue
            if adapter.state == "Failed":
                p.event("Warning", "AdapterFailed", f"adapter {adapter.name}: {adapter.message}")
            elif adapter.state == "Ready" and (before is None or before.state != "Ready"):
                p.event("Normal", "AdapterReady", f"adapter {adapter.name} is served from {adapter.uri}")

    def wanted_services(self, p: DeploymentPass) -> list[dict[str, Any]]:
        assert p.cluster is not None
        return [*super().wanted_services(p), serve_service(p.cluster)]

    # --- the state machine -------------------------------------------------------------------------

    def decide(self, p: DeploymentPass) -> Next:
        return deployment_next(
            DeploymentSeen(
                phase=p.phase,
                blocker=p.blocker,
                health=p.health if p.want_cluster else None,
                unschedulable_timeout=self.settings.unschedulable_timeout,
                serve_seen=p.serve_seen,
                app=p.serve_app,
                min_replicas=p.spec.autoscaling.min_replicas if p.spec is not None else 1,
                ray_problem=p.ray_problem,
            )
        )

    def apply(self, p: DeploymentPass, nxt: Next) -> None:
        status, spec = p.status, p.spec
        status.phase = nxt.phase  # type: ignore[assignment]  # the one place a deployment phase is set
        self.apply_common(p, nxt)
        if spec is not None:
            auto = spec.autoscaling
            status.replicas.desired = min(auto.max_replicas, max(auto.min_replicas, status.replicas.desired))
        if p.cluster is not None and p.want_cluster:
            ends = self.settings.topology.head(p.name, p.namespace)
            # Outside the cluster (a shared head, address templates) the URL the operator uses is
            # the one a user can reach too; else the serve Service's in-cluster name.
            status.endpoint = (
                serve_route(p.name, p.namespace, ends).url + "/v1"
                if ends.overridden
                else serve_endpoint(p.cluster)
            )
        if p.blocker is not None and not p.want_cluster:
            status.endpoint = ""
            status.replicas.ready = 0
        verdict = nxt.serve
        if verdict is not None:
            status.replicas.ready = verdict.ready_replicas
            if verdict.desired_replicas is not None:
                status.replicas.desired = verdict.desired_replicas
            message = verdict.message
            if status.model.pending_version:
                message += (
                    f"; rolling out model version {status.model.pending_version} (replicas serve "
                    f"{status.model.version or 'the previous model'} until it is ready)"
                )
            p.condition(COND_SERVE, verdict.phase == "Ready", verdict.reason, message)
        if p.ray_problem is not None:
            p.condition(COND_SERVE, "Unknown", p.ray_problem.reason, p.ray_problem.message)
        if verdict is not None and nxt.phase != "Ready":
            p.requeue(POLL_DEPLOYING_S)
        figures = status.serving  # QueueFull judges this pass's figures where it polled
        if p.serving_seen:
            figures = serving_status(p.serving) if p.serving is not None else None
            status.serving = steady_serving(status.serving, figures)
        if nxt.phase not in ("Ready", "Degraded"):
            status.serving = figures = None
        if figures is None or spec is None:
            self.alarm(p, None, COND_QUEUE_FULL)
        else:
            waiting, limit = figures.waiting, spec.limits.max_queued_requests
            self.alarm(p, queue_full(waiting, limit, self.settings.queue_full_ratio), COND_QUEUE_FULL)

    # --- Ray half ----------------------------------------------------------------------------------

    async def _api_key(self, p: DeploymentPass) -> str | None:
        """The API key from spec.apiKeySecretRef (read only when it must go into the app's env)."""
        ref = p.parsed.api_key_secret_ref
        if ref is None:
            return None
        secret = await self.kube.read("Secret", p.namespace, ref.name)
        data = (secret or {}).get("data") or {}
        raw = data.get(ref.key)
        return base64.b64decode(raw).decode() if raw else None

    async def ray_steps(self, p: DeploymentPass) -> None:
        """The Serve application on Ray, its status, and worker autoscaling.

        Deploys (read-modify-write of Serve's application set: other apps on a shared head are
        kept) only when the config differs from what Serve runs, so an unchanged deployment sends
        no PUT; a spec change is a PUT of the new config, which Serve rolls out without dropping
        requests.
        """
        status, spec = p.status, p.parsed
        assert p.cluster is not None and p.health is not None
        if not p.health.head_ready:
            return
        head = self.heads.head(p.key, p.uid)
        route = head.route(p.name, p.namespace)
        api_key = await self._api_key(p) if head.shared else None
        if spec.model.from_training_job:
            job = self.store.resource(TRAINING_KIND, p.namespace, spec.model.from_training_job)
        else:
            job = latest_export(spec.model.uri or "", self.store.resources_in(TRAINING_KIND, p.namespace))
        target = model_version(spec, job, status.model.pending_version or status.model.version)
        config = serve_app_config(
            app_name=route.app_name,
            route_prefix=route.route_prefix,
            resource_name=p.name,
            spec=spec,
            model_path=serve_model_path(status.model.uri),
            api_key=api_key,
            api_key_in_pods=not head.shared,
            adapters=[
                AdapterSource(name=a.name, source=adapter_source(a.uri))
                for a in p.adapters
                if a.uri is not None
            ],
            model_version=target,
        )
        defaults = None if head.shared else SERVE_INSTANCE_DEFAULTS
        ray = self.heads.client(p.key, head)
        try:
            written = await ray.serve.put_application(route.app_name, config, instance_defaults=defaults)
            self.apps[p.key] = _App(head, route.app_name)
            if written:
                p.event("Normal", "DeployedServeApp", f"deployed Serve application {route.app_name}")
            p.serve_app = await ray.serve.get_application(route.app_name)
            p.serve_seen = True
            if p.serve_app is not None and p.serve_app.status == "RUNNING":
                if p.serve_app.has_live_replicas:
                    # Own head: the cluster's Ray token opens the read-only routes (stats, model
                    # list), so the operator never needs the user's API-key Secret.
                    await self._poll_stats(p, route.url, api_key if head.shared else head.token)
                else:
                    # Scaled to (or toward) zero: a poll would be a request, and Serve would start
                    # a replica for it; nothing serves, so the figures are zero.
                    p.serving, p.serving_seen = ServingStats(), True
            self._adapter_states(p)
            self._track_rollout(p, target, written)
            await self._autoscale(p, ray, head.shared)
        except RayError as exc:
            if isinstance(exc, RayAuthError):
                self.heads.refused(p.key)
            p.ray_problem = ray_problem(exc, head)
            p.requeue(UNREACHABLE_REQUEUE_S)

    async def _poll_stats(self, p: DeploymentPass, url: str, api_key: str | None) -> None:
        """The app's live figures (status.serving, QueueFull); no stats route (404) means none.

        Best effort: an error is logged and the figures are dropped (stale numbers mislead), but it
        is no problem of the deployment. ``api_key``: the cluster's own Ray token (never None on
        an own head), or on a shared head the app key the deploy step already read (None when the
        app has none): the poll itself reads no Secret.
        """
        serving = self.heads.serving(url, api_key)
        try:
            p.serving = await serving.stats()
        except RayError as exc:
            logger.debug("%s/%s: no serving stats: %s", p.namespace, p.name, exc)
            p.serving = None
        p.serving_seen = True
        if p.adapters and p.parsed.engine == "transformers":
            try:  # what a replica serves: an adapter it could not load is not listed
                p.served_models = frozenset(await serving.models())
            except RayError as exc:
                logger.debug("%s/%s: no model listing: %s", p.namespace, p.name, exc)

    def _adapter_states(self, p: DeploymentPass) -> None:
        """Adapters Ready once the Serve app runs (every replica reconfigured) with them deployed."""
        app = p.serve_app
        if not p.adapters:
            p.status.adapters = []
            return
        previous = {a.name: a for a in p.status.adapters}
        running = app is not None and app.running
        statuses = adapter_statuses(
            p.adapters, deployed_adapters(app), running=running, listed=p.served_models
        )
        if p.served_models is None:
            statuses = hold_verdicts(statuses, p.status.adapters, HOLD_WITHOUT_LISTING)
        self._adapter_events(p, previous, statuses)
        p.status.adapters = statuses
        if any(a.state == "Loading" for a in statuses):
            p.requeue(POLL_DEPLOYING_S)

    def _track_rollout(self, p: DeploymentPass, target: str, written: bool) -> None:
        """``status.model.version`` (serving) / ``pendingVersion`` (rolling out), with an Event per
        finished rollout; a rollout in progress is polled so its end shows up promptly."""
        model = p.status.model
        before = model.version
        rollout = model_rollout(before, target, p.serve_app, just_written=written)
        model.version, model.pending_version = rollout.serving, rollout.pending
        if rollout.rolling:
            p.requeue(POLL_DEPLOYING_S)
            if written:
                p.event(
                    "Normal",
                    "RollingOutModel",
                    f"rolling out model version {target} (serving {before or 'none'})",
                )
        elif before and rollout.serving != before:
            p.event("Normal", "RolledOutModel", f"model version {rollout.serving} serves (was {before})")

    async def _autoscale(self, p: DeploymentPass, ray: RayAPI, shared: bool) -> None:
        """Worker pods from Ray's pending demand, within spec.workers min/max; idle ones removed."""
        spec, status = p.parsed, p.status
        pool = spec.workers
        cluster = await ray.cluster.status()
        if not cluster.reported:
            return  # a fresh head: no report yet, so an empty demand means nothing
        nodes = await ray.cluster.nodes()
        replica_ips = p.serve_app.replica_ips if p.serve_app is not None else frozenset()
        offer = worker_offer(pool.resources.cpu, pool.resources.gpu, pool.resources.memory)
        states = joined_worker_states(
            p.workers,
            nodes,
            self.ready_since.setdefault(p.key, {}),
            has_demand=cluster.has_demand,
            shared=shared,
            now=self._clock(),
            replica_ips=replica_ips,
        )
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
                await self.kube.delete("Pod", p.namespace, pod.name, pod.uid)
                self.expectations.deleted(p.key, pod.uid)
        desired = min(pool.max_replicas, max(pool.min_replicas, decision.desired))
        if desired != status.workers.desired or decision.remove:
            status.workers.desired = desired
            p.event("Normal", "AutoscaledWorkers", f"{decision.reason}; {desired} worker pod(s) desired")
            p.requeue(0.0)  # create the new pods now

    async def ray_gone(self, key: Key) -> None:
        """Deleted: remove its Serve application (best effort; its own head goes with its pods)."""
        self.ready_since.pop(key, None)
        app = self.apps.pop(key, None)
        if app is None:
            return
        try:
            await self.heads.client(key, app.head).serve.delete_application(app.app_name)
            logger.info("%s %s/%s deleted: removed Serve application %s", *key, app.app_name)
        except RayError as exc:
            logger.info("%s %s/%s deleted: could not remove Serve app %s: %s", *key, app.app_name, exc)
