"""The reconcile pass shared by both kinds: observe -> act on Kubernetes -> act on Ray -> decide -> write.

A pass is an ordered list of small idempotent steps (KubeRay's ``rayClusterReconcileFuncs``) that
stops at the first error or blocker, then the kind's Ray steps, then the kind's state machine
(:mod:`llmray.controllers.machines`, the only place a phase is chosen). Status is computed on a
copy whatever happened and written only when it changed; problems a user can act on become a
condition, ``status.message`` and one Kubernetes Event when they first appear.

Collaborators come in at construction (:class:`Deps`): the Kubernetes API, the watch caches, the
settings (with the Ray topology), the in-flight expectations, the Ray heads and the gate that
bounds how many passes talk to Ray at once. Tests pass in-memory fakes (``tests/unit/fakes.py``).

Spec changes:
- in place: worker count, autoscaling bounds, request limits, engine args, serve Service
  type/port -- nothing restarts;
- recreate: anything a pod is built from (image, pull policy, resources, placement, env Secrets,
  PVCs) changes the pod template hash, and the affected pods are deleted and recreated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Generic, TypeVar, cast

import kopf
from pydantic import ValidationError

from llmray.api.common import ConditionStatus, SecretKeyRef
from llmray.api.deployment import LLMDeploymentSpec, LLMDeploymentStatus
from llmray.api.telemetry import ServingStats
from llmray.api.training import LLMTrainingJobSpec, LLMTrainingJobStatus
from llmray.builders import cluster as b
from llmray.builders.common import (
    NODE_TYPE_HEAD,
    NODE_TYPE_WORKER,
    Owner,
    auth_secret_name,
    head_name,
)
from llmray.builders.model import ResolvedAdapter
from llmray.builders.observe import STUCK_WAITING_REASONS, ChildView, PodView, service_fingerprint
from llmray.builders.plan import plan_head, plan_workers
from llmray.builders.status import (
    COND_CLUSTER_READY,
    COND_HEAD_READY,
    COND_RECONCILED,
    R_API_ERROR,
    R_FORBIDDEN,
    R_INVALID_SPEC,
    R_NAME_CONFLICT,
    R_RECONCILED,
    R_SECRET_NOT_FOUND,
    Blocker,
    ClusterHealth,
    cluster_health,
    get_condition,
    merge_patch,
    now,
    set_condition,
)
from llmray.kube import AlreadyExists, KubeError
from llmray.ray.serve import ServeApplication

from .decisions import TrainingStep
from .machines import Alarm, Next, RayProblem
from .rayconn import Heads
from .runtime import Gate
from .settings import Settings
from .store import CountingKube, Expectations, Key, KubeAPI, Store

logger = logging.getLogger("llmray.controllers")

SpecT = TypeVar("SpecT", LLMTrainingJobSpec, LLMDeploymentSpec)
StatusT = TypeVar("StatusT", LLMTrainingJobStatus, LLMDeploymentStatus)

# Reasons that call for a Warning event when a condition turns False with them.
WARNING_REASONS = frozenset(
    {
        "Unschedulable",
        R_SECRET_NOT_FOUND,
        R_NAME_CONFLICT,
        R_INVALID_SPEC,
        R_FORBIDDEN,
        R_API_ERROR,
        "TrainingJobFailed",
        "DeadlineExceeded",
        *STUCK_WAITING_REASONS,
    }
)
RAY_BUSY_REQUEUE_S = 1.0
"""Retry soon when every Ray slot was taken (the pass did its Kubernetes work anyway)."""


@dataclass
class Deps:
    """A controller's collaborators, built once at start-up (fakes in unit tests)."""

    kube: KubeAPI
    store: Store
    settings: Settings
    heads: Heads
    expectations: Expectations = field(default_factory=Expectations)
    ray_gate: Gate | None = None
    events: Callable[[dict[str, Any], str, str, str], None] | None = None
    """Where Events go (default: Kopf's poster); tests collect them."""


@dataclass
class Pass(Generic[SpecT, StatusT]):
    """Everything one reconcile pass knows and decides about one resource."""

    key: Key
    body: dict[str, Any]
    status: StatusT
    """A mutable copy of the resource's status model (written back at the end if changed)."""
    at: datetime
    spec: SpecT | None = None
    phase: str = ""
    """The phase the pass started from (the state machine's input)."""
    reopened: bool = False
    """A finished resource starts over this pass (e.g. Failed for a cluster reason, spec changed)."""
    cluster: b.ClusterSpec | None = None
    want_cluster: bool = True
    """False: the resource needs no pods now (suspended, finished, waiting for its model)."""
    desired_workers: int = 0
    head: PodView | None = None
    workers: list[PodView] = field(default_factory=list)
    services: dict[str, ChildView] = field(default_factory=dict)
    secrets: dict[str, ChildView] = field(default_factory=dict)
    auth_uid: str = ""
    created_head: bool = False
    teardown_delay: float = 0.0
    """When no cluster is wanted: seconds to keep the pods first (ttlSecondsAfterFinished)."""
    blocker: Blocker | None = None
    health: ClusterHealth | None = None
    error: KubeError | None = None
    ray_problem: RayProblem | None = None
    """The head could not be reached or refused a request this pass."""
    job_step: TrainingStep | None = None
    """Training: what the Ray step did with the current attempt (the machine's Ray input)."""
    serve_seen: bool = False
    """Deployments: the pass read the Serve application's status (``serve_app``)."""
    serve_app: ServeApplication | None = None
    ray_skipped: bool = False
    """The Ray steps were skipped (every Ray slot busy): nothing new is known from the head."""
    serving_seen: bool = False
    """Deployments: the pass polled the app's stats route (``serving`` None: it has none)."""
    serving: ServingStats | None = None
    adapters: list[ResolvedAdapter] = field(default_factory=list)
    """Deployments: spec.adapters resolved this pass."""
    served_models: frozenset[str] | None = None
    """Deployments: the model ids a replica listed on ``/v1/models`` this pass (None: not asked)."""
    requeue_after: float | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)
    queue_hold: str | None = None
    """Training: held by its queue (Kueue has not admitted it, or evicted it): why."""

    @property
    def kind(self) -> str:
        return self.key[0]

    @property
    def namespace(self) -> str:
        return self.key[1]

    @property
    def name(self) -> str:
        return self.key[2]

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.body.get("metadata") or {})

    @property
    def generation(self) -> int:
        return int(self.meta.get("generation") or 0)

    @property
    def uid(self) -> str:
        return str(self.meta.get("uid") or "")

    @property
    def owner(self) -> Owner:
        return Owner(kind=self.kind, name=self.name, namespace=self.namespace, uid=self.uid)

    @property
    def parsed(self) -> SpecT:
        """The spec, once :meth:`ClusterController.step_parse` accepted it."""
        assert self.spec is not None, "spec not parsed"
        return self.spec

    def condition(self, type: str, status: bool | str, reason: str, message: str) -> None:
        """Set a condition on the status copy (transition time kept when status is unchanged)."""
        value = status if isinstance(status, str) else ("True" if status else "False")
        self.status.conditions = set_condition(
            self.status.conditions,
            type=type,
            status=value,
            reason=reason,
            message=message,
            generation=self.generation,
            at=self.at,
        )

    def event(self, type: str, reason: str, message: str) -> None:
        self.events.append((type, reason, message))

    def requeue(self, seconds: float) -> None:
        """Run again within ``seconds`` (the earliest request of the pass wins)."""
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


Step = Callable[[Pass[Any, Any]], Awaitable[bool]]


class ClusterController(Generic[SpecT, StatusT]):
    """Reconciles one kind's Ray cluster; subclasses add the kind's Ray steps and state machine."""

    kind: ClassVar[str]
    plural: ClassVar[str]
    workers_field: ClassVar[str] = "spec.workers"
    spec_model: type[SpecT]
    status_model: type[StatusT]

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.kube: KubeAPI = CountingKube(deps.kube, self.kind)
        self.store = deps.store
        self.settings = deps.settings
        self.expectations = deps.expectations
        self.heads = deps.heads
        # key -> (resourceVersion our last status write was based on, the status we wrote, the
        # resourceVersion that write produced). The cache may still hold that older object for a
        # moment; our write is then the truth.
        self._written: dict[Key, tuple[str, dict[str, Any], str]] = {}
        # Children the operator may create but not read or watch (least privilege): what this
        # process already made sure exists, by key -> (owner uid, content hash).
        self._ensured: dict[tuple[Key, str], tuple[str, str]] = {}
        self._deleted: set[Key] = set()
        self._user_secrets_readable = True
        self._cleanups: set[asyncio.Task[None]] = set()

    # --- to be provided by each kind -------------------------------------------------------------

    def prepare(self, p: Pass[SpecT, StatusT], spec: SpecT) -> None:
        """Derive cluster, desired workers, want_cluster and blockers from spec and status."""
        raise NotImplementedError

    async def ray_steps(self, p: Pass[SpecT, StatusT]) -> None:
        """Talk to the Ray head once the cluster exists (jobs, Serve, autoscaling)."""

    async def ray_idle(self, p: Pass[SpecT, StatusT]) -> None:
        """Passes that want no cluster (suspended, finished, waiting): e.g. stop a job."""

    async def ray_gone(self, key: Key) -> None:
        """A deleted resource (best effort: stop its Ray job, remove its Serve app)."""

    async def step_gate(self, p: Pass[SpecT, StatusT]) -> None:
        """Before any child is made: may hold the resource (``want_cluster`` False), e.g. in a queue."""

    def decide(self, p: Pass[SpecT, StatusT]) -> Next:
        """The kind's state machine applied to what the pass observed (pure)."""
        raise NotImplementedError

    def apply(self, p: Pass[SpecT, StatusT], nxt: Next) -> None:
        """Write the machine's decision into the status copy (the kind sets its phase here)."""
        raise NotImplementedError

    def forget(self, key: Key) -> None:
        """The resource was deleted: drop its in-memory state and clean up on Ray in the background.

        No finalizer is involved (deletion never waits for the operator); in a real cluster the
        resource's Ray cluster is garbage-collected with it anyway, so this matters for a shared
        head (the sandbox), where a job or Serve app would otherwise outlive its resource.
        """
        self.expectations.forget(key)
        self._written.pop(key, None)
        self._ensured = {k: v for k, v in self._ensured.items() if k[0] != key}
        self._deleted.add(key)
        try:
            task = asyncio.get_running_loop().create_task(self._gone(key))
        except RuntimeError:  # no loop: nothing to clean up on Ray
            self.heads.forget(key)
            return
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def drain(self) -> None:
        """Wait for background cleanups (tests, shutdown)."""
        while self._cleanups:
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)

    async def _gone(self, key: Key) -> None:
        try:
            await self.ray_gone(key)
        except Exception:  # best effort: never let cleanup take the operator down
            logger.exception("%s %s/%s: Ray cleanup after deletion failed", *key)
        finally:
            self.heads.forget(key)

    # --- the pass ----------------------------------------------------------------------------------

    async def reconcile(self, key: Key) -> float | None:
        body = self.store.resource(*key)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            # Gone or going: owner references let the garbage collector delete the children.
            self.forget(key)
            return None
        p = self.new_pass(key, body)
        old_status = p.status.model_copy(deep=True)
        try:
            parsed = self.step_parse(p)
            self.step_observe(p)
            if parsed:
                await self.step_gate(p)
            if not p.want_cluster:
                await self.step_teardown(p)
            elif parsed:
                for step in (
                    self.step_user_secrets,
                    self.step_auth_secret,
                    self.step_network_policy,
                    self.step_services,
                    self.step_head,
                    self.step_workers,
                ):
                    if not await step(p):
                        break
        except KubeError as err:
            p.error = err
        self.observe_cluster(p)
        await self.step_ray(p)
        self.apply(p, self.decide(p))
        if p.ray_skipped and p.status.phase == old_status.phase:
            # Without fresh word from the head, the last Ray-informed message still holds; writing
            # the generic one would flap the status (and cost a write) on every busy resync.
            p.status.message = old_status.message
        try:
            await self.write(p, old_status)
        except KubeError as err:
            if err.status == 409:  # the resource changed since the pass read it: redo on a fresh view
                raise kopf.TemporaryError(f"status changed meanwhile ({err}); re-reading", delay=0.5) from err
            raise
        if p.error is not None:
            if p.error.transient:
                raise kopf.TemporaryError(str(p.error))
            raise RuntimeError(str(p.error))
        return p.requeue_after

    async def step_ray(self, p: Pass[SpecT, StatusT]) -> None:
        """The kind's Ray steps, when a Ray slot is free (slow heads must not starve Kubernetes work)."""
        if p.error is not None or p.spec is None:
            return
        if p.want_cluster and p.blocker is not None:
            return
        gate = self.deps.ray_gate
        if gate is not None and not gate.try_acquire():
            p.ray_skipped = True
            p.requeue(RAY_BUSY_REQUEUE_S)
            return
        try:
            if p.want_cluster:
                await self.ray_steps(p)
            else:
                await self.ray_idle(p)
        finally:
            if gate is not None:
                gate.release()

    def current_status(self, key: Key, body: dict[str, Any]) -> dict[str, Any]:
        """The resource's status: the cached one, or our own newer write if the cache lags."""
        return self._current(key, body)[0]

    def _current(self, key: Key, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """(status, the resourceVersion it belongs to)."""
        written = self._written.get(key)
        version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        if written is not None and written[0] == version:
            return written[1], written[2]
        return dict(body.get("status") or {}), version

    def new_pass(self, key: Key, body: dict[str, Any]) -> Pass[SpecT, StatusT]:
        raw = self.current_status(key, body)
        try:
            status = self.status_model.model_validate(raw)
        except ValidationError:
            status = self.status_model()
        return Pass(key=key, body=body, status=status, at=now(), phase=status.phase)

    def step_parse(self, p: Pass[SpecT, StatusT]) -> bool:
        try:
            p.spec = self.spec_model.model_validate(p.body.get("spec") or {})
        except ValidationError as exc:
            # The CRD's schema and CEL rules make this rare (e.g. a CRD older than the operator).
            first = exc.errors()[0]
            where = "spec." + ".".join(str(x) for x in first.get("loc", ()))
            p.blocker = Blocker(
                R_INVALID_SPEC, f"invalid {where}: {first.get('msg')}; fix the spec", fatal=True
            )
            p.want_cluster = False
            return False
        self.prepare(p, p.spec)
        if p.blocker is not None:
            p.want_cluster = p.want_cluster and not p.blocker.fatal
        return True

    def step_observe(self, p: Pass[SpecT, StatusT]) -> None:
        """Read children from the caches, overlaid with our in-flight writes."""
        pods = self.expectations.merge(p.key, self.store.pods_of(p.key))
        mine = [pod for pod in pods if pod.owner_uid in ("", p.uid)]
        p.head = next((pod for pod in mine if pod.node_type == NODE_TYPE_HEAD and not pod.deleting), None)
        if p.head is None:
            p.head = next((pod for pod in mine if pod.node_type == NODE_TYPE_HEAD), None)
        p.workers = [pod for pod in mine if pod.node_type == NODE_TYPE_WORKER]
        p.services = {k: v for k, v in self.store.services_of(p.key).items() if v.owner_uid == p.uid}
        p.secrets = {k: v for k, v in self.store.secrets_of(p.key).items() if v.owner_uid == p.uid}

    def _needs_pods(self, p: Pass[SpecT, StatusT]) -> bool:
        live = [w for w in p.workers if not w.deleting]
        return p.head is None or len(live) < p.desired_workers

    async def step_user_secrets(self, p: Pass[SpecT, StatusT]) -> bool:
        """Secrets the pods read should exist before pods are created (else they never start).

        Only where the operator may read them (a namespaced install that grants it, the sandbox):
        the chart does not, so the kubelet reports a missing Secret on the pod
        (CreateContainerConfigError), which the status shows as for any stuck container.
        """
        assert p.cluster is not None
        if not self._user_secrets_readable:
            return True
        previous = get_condition(p.status.conditions, COND_CLUSTER_READY)
        if not (self._needs_pods(p) or (previous is not None and previous.reason == R_SECRET_NOT_FOUND)):
            return True
        for field_name, ref in p.cluster.secret_fields():
            try:
                problem = await self._check_secret(p.namespace, ref)
            except KubeError as err:
                if err.status != 403:
                    raise
                self._user_secrets_readable = False
                logger.info("not allowed to read users' Secrets: the kubelet reports missing ones")
                return True
            if problem:
                p.blocker = Blocker(
                    R_SECRET_NOT_FOUND,
                    f"{problem} (referenced by {field_name}); create it, e.g. `kubectl create secret generic "
                    f"{ref.name} -n {p.namespace} --from-literal={ref.key}=...`",
                    fatal=p.kind == "LLMDeployment",
                )
                return False
        return True

    async def _check_secret(self, namespace: str, ref: SecretKeyRef) -> str:
        secret = await self.kube.read("Secret", namespace, ref.name)
        if secret is None:
            return f"Secret {ref.name} not found in namespace {namespace}"
        keys = set((secret.get("data") or {}).keys()) | set((secret.get("stringData") or {}).keys())
        if ref.key not in keys:
            return f"Secret {ref.name} has no key {ref.key!r} (keys: {', '.join(sorted(keys)) or 'none'})"
        return ""

    async def _create_owned(self, p: Pass, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create a deterministic-name child; None (plus a NameConflict blocker) if someone else owns it."""
        try:
            return await self.kube.create(obj)
        except AlreadyExists:
            kind, name = obj["kind"], obj["metadata"]["name"]
            existing = await self.kube.read(kind, p.namespace, name)
            if existing is None:
                raise KubeError(409, "Conflict", f"{kind} {name} is being deleted", "create", name) from None
            refs = (existing.get("metadata") or {}).get("ownerReferences") or []
            if any(r.get("uid") == p.uid for r in refs):
                return existing  # ours: the cache had not caught up
            if (existing.get("metadata") or {}).get("deletionTimestamp"):
                raise KubeError(
                    409, "Conflict", f"old {kind} {name} is still terminating", "create", name
                ) from None
            controller: dict[str, Any] = next((r for r in refs if r.get("controller")), {})
            if controller.get("kind") == p.kind and controller.get("name") == p.name:
                # Left by a deleted resource of the same name (delete + re-apply): the garbage
                # collector removes it shortly, then the create succeeds.
                raise KubeError(
                    409, "Conflict", f"{kind} {name} of the previous {p.kind} {p.name} awaits garbage "
                    "collection", "create", name,
                ) from None  # fmt: skip
            owner = f"{controller.get('kind')} {controller.get('name')}" if controller else "nobody"
            p.blocker = Blocker(
                R_NAME_CONFLICT,
                f"{kind} {name} already exists and belongs to {owner}; delete it or rename this "
                f"{p.kind} (resources of both kinds share child names, so their names must differ)",
                fatal=True,
            )
            return None

    async def step_auth_secret(self, p: Pass[SpecT, StatusT]) -> bool:
        """Create ``<name>-ray-auth`` with the derived token; the operator never reads it back.

        Created once per resource incarnation and process, and again whenever pods are about to
        be created (they need it). AlreadyExists means it is there: ours from before a restart
        (same derived token), unless this process saw a same-named resource deleted, whose Secret
        then waits for garbage collection first.
        """
        assert p.cluster is not None
        token = self.heads.token(p.key, p.uid)
        p.auth_uid = b.auth_fingerprint(token)
        slot = (p.key, "auth")
        if self._ensured.get(slot) == (p.uid, p.auth_uid) and not self._needs_pods(p):
            return True
        try:
            await self.kube.create(b.auth_secret(p.cluster, token))
        except AlreadyExists:
            if p.key in self._deleted and self._ensured.get(slot) is None:
                raise KubeError(
                    409, "Conflict", f"Secret {auth_secret_name(p.name)} of the previous {p.kind} {p.name} "
                    "awaits garbage collection", "create", auth_secret_name(p.name),
                ) from None  # fmt: skip
        self._deleted.discard(p.key)
        self._ensured[slot] = (p.uid, p.auth_uid)
        return True

    async def step_network_policy(self, p: Pass[SpecT, StatusT]) -> bool:
        """Create (or patch to the spec) the cluster's NetworkPolicy; no watch needed."""
        assert p.cluster is not None
        policy = b.network_policy(p.cluster, self.settings.operator_peer, self.settings.metrics_peer)
        wanted = policy["metadata"]["annotations"][b.ANNOTATION_TEMPLATE_HASH]
        slot = (p.key, "netpol")
        if self._ensured.get(slot) == (p.uid, wanted):
            return True
        current = await self._create_owned(p, policy)
        if current is None:
            return False
        annotations = (current.get("metadata") or {}).get("annotations") or {}
        if annotations.get(b.ANNOTATION_TEMPLATE_HASH) != wanted:
            name = policy["metadata"]["name"]
            await self.kube.patch(
                "NetworkPolicy",
                p.namespace,
                name,
                {"metadata": {"annotations": policy["metadata"]["annotations"]}, "spec": policy["spec"]},
            )
        self._ensured[slot] = (p.uid, wanted)
        return True

    def wanted_services(self, p: Pass[SpecT, StatusT]) -> list[dict[str, Any]]:
        assert p.cluster is not None
        return [b.head_service(p.cluster)]

    async def step_services(self, p: Pass[SpecT, StatusT]) -> bool:
        for svc in self.wanted_services(p):
            name = svc["metadata"]["name"]
            current = p.services.get(name)
            if current is None or current.deleting:
                if await self._create_owned(p, svc) is None:
                    return False
                continue
            wanted = svc["metadata"]["annotations"][b.ANNOTATION_TEMPLATE_HASH]
            # The annotation says which spec the Service was built from; the fingerprint catches
            # edits by others (e.g. a `kubectl patch` of its type), which are reverted.
            if current.template_hash != wanted or current.fingerprint != service_fingerprint(svc):
                # In place: type, ports and selector are patched; the ClusterIP is kept.
                await self.kube.patch(
                    "Service",
                    p.namespace,
                    name,
                    {"metadata": {"annotations": svc["metadata"]["annotations"]}, "spec": svc["spec"]},
                )
                drift = current.template_hash == wanted
                p.event(
                    "Normal",
                    "RevertedService" if drift else "UpdatedService",
                    f"{'reverted changes to' if drift else 'updated'} Service {name} to match the spec",
                )
        return True

    async def step_head(self, p: Pass[SpecT, StatusT]) -> bool:
        assert p.cluster is not None
        desired = b.head_pod(p.cluster, p.auth_uid)
        template = desired["metadata"]["annotations"][b.ANNOTATION_TEMPLATE_HASH]
        plan = plan_head(p.head, template_hash=template)
        if plan.action == "create":
            if await self._create_owned(p, desired) is None:
                return False
            view = PodView.of(desired)
            self.expectations.created(p.key, view)
            p.head = view
            p.created_head = True
        elif plan.action == "delete" and p.head is not None:
            await self.kube.delete("Pod", p.namespace, p.head.name, p.head.uid)
            self.expectations.deleted(p.key, p.head.uid)
            p.event("Normal", "RecreatingHead", f"deleting head pod {p.head.name}: {plan.reason}")
            p.requeue(1.0)
        return True

    async def step_workers(self, p: Pass[SpecT, StatusT]) -> bool:
        cluster = p.cluster
        assert cluster is not None
        group = cluster.worker_group
        template = b.pod_template_hash(cluster, NODE_TYPE_WORKER, p.auth_uid)
        plan = plan_workers(p.workers, desired=p.desired_workers, group=group, template_hash=template)
        for pod, _why in plan.delete:
            await self.kube.delete("Pod", p.namespace, pod.name, pod.uid)
            self.expectations.deleted(p.key, pod.uid)

        async def create(index: int) -> None:
            obj = b.worker_pod(cluster, index, p.auth_uid)
            # AlreadyExists: ours, from a pass the cache has not shown yet (names are deterministic).
            with contextlib.suppress(AlreadyExists):
                await self.kube.create(obj)
            view = PodView.of(obj)
            self.expectations.created(p.key, view)
            p.workers.append(view)

        # Slow start (like the ReplicaSet controller): batches of 1, 2, 4, ... so that a systematic
        # failure (quota, admission) costs one request, not one per missing pod.
        pending, batch = list(plan.create), 1
        while pending:
            now_, pending = pending[:batch], pending[batch:]
            results = await asyncio.gather(*(create(i) for i in now_), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            batch = min(batch * 2, 32)
        reasons = sorted({why for _, why in plan.delete})
        if p.created_head:
            # One event for a new cluster (events are API writes too: keep them few).
            p.event(
                "Normal",
                "CreatedRayCluster",
                f"created Ray head pod {head_name(p.name)}"
                + (f" and {len(plan.create)} worker pods" if plan.create else ""),
            )
        elif plan.delete or plan.create:
            p.event(
                "Normal",
                "ScaledWorkers",
                f"worker pods: +{len(plan.create)} -{len(plan.delete)}"
                + (f" ({', '.join(reasons)})" if reasons else "")
                + f", {p.desired_workers} desired",
            )
        return True

    async def step_teardown(self, p: Pass[SpecT, StatusT]) -> bool:
        """No cluster wanted: delete the Ray pods (Secret and Services are cheap and kept)."""
        if p.teardown_delay > 0:
            p.requeue(p.teardown_delay)
            return True
        pods = [pod for pod in [p.head, *p.workers] if pod is not None and not pod.deleting and pod.uid]
        for pod in pods:
            await self.kube.delete("Pod", p.namespace, pod.name, pod.uid)
            self.expectations.deleted(p.key, pod.uid)
        if pods:
            p.event(
                "Normal",
                "DeletedRayPods",
                f"deleted {len(pods)} Ray pods: {p.status.message or 'not needed'}",
            )
        return True

    # --- status ------------------------------------------------------------------------------------

    # --- status ------------------------------------------------------------------------------------

    def observe_cluster(self, p: Pass[SpecT, StatusT]) -> None:
        """The cluster's health and the status fields every kind shares (no phase: see decide)."""
        p.status.observed_generation = p.generation
        if p.want_cluster and p.cluster is not None:
            live_workers = [w for w in p.workers if not w.deleting]
            p.health = cluster_health(
                p.head,
                live_workers,
                desired_workers=p.desired_workers,
                at=p.at,
                kind_hint=self.workers_field,
                serving=p.cluster.serve is not None,
            )
            p.status.ray_cluster.name = p.name
            p.status.ray_cluster.head_service = head_name(p.name)
            p.status.ray_cluster.dashboard_url = p.cluster.dashboard_url
            p.status.ray_cluster.head_ready = p.health.head_ready
            p.status.workers.ready = p.health.workers_ready
            p.status.workers.desired = p.desired_workers
            p.condition(
                COND_HEAD_READY,
                p.health.head_ready,
                "HeadPodReady" if p.health.head_ready else "HeadPodNotReady",
                "the Ray head pod is Running and Ready"
                if p.health.head_ready
                else "waiting for the Ray head pod",
            )
            if p.health.unschedulable_for or not p.health.ready:
                # Re-check soon: unschedulable pods time out, and pods become ready without an event
                # reaching us if the cache missed it.
                p.requeue(5.0)
        else:
            p.status.ray_cluster.head_ready = False
            p.status.workers.ready = 0
            p.status.workers.desired = 0
            p.status.conditions = [c for c in p.status.conditions if c.type != COND_HEAD_READY]
        if p.error is not None and p.error.transient:
            # Conflicts, throttling, a terminating object in the way: retried with backoff, no alarm.
            p.condition(COND_RECONCILED, False, "Retrying", f"{p.error}; retrying")
        elif p.error is not None:
            reason = R_FORBIDDEN if p.error.status == 403 else R_API_ERROR
            hint = (
                "; the operator's ServiceAccount lacks this permission (check the chart's RBAC)"
                if p.error.status == 403
                else ""
            )
            p.condition(COND_RECONCILED, False, reason, f"{p.error}{hint}")
        else:
            p.condition(COND_RECONCILED, True, R_RECONCILED, "children match the spec")

    def apply_common(self, p: Pass[SpecT, StatusT], nxt: Next) -> None:
        """The parts of a decision both kinds write the same way (message, cluster condition)."""
        if nxt.message is not None:
            p.status.message = nxt.message
        if nxt.cluster is not None:
            p.condition(COND_CLUSTER_READY, *nxt.cluster)

    def alarm(self, p: Pass[SpecT, StatusT], alarm: Alarm | None, type_: str) -> None:
        """Set (or, for None, remove) a threshold condition; a Warning Event when it turns on, a
        Normal one when it clears."""
        previous = get_condition(p.status.conditions, type_)
        if alarm is None:
            p.status.conditions = [c for c in p.status.conditions if c.type != type_]
            return
        p.condition(alarm.type, alarm.active, alarm.reason, alarm.message)
        was = previous is not None and previous.status == "True"
        if alarm.active and not was:
            p.event("Warning", alarm.reason, alarm.message)
        elif was and not alarm.active:
            p.event("Normal", alarm.reason, f"{alarm.type} cleared: {alarm.message}")

    def previous_cluster_condition(self, p: Pass[SpecT, StatusT]) -> ConditionStatus | None:
        return get_condition(p.status.conditions, COND_CLUSTER_READY)

    async def write(self, p: Pass[SpecT, StatusT], old: StatusT) -> None:
        """A conditional merge patch of the status if anything changed, then the pass's Events."""
        self._transition_events(p, old)
        before, based_on = self._current(p.key, p.body)
        after = p.status.to_wire()
        patch = merge_patch(before, after)
        if patch:
            logger.debug("status patch of %s: %s", p.key, patch)
            # Conditional on the version the pass started from: if the resource changed meanwhile
            # (a user, another writer, or our cache lagging), 409 -> retried on a fresh view.
            obj = await self.kube.patch_status(
                self.plural, p.namespace, p.name, patch, resource_version=based_on or None
            )
            version = str(p.meta.get("resourceVersion") or "")
            new_version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            self._written[p.key] = (version, after, new_version)
        # After the write: a pass whose write conflicted is redone, and posts its events then.
        poster = self.deps.events or post_event
        for type_, reason, message in p.events:
            poster(p.body, type_, reason, message)

    def _transition_events(self, p: Pass[SpecT, StatusT], old: StatusT) -> None:
        if old.phase != p.status.phase:
            p.event(
                "Warning" if p.status.phase == "Failed" else "Normal",
                p.status.phase,
                f"phase {old.phase} -> {p.status.phase}"
                + (f": {p.status.message}" if p.status.message else ""),
            )
        before: dict[str, ConditionStatus] = {c.type: c for c in old.conditions}
        for cond in p.status.conditions:
            prev = before.get(cond.type)
            changed = prev is None or (prev.status, prev.reason) != (cond.status, cond.reason)
            if changed and cond.status == "False" and cond.reason in WARNING_REASONS:
                p.event("Warning", cond.reason, cond.message)


def post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Post a Kubernetes Event about ``body`` through Kopf's event poster (non-blocking)."""
    log = logger.warning if type_ == "Warning" else logger.info
    meta = body.get("metadata") or {}
    log("%s %s/%s: %s: %s", body.get("kind"), meta.get("namespace"), meta.get("name"), reason, message)
    with contextlib.suppress(LookupError):  # outside a running operator: logged only
        kopf.event(kopf.Body(cast(kopf.RawBody, body)), type=type_, reason=reason, message=message[:1024])
