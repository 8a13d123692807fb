"""The operator process: Kopf watches and indexes feeding the reconcile queue.

Run it with ``llmray operator``: :func:`run` builds one :class:`App` from the settings (CLI flags)
and hands it to every Kopf handler as ``memo.app`` -- no module-level state. Kopf owns the watches
(server-side label selectors, so only our children are streamed), its in-memory indexes (Kopf
invokes no handler before every index is fully listed), Kubernetes Events and the health
endpoint. Watch events only enqueue keys; :mod:`llmray.controllers.runtime` reconciles them.

No finalizers, no annotations on the resources, no peering objects: deleting a resource works
even while the operator is down, and children go with it through owner references. With
``--leader-elect`` (:mod:`llmray.leader`) every replica watches and keeps its caches warm, but only
the one holding the Lease runs reconcile passes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from llmray.api.common import GROUP, VERSION
from llmray.api.deployment import KIND as DEPLOYMENT_KIND
from llmray.api.deployment import PLURAL as DEPLOYMENT_PLURAL
from llmray.api.training import KIND as TRAINING_KIND
from llmray.api.training import PLURAL as TRAINING_PLURAL
from llmray.builders.common import LABEL_MANAGED_BY, MANAGED_BY, MANAGED_SELECTOR
from llmray.builders.observe import ChildView, PodView, owner_key
from llmray.controllers.cluster import ClusterController, Deps
from llmray.controllers.deployment import DeploymentController
from llmray.controllers.rayconn import Heads, PooledRay
from llmray.controllers.runtime import Gate, ReconcileLoop
from llmray.controllers.settings import Settings
from llmray.controllers.store import Expectations, Key, Store
from llmray.controllers.training import TrainingController
from llmray.kube import Kube, load_api_client
from llmray.leader import LeaderElector
from llmray.metrics import RESOURCES

logger = logging.getLogger("llmray.operator")

_MANAGED = {LABEL_MANAGED_BY: MANAGED_BY}


@dataclass
class App:
    """The running operator: settings, caches, clients, controllers and the reconcile loop."""

    settings: Settings = field(default_factory=Settings)
    kubeconfig: str | None = None
    store: Store = field(default_factory=Store)
    kube: Kube | None = None
    ray: PooledRay = field(default_factory=PooledRay)
    loop: ReconcileLoop[Key] | None = None
    controllers: dict[str, ClusterController[Any, Any]] = field(default_factory=dict)
    elector: LeaderElector | None = None
    indexed: bool = False
    """Every index has been listed (Kopf delivered the first watch event)."""

    @property
    def leading(self) -> bool:
        """This replica may reconcile: it holds the Lease, or leader election is off."""
        return self.elector is None or self.elector.leading

    def build(self, indices: dict[str, Any]) -> None:
        """Caches, clients, controllers and the loop (in the running event loop).

        ``indices`` are Kopf's indexes (live objects, filled by the watches). The loop starts with
        the first watch event, which Kopf delivers only once every index is fully listed.
        """
        self.store.resources[TRAINING_KIND] = indices["llmray_trainingjobs"]
        self.store.resources[DEPLOYMENT_KIND] = indices["llmray_deployments"]
        self.store.deployments_by_job = indices["llmray_deployments_by_job"]
        self.store.deployments_by_uri = indices["llmray_deployments_by_uri"]
        self.store.pods = indices["llmray_pods"]
        self.store.services = indices["llmray_services"]
        RESOURCES.source = self.store.phase_counts
        # Secrets are neither listed nor watched: that would read every Secret of every namespace.
        # The operator only creates the auth Secret (see ClusterController.step_auth_secret).
        if self.kube is None:
            self.kube = Kube(load_api_client(self.kubeconfig), max_workers=max(4, self.settings.workers))
        api = self.settings.kueue_api
        self.kube.register("Workload", api, "workloads")
        self.kube.register("LocalQueue", api, "localqueues")
        self.kube.register("ResourceFlavor", api, "resourceflavors", namespaced=False)
        self.kube.register("WorkloadPriorityClass", api, "workloadpriorityclasses", namespaced=False)
        self.controllers = self._controllers()
        self.loop = ReconcileLoop(
            self.reconcile,
            keys=self.store.keys,
            workers=self.settings.workers,
            resync_seconds=self.settings.resync_seconds,
            pass_timeout=self.settings.pass_timeout,
            label=lambda key: key[0],
        )
        election = self.settings.leader_election
        if election is not None and self.elector is None:
            self.elector = LeaderElector(
                self.kube.api_client, election, on_started=self._lead, on_stopped=self._follow
            )
            self.elector.start()

    def _controllers(self) -> dict[str, ClusterController[Any, Any]]:
        assert self.kube is not None
        deps = Deps(
            kube=self.kube,
            store=self.store,
            settings=self.settings,
            heads=Heads(self.settings.topology, self.ray, self.settings.auth_key),
            expectations=Expectations(),
            ray_gate=Gate(self.settings.ray_slots),
        )
        return {
            TRAINING_KIND: TrainingController(deps),
            DEPLOYMENT_KIND: DeploymentController(deps),
        }

    def maybe_start(self) -> None:
        """Start the loop once every index is listed and this replica leads (idempotent)."""
        if self.loop is not None and self.indexed and self.leading and not self.loop.running:
            self.loop.start()
            for key in list(self.store.keys()):  # a new leader looks at everything once
                self.loop.queue.add(key)

    def _lead(self) -> None:
        # Fresh in-memory state: whatever a previous term remembered may be stale now.
        self.controllers = self._controllers()
        self.maybe_start()

    def _follow(self) -> None:
        """Lost the Lease: stop reconciling now (passes are cancelled at their next await)."""
        if self.loop is not None:
            self.loop.halt()

    async def reconcile(self, key: Key) -> float | None:
        return await self.controllers[key[0]].reconcile(key)

    async def close(self) -> None:
        if self.loop is not None:
            self.loop.halt()
        if self.elector is not None:
            await self.elector.stop()  # releases the Lease: a standby takes over at once
        if self.loop is not None:
            await self.loop.stop()
        await self.ray.aclose()
        if self.kube is not None:
            self.kube.close()
            self.kube = None


def _app(memo: Any) -> App:
    """The App :func:`run` put in Kopf's memo; under ``kopf run -m llmray.operator_main`` (no CLI),
    one built at start-up from the flags' defaults and their environment fallbacks."""
    if getattr(memo, "app", None) is None:
        from llmray.cli import build_parser, settings_from_args

        memo.app = App(settings=settings_from_args(build_parser().parse_args(["operator"]), os.environ))
    return cast(App, memo.app)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    """Configure Kopf, then build the controllers (the loop starts with the first watch event)."""
    settings.posting.level = logging.WARNING  # Kopf's own log lines become Events only if warnings
    settings.posting.reporting_component = "llmray-operator"
    settings.posting.reporting_instance = os.environ.get("POD_NAME", "llmray-operator")
    settings.scanning.disabled = True  # no CRD/namespace list+watch: fewer permissions needed
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    for plural in ("pods", "services"):
        settings.watching.label_selectors["v1", plural] = MANAGED_SELECTOR
    settings.watching.label_selectors["kueue.x-k8s.io", "workloads"] = MANAGED_SELECTOR
    _app(memo).build(kwargs)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await _app(memo).close()


@kopf.on.probe(id="reconcile_queue")
def probe(memo: kopf.Memo, **_: Any) -> int:
    """Liveness detail: how many keys wait for a reconcile."""
    loop = _app(memo).loop
    return len(loop.queue) if loop is not None else 0


@kopf.on.probe(id="leader")
def leader_probe(memo: kopf.Memo, **_: Any) -> bool:
    """Liveness detail: whether this replica reconciles (a standby is healthy too)."""
    return _app(memo).leading


@kopf.on.probe(id="reconcile_stuck_seconds", errors=kopf.ErrorsMode.PERMANENT)
def stuck_probe(memo: kopf.Memo, **_: Any) -> float:
    """Liveness fails (HTTP 500) when a pass has run past ``stuck_after``: the loop is wedged."""
    app = _app(memo)
    stuck = app.loop.stuck_for() if app.loop is not None else 0.0
    if stuck > app.settings.stuck_after:
        raise kopf.PermanentError(f"a reconcile pass has been running for {stuck:.0f}s")
    return round(stuck, 1)


# --- indexes (the caches) --------------------------------------------------------------------------


def _snapshot(body: kopf.Body) -> dict[str, Any]:
    raw = copy.deepcopy(dict(body))
    (raw.get("metadata") or {}).pop("managedFields", None)
    return raw


@kopf.index(GROUP, VERSION, TRAINING_PLURAL)
async def llmray_trainingjobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): _snapshot(body)}


@kopf.index(GROUP, VERSION, DEPLOYMENT_PLURAL)
async def llmray_deployments(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): _snapshot(body)}


@kopf.index(GROUP, VERSION, DEPLOYMENT_PLURAL)
async def llmray_deployments_by_job(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> Any:
    """(namespace, training job) -> deployments serving its output (as the model or an adapter): a
    job's event wakes only those."""
    jobs = {(spec.get("model") or {}).get("fromTrainingJob")}
    jobs |= {(a or {}).get("fromTrainingJob") for a in spec.get("adapters") or [] if isinstance(a, dict)}
    keys = {(namespace, job): name for job in jobs if job}
    return keys or None


@kopf.index(GROUP, VERSION, DEPLOYMENT_PLURAL)
async def llmray_deployments_by_uri(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> Any:
    """(namespace, spec.model.uri) -> deployments serving that folder: an export there wakes them."""
    uri = str((spec.get("model") or {}).get("uri") or "").rstrip("/")
    return {(namespace, uri): name} if uri else None


@kopf.index("v1", "pods", labels=_MANAGED)
async def llmray_pods(body: kopf.Body, **_: Any) -> Any:
    key = owner_key(dict(body))
    return {key: PodView.of(dict(body))} if key else None


@kopf.index("v1", "services", labels=_MANAGED)
async def llmray_services(body: kopf.Body, **_: Any) -> Any:
    key = owner_key(dict(body))
    return {key: ChildView.of(dict(body))} if key else None


def _started(memo: Any) -> App | None:
    """The app, its loop started if it leads (idempotent): on the first event every index is listed.

    A standby still queues keys (deduplicated: at most one per resource); it consumes none.
    """
    app = _app(memo)
    if app.loop is None:
        return None
    app.indexed = True
    app.maybe_start()
    return app


# --- events -> queue ---------------------------------------------------------------------------------


def _enqueue(app: App, key: Key, event_type: str | None) -> None:
    assert app.loop is not None
    if event_type == "DELETED" and app.store.resource(*key) is None:
        app.loop.queue.forget(key)
        controller = app.controllers.get(key[0])
        if controller is not None and app.leading:
            controller.forget(key)  # in-memory state, and best-effort cleanup on Ray
        return
    app.loop.queue.add(key)


@kopf.on.event(GROUP, VERSION, TRAINING_PLURAL)
async def on_training_job(type: str, namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    app = _started(memo)
    if app is None or app.loop is None or namespace is None:
        return
    _enqueue(app, (TRAINING_KIND, namespace, name), type)
    # Deployments serving this job's output react to its phase (train -> deploy handoff), and
    # those serving the folder it exports to (spec.model.uri) to a new export's version.
    job = app.store.resource(TRAINING_KIND, namespace, name) or {}
    output = str(((job.get("status") or {}).get("output") or {}).get("uri") or "")
    serving = app.store.deployments_of_job(namespace, name)
    serving += app.store.deployments_of_uri(namespace, output) if output else []
    for dep_name in serving:
        app.loop.queue.add((DEPLOYMENT_KIND, namespace, dep_name))


@kopf.on.event(GROUP, VERSION, DEPLOYMENT_PLURAL)
async def on_deployment(type: str, namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    app = _started(memo)
    if app is not None and namespace is not None:
        _enqueue(app, (DEPLOYMENT_KIND, namespace, name), type)


async def _on_child(body: kopf.Body, memo: Any) -> None:
    app = _started(memo)
    key = owner_key(dict(body))
    if app is not None and app.loop is not None and key is not None and key[0] in app.controllers:
        app.loop.queue.add(key)


@kopf.on.event("v1", "pods", labels=_MANAGED)
async def on_pod(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _on_child(body, memo)


@kopf.on.event("v1", "services", labels=_MANAGED)
async def on_service(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _on_child(body, memo)


@kopf.on.event("kueue.x-k8s.io", "workloads", labels=_MANAGED)
async def on_workload(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Kueue admitted, evicted or finished a job's Workload: cache it and wake its job.

    Kopf watches Kueue's preferred version; where Kueue is not installed it watches nothing. The
    fields the operator reads are the same in every served version.
    """
    app = _app(memo)
    key = owner_key(dict(body))
    if key is None:
        return
    if type == "DELETED":
        app.store.workloads.pop(key, None)
    else:
        app.store.workloads[key] = _snapshot(body)
    await _on_child(body, memo)


# --- running -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """How ``llmray operator`` runs Kopf."""

    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = False
    liveness: str | None = "http://127.0.0.1:8080/healthz"
    peering: str | None = None
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    kubeconfig: str | None = None


def check_crds_installed(kubeconfig: str | None) -> str | None:
    """An error message when the llmray.io API is not served (CRDs missing), else None.

    With scanning disabled Kopf only watches resources present at startup, so this is checked
    before starting rather than discovered as a silently idle operator.
    """
    from kubernetes import client

    from llmray.kube import load_api_client as load

    api = load(kubeconfig)
    try:
        resources = client.CustomObjectsApi(api).get_api_resources(GROUP, VERSION)
    except Exception as exc:
        return f"cannot read the {GROUP}/{VERSION} API: {exc}. Install the CRDs: kubectl apply -f crds/"
    finally:
        api.close()
    names = {r.name for r in resources.resources}
    missing = {TRAINING_PLURAL, DEPLOYMENT_PLURAL} - names
    if missing:
        return f"CRDs not installed: {', '.join(sorted(missing))}. Install them: kubectl apply -f crds/"
    return None


def kueue_served(kubeconfig: str | None, api_version: str) -> bool:
    """Whether the cluster serves Kueue's ``workloads`` in ``api_version`` (checked once at start)."""
    from kubernetes import client

    from llmray.kube import load_api_client as load

    group, _, version = api_version.partition("/")
    api = load(kubeconfig)
    try:
        resources = client.CustomObjectsApi(api).get_api_resources(group, version, _request_timeout=(5, 30))
    except Exception as exc:
        logger.info("Kueue API %s not served (%s): queue-labelled jobs are held", api_version, exc)
        return False
    finally:
        api.close()
    served = resources is not None and any(r.name == "workloads" for r in resources.resources)
    logger.info(
        "Kueue API %s %s", api_version, "served" if served else "not served: queue-labelled jobs are held"
    )
    return served


def run(config: RunConfig, settings: Settings) -> int:
    """Run the operator until SIGTERM/SIGINT; returns the exit code."""
    if config.kubeconfig:
        os.environ["KUBECONFIG"] = config.kubeconfig  # Kopf's login reads it too
    problem = check_crds_installed(config.kubeconfig)
    if problem:
        logger.error(problem)
        return 2
    settings = dataclasses.replace(settings, kueue_served=kueue_served(config.kubeconfig, settings.kueue_api))
    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port, addr=config.metrics_address)
    clusterwide = config.all_namespaces or not config.namespaces
    kopf.run(
        clusterwide=clusterwide,
        namespaces=() if clusterwide else config.namespaces,
        standalone=config.peering is None,
        peering_name=config.peering,
        liveness_endpoint=config.liveness or None,
        memo=kopf.Memo(app=App(settings=settings, kubeconfig=config.kubeconfig)),
    )
    return 0
