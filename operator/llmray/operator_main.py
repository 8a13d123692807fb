"""The operator process: Kopf watches and indexes feeding the reconcile queue.

Run it with ``llmray operator`` (or ``kopf run -m llmray.operator_main``). Kopf owns the watches
(server-side label selectors, so only our children are streamed), its in-memory indexes (Kopf
invokes no handler before every index is fully listed), Kubernetes Events and the health
endpoint. Watch events only enqueue keys; :mod:`llmray.controllers.runtime` reconciles them.

No finalizers, no annotations on the resources, no peering objects: deleting a resource works
even while the operator is down, and children go with it through owner references.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf

from llmray.api.common import GROUP, VERSION
from llmray.api.deployment import KIND as DEPLOYMENT_KIND
from llmray.api.deployment import PLURAL as DEPLOYMENT_PLURAL
from llmray.api.training import KIND as TRAINING_KIND
from llmray.api.training import PLURAL as TRAINING_PLURAL
from llmray.builders.common import LABEL_MANAGED_BY, MANAGED_BY, MANAGED_SELECTOR
from llmray.builders.observe import ChildView, PodView, owner_key
from llmray.controllers.cluster import ClusterController, Options
from llmray.controllers.deployment import DeploymentController
from llmray.controllers.runtime import Engine
from llmray.controllers.store import Expectations, Key, Store
from llmray.controllers.training import TrainingController
from llmray.kube import Kube, load_api_client

logger = logging.getLogger("llmray.operator")

_MANAGED = {LABEL_MANAGED_BY: MANAGED_BY}


def _options_from_env() -> Options:
    """Options when started by ``kopf run -m llmray.operator_main`` (no CLI flags)."""
    env = os.environ.get
    key_file = env("LLMRAY_AUTH_KEY_FILE")
    extra: dict[str, Any] = {"auth_key": Path(key_file).read_bytes().strip()} if key_file else {}
    return Options(
        unschedulable_timeout=float(env("LLMRAY_UNSCHEDULABLE_TIMEOUT", "300")),
        resync_seconds=float(env("LLMRAY_RESYNC_SECONDS", "15")),
        workers=int(env("LLMRAY_WORKERS", "8")),
        **extra,
    )


@dataclass
class OperatorState:
    """Process-wide state: options from the CLI, and what the startup handler builds."""

    options: Options = field(default_factory=_options_from_env)
    kubeconfig: str | None = None
    store: Store = field(default_factory=Store)
    kube: Kube | None = None
    engine: Engine[Key] | None = None
    controllers: dict[str, ClusterController] = field(default_factory=dict)


STATE = OperatorState()


async def _reconcile(key: Key) -> float | None:
    controller = STATE.controllers[key[0]]
    return await controller.reconcile(key)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Configure Kopf, then start the reconcile engine (it waits for the first watch event)."""
    settings.posting.level = logging.WARNING  # Kopf's own log lines become Events only if warnings
    settings.posting.reporting_component = "llmray-operator"
    settings.posting.reporting_instance = os.environ.get("POD_NAME", "llmray-operator")
    settings.scanning.disabled = True  # no CRD/namespace list+watch: fewer permissions needed
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    for plural in ("pods", "services"):
        settings.watching.label_selectors["v1", plural] = MANAGED_SELECTOR
    if STATE.kube is None:
        STATE.kube = Kube(load_api_client(STATE.kubeconfig), max_workers=max(4, STATE.options.workers))
    expectations = Expectations()
    STATE.controllers = {
        TRAINING_KIND: TrainingController(STATE.kube, STATE.store, STATE.options, expectations),
        DEPLOYMENT_KIND: DeploymentController(STATE.kube, STATE.store, STATE.options, expectations),
    }
    STATE.engine = Engine(
        _reconcile,
        keys=STATE.store.keys,
        workers=STATE.options.workers,
        resync_seconds=STATE.options.resync_seconds,
        label=lambda key: key[0],
    )


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if STATE.engine is not None:
        await STATE.engine.stop()
    if STATE.kube is not None:
        STATE.kube.close()
        STATE.kube = None


@kopf.on.probe(id="reconcile_queue")
def probe(**_: Any) -> int:
    """Liveness detail: how many keys wait for a reconcile."""
    return len(STATE.engine.queue) if STATE.engine is not None else 0


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


@kopf.index("v1", "pods", labels=_MANAGED)
async def llmray_pods(body: kopf.Body, **_: Any) -> Any:
    key = owner_key(dict(body))
    return {key: PodView.of(dict(body))} if key else None


@kopf.index("v1", "services", labels=_MANAGED)
async def llmray_services(body: kopf.Body, **_: Any) -> Any:
    key = owner_key(dict(body))
    return {key: ChildView.of(dict(body))} if key else None


def _bind(kwargs: dict[str, Any]) -> Engine[Key] | None:
    """Hand Kopf's indexes to the store and start the engine, on the first event."""
    store = STATE.store
    if not store.bound:
        store.resources[TRAINING_KIND] = kwargs["llmray_trainingjobs"]
        store.resources[DEPLOYMENT_KIND] = kwargs["llmray_deployments"]
        store.pods = kwargs["llmray_pods"]
        store.services = kwargs["llmray_services"]
        # Secrets are neither listed nor watched: that would read every Secret of every namespace.
        # The operator only creates the auth Secret (see ClusterController.step_auth_secret).
        store.secrets = {}
    if STATE.engine is not None:
        STATE.engine.start()
    return STATE.engine


# --- events -> queue ---------------------------------------------------------------------------------


def _enqueue(key: Key, event_type: str | None, engine: Engine[Key]) -> None:
    if event_type == "DELETED" and STATE.store.resource(*key) is None:
        engine.queue.forget(key)
        controller = STATE.controllers.get(key[0])
        if controller is not None:
            controller.forget(key)  # in-memory state, and best-effort cleanup on Ray
        return
    engine.queue.add(key)


@kopf.on.event(GROUP, VERSION, TRAINING_PLURAL)
async def on_training_job(type: str, namespace: str | None, name: str, **kwargs: Any) -> None:
    engine = _bind(kwargs)
    if engine is None or namespace is None:
        return
    _enqueue((TRAINING_KIND, namespace, name), type, engine)
    # Deployments serving this job's output react to its phase (train -> deploy handoff).
    for ns, dep_name, body in STATE.store.resources_of_kind(DEPLOYMENT_KIND):
        if ns == namespace and ((body.get("spec") or {}).get("model") or {}).get("fromTrainingJob") == name:
            engine.queue.add((DEPLOYMENT_KIND, ns, dep_name))


@kopf.on.event(GROUP, VERSION, DEPLOYMENT_PLURAL)
async def on_deployment(type: str, namespace: str | None, name: str, **kwargs: Any) -> None:
    engine = _bind(kwargs)
    if engine is not None and namespace is not None:
        _enqueue((DEPLOYMENT_KIND, namespace, name), type, engine)


async def _on_child(body: kopf.Body, kwargs: dict[str, Any]) -> None:
    engine = _bind(kwargs)
    key = owner_key(dict(body))
    if engine is not None and key is not None and key[0] in STATE.controllers:
        engine.queue.add(key)


@kopf.on.event("v1", "pods", labels=_MANAGED)
async def on_pod(body: kopf.Body, **kwargs: Any) -> None:
    await _on_child(body, kwargs)


@kopf.on.event("v1", "services", labels=_MANAGED)
async def on_service(body: kopf.Body, **kwargs: Any) -> None:
    await _on_child(body, kwargs)


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


def run(config: RunConfig, options: Options) -> int:
    """Run the operator until SIGTERM/SIGINT; returns the exit code."""
    STATE.options = options
    STATE.kubeconfig = config.kubeconfig
    if config.kubeconfig:
        os.environ["KUBECONFIG"] = config.kubeconfig  # Kopf's login reads it too
    problem = check_crds_installed(config.kubeconfig)
    if problem:
        logger.error(problem)
        return 2
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
    )
    return 0
