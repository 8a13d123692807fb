"""In-memory fakes at the operator's two I/O edges, behind the interfaces the controllers use.

- :class:`FakeKube` is an API server for Pods, Services, Secrets and the two custom resources
  (uids, resourceVersions, AlreadyExists, conditional status writes, injected errors) and serves
  the watch caches (:class:`~llmray.controllers.store.Store`) from the same objects;
- :class:`FakeRay` is a :class:`~llmray.controllers.rayconn.RayProvider` whose heads keep jobs and
  Serve applications in memory; a head can be made unreachable, refuse the token, or restart
  (forgetting its jobs).

:class:`World` wires both into real controllers, so a test drives whole reconcile passes in
milliseconds: ``await world.reconcile(key)``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llmray.api.deployment import KIND as DEPLOYMENT_KIND
from llmray.api.deployment import PLURAL as DEPLOYMENT_PLURAL
from llmray.api.telemetry import ServingStats
from llmray.api.training import KIND as TRAINING_KIND
from llmray.api.training import PLURAL as TRAINING_PLURAL
from llmray.builders.observe import ChildView, PodView, owner_key
from llmray.controllers.cluster import ClusterController, Deps
from llmray.controllers.deployment import DeploymentController
from llmray.controllers.rayconn import Head, Heads
from llmray.controllers.runtime import Gate
from llmray.controllers.settings import Settings
from llmray.controllers.store import Expectations, Key, Store
from llmray.controllers.training import TrainingController
from llmray.kube import AlreadyExists, KubeError, status_patch_body
from llmray.ray import RayAuthError, RayHeadUnavailable, RayNode, RayNotFound
from llmray.ray.cluster import ClusterStatus
from llmray.ray.jobs import JobInfo, JobStatus, Submission
from llmray.ray.serve import DeploymentStatus, ServeApplication

PLURAL_KIND = {TRAINING_PLURAL: TRAINING_KIND, DEPLOYMENT_PLURAL: DEPLOYMENT_KIND, "workloads": "Workload"}
CUSTOM = (TRAINING_KIND, DEPLOYMENT_KIND)
ObjKey = tuple[str, str, str]


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch applied to ``target`` in place."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)
    return target


class _Index:
    """A live view with ``kopf.Index``'s shape (key -> values), computed from the fake's objects."""

    def __init__(self, entries: Any) -> None:
        self._entries = entries

    def _map(self) -> dict[Any, list[Any]]:
        out: dict[Any, list[Any]] = {}
        for key, value in self._entries():
            out.setdefault(key, []).append(value)
        return out

    def get(self, key: Any, default: Any = None) -> Any:
        return self._map().get(key, default)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._map())


class FakeKube:
    """An in-memory API server with the :class:`~llmray.controllers.store.KubeAPI` calls."""

    def __init__(self) -> None:
        self.objects: dict[ObjKey, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.errors: dict[tuple[str, str], KubeError] = {}
        """(verb, kind) -> error raised by the next matching calls (until removed)."""
        self._rv = itertools.count(1)
        self._uid = itertools.count(1)

    # --- the KubeAPI protocol --------------------------------------------------------------------

    def _check(self, verb: str, kind: str) -> None:
        self.calls.append((verb, kind, ""))
        err = self.errors.get((verb, kind))
        if err is not None:
            raise err

    def _stamp(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._rv))

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind, meta = obj["kind"], obj["metadata"]
        self._check("create", kind)
        key = (kind, meta["namespace"], meta["name"])
        if key in self.objects:
            raise AlreadyExists(409, "AlreadyExists", f"{kind} {meta['name']} exists", "create", meta["name"])
        stored = copy.deepcopy(obj)
        stored["metadata"]["uid"] = f"uid-{next(self._uid)}"
        stored["metadata"].setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        if kind == "Secret" and "stringData" in stored:
            import base64

            stored.setdefault("data", {}).update(
                {k: base64.b64encode(v.encode()).decode() for k, v in stored.pop("stringData").items()}
            )
        if kind == "Pod":
            stored["status"] = {"phase": "Pending"}
        self._stamp(stored)
        self.objects[key] = stored
        return copy.deepcopy(stored)

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self._check("get", kind)
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        self._check("delete", kind)
        found = self.objects.get((kind, namespace, name))
        if found is None or (uid and found["metadata"]["uid"] != uid):
            return False
        del self.objects[(kind, namespace, name)]
        return True

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self._check("patch", kind)
        found = self.objects[(kind, namespace, name)]
        merge(found, patch)
        self._stamp(found)
        return copy.deepcopy(found)

    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        kind = PLURAL_KIND[plural]
        self._check("patch_status", kind)
        found = self.objects[(kind, namespace, name)]
        body = status_patch_body(patch, resource_version)  # what the real client sends
        expected = body.pop("metadata", {}).get("resourceVersion")
        if expected and found["metadata"]["resourceVersion"] != expected:
            raise KubeError(409, "Conflict", "the object has been modified", "patch", name)
        merge(found.setdefault("status", {}), body["status"])
        self._stamp(found)
        return copy.deepcopy(found)

    # --- test helpers ------------------------------------------------------------------------------

    def apply(
        self, kind: str, namespace: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
    ) -> Key:
        """Create or update a custom resource (generation moves when the spec changes)."""
        key = (kind, namespace, name)
        found = self.objects.get(key)
        if found is None:
            self.objects[key] = {
                "apiVersion": "llmray.io/v1alpha1",
                "kind": kind,
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": f"uid-{next(self._uid)}",
                    "generation": 1,
                    **({"labels": dict(labels)} if labels else {}),
                },
                "spec": copy.deepcopy(spec),
            }
            self._stamp(self.objects[key])
        elif found["spec"] != spec:
            found["spec"] = copy.deepcopy(spec)
            found["metadata"]["generation"] += 1
            self._stamp(found)
        return key

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return self.objects[(kind, namespace, name)]

    def status(self, key: Key) -> dict[str, Any]:
        return dict(self.objects[key].get("status") or {})

    def remove(self, key: Key) -> None:
        self.objects.pop(key, None)

    def pods(self, namespace: str) -> list[dict[str, Any]]:
        return [o for (k, ns, _), o in sorted(self.objects.items()) if k == "Pod" and ns == namespace]

    def set_pod(
        self, namespace: str, name: str, phase: str = "Running", ready: bool = True, **status: Any
    ) -> None:
        """Stand in for the kubelet: move a pod to ``phase`` (Ready or not)."""
        pod = self.objects[("Pod", namespace, name)]
        pod["status"] = {
            "phase": phase,
            "podIP": status.pop("podIP", f"10.0.0.{len(pod['metadata']['uid'])}"),
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            **status,
        }
        self._stamp(pod)

    def run_pods(self, namespace: str) -> None:
        """Every pod of ``namespace`` Running and Ready."""
        for pod in self.pods(namespace):
            if (pod.get("status") or {}).get("phase") != "Running":
                self.set_pod(namespace, pod["metadata"]["name"])

    def store(self) -> Store:
        """The watch caches, as views of these objects (a cache that never lags)."""

        def custom(kind: str) -> Any:
            return lambda: (
                ((ns, n), copy.deepcopy(o)) for (k, ns, n), o in list(self.objects.items()) if k == kind
            )

        def children(kind: str, view: Any) -> Any:
            return lambda: (
                (owner_key(o), view.of(o))
                for (k, _, _), o in list(self.objects.items())
                if k == kind and owner_key(o) is not None
            )

        def by_job() -> Iterator[tuple[tuple[str, str], str]]:
            for (k, ns, n), o in list(self.objects.items()):
                job = ((o.get("spec") or {}).get("model") or {}).get("fromTrainingJob")
                if k == DEPLOYMENT_KIND and job:
                    yield (ns, job), n

        def by_uri() -> Iterator[tuple[tuple[str, str], str]]:
            for (k, ns, n), o in list(self.objects.items()):
                uri = str(((o.get("spec") or {}).get("model") or {}).get("uri") or "").rstrip("/")
                if k == DEPLOYMENT_KIND and uri:
                    yield (ns, uri), n

        fake = self

        class Workloads(dict):  # type: ignore[type-arg]
            """Live view: owner key -> Workload (what the operator's Workload watch keeps)."""

            def get(self, key: Any, default: Any = None) -> Any:
                for (k, _, _), o in list(fake.objects.items()):
                    if k == "Workload" and owner_key(o) == key:
                        return copy.deepcopy(o)
                return default

        return Store(
            workloads=Workloads(),
            resources={
                TRAINING_KIND: _Index(custom(TRAINING_KIND)),
                DEPLOYMENT_KIND: _Index(custom(DEPLOYMENT_KIND)),
            },
            pods=_Index(children("Pod", PodView)),
            services=_Index(children("Service", ChildView)),
            secrets=_Index(children("Secret", ChildView)),
            deployments_by_job=_Index(by_job),
            deployments_by_uri=_Index(by_uri),
        )


# --- Ray -------------------------------------------------------------------------------------------


@dataclass
class FakeHead:
    """One head's Jobs, Serve and cluster-status APIs, in memory."""

    url: str
    token: str | None = None
    """The token the head accepts (None: auth off)."""
    jobs_: dict[str, JobInfo] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    apps: dict[str, ServeApplication] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    cluster_status: ClusterStatus = field(default_factory=ClusterStatus)
    ray_nodes: list[RayNode] = field(default_factory=list)
    down: bool = False
    calls: list[str] = field(default_factory=list)

    def restart(self) -> None:
        """A restarted head forgets every job (Ray keeps them in the head's memory)."""
        self.jobs_.clear()
        self.logs.clear()

    def set_job(self, sid: str, status: JobStatus, message: str = "") -> None:
        self.jobs_[sid] = JobInfo(sid, status, message=message)

    def set_app(self, name: str, status: str, running: int = 1, target: int = 1, message: str = "") -> None:
        dep = DeploymentStatus(
            "LLMServer", "HEALTHY" if status == "RUNNING" else "UNHEALTHY", "", target, running
        )
        self.apps[name] = ServeApplication(
            name,
            status,
            message=message,
            deployed_config=self.configs.get(name),
            deployments={"LLMServer": dep},
        )


class _Client:
    """What a controller gets for one head with one token: checks reachability and auth per call."""

    def __init__(self, head: FakeHead, token: str | None) -> None:
        self._head, self._token = head, token
        self.jobs, self.serve, self.cluster = self, self, self

    def _call(self, what: str) -> FakeHead:
        head = self._head
        head.calls.append(what)
        if head.down:
            raise RayHeadUnavailable(head.url, "connection refused")
        if head.token is not None and self._token != head.token:
            raise RayAuthError("GET", head.url + "/api", 401, "Unauthorized")
        return head

    # jobs
    async def find(self, submission_id: str) -> JobInfo | None:
        return self._call("find").jobs_.get(submission_id)

    async def submit(
        self, entrypoint: str, *, submission_id: str, runtime_env: Any = None, metadata: Any = None
    ) -> Submission:
        head = self._call("submit")
        if submission_id in head.jobs_:
            return Submission(head.jobs_[submission_id], created=False)
        job = JobInfo(submission_id, JobStatus.PENDING, entrypoint=entrypoint, metadata=dict(metadata or {}))
        head.jobs_[submission_id] = job
        return Submission(job, created=True)

    async def tail(self, submission_id: str, *, lines: int = 200, driver_node_id: str | None = None) -> str:
        return self._call("tail").logs.get(submission_id, "")

    async def stop(self, submission_id: str) -> bool:
        head = self._call("stop")
        job = head.jobs_.get(submission_id)
        if job is None:
            raise RayNotFound("POST", head.url, 404, "no such job")
        head.jobs_[submission_id] = JobInfo(submission_id, JobStatus.STOPPED)
        return True

    # serve
    async def put_application(self, name: str, app_config: Any, *, instance_defaults: Any = None) -> bool:
        head = self._call("put_application")
        if head.configs.get(name) == dict(app_config):
            return False
        head.configs[name] = dict(app_config)
        head.apps.setdefault(name, ServeApplication(name, "DEPLOYING"))
        return True

    async def get_application(self, name: str) -> ServeApplication | None:
        return self._call("get_application").apps.get(name)

    async def delete_application(self, name: str) -> bool:
        head = self._call("delete_application")
        head.configs.pop(name, None)
        return head.apps.pop(name, None) is not None

    # cluster
    async def status(self) -> ClusterStatus:
        return self._call("status").cluster_status

    async def nodes(self) -> list[RayNode]:
        return list(self._call("nodes").ray_nodes)


@dataclass
class _FakeServing:
    ray: FakeRay
    url: str
    api_key: str | None

    async def stats(self) -> ServingStats | None:
        self.ray.stats_calls.append((self.url, self.api_key))
        answer = self.ray.stats.get(self.url)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def models(self) -> list[str]:
        answer = self.ray.models.get(self.url)
        if isinstance(answer, Exception):
            raise answer
        if answer is None:
            raise RayNotFound("GET", self.url, 404, "no models route")
        return answer


class FakeRay:
    """A :class:`~llmray.controllers.rayconn.RayProvider` over in-memory heads (by dashboard URL)."""

    def __init__(self) -> None:
        self.heads: dict[str, FakeHead] = {}
        self.forgotten: list[Key] = []
        self.stats: dict[str, ServingStats | Exception | None] = {}
        self.models: dict[str, list[str] | Exception | None] = {}
        """Serve route URL -> what its /v1/models lists (None: no answer, 404)."""
        """Serve route URL -> what its stats route answers (absent/None: 404)."""
        self.stats_calls: list[tuple[str, str | None]] = []

    def serving(self, url: str, api_key: str | None) -> _FakeServing:
        return _FakeServing(self, url, api_key)

    def head(self, url: str) -> FakeHead:
        return self.heads.setdefault(url, FakeHead(url))

    def client(self, key: Key, head: Head) -> Any:
        return _Client(self.head(head.dashboard_url), head.token)

    def forget(self, key: Key) -> None:
        self.forgotten.append(key)

    async def aclose(self) -> None:
        return None


# --- the two together ---------------------------------------------------------------------------


class World:
    """Real controllers over a :class:`FakeKube` and a :class:`FakeRay`."""

    def __init__(self, settings: Settings | None = None, *, ray_slots: int | None = None) -> None:
        self.settings = settings or Settings()
        self.kube = FakeKube()
        self.ray = FakeRay()
        self.events: list[tuple[str, str, str, str]] = []
        self.deps = Deps(
            kube=self.kube,
            store=self.kube.store(),
            settings=self.settings,
            heads=Heads(self.settings.topology, self.ray, self.settings.auth_key),
            expectations=Expectations(),
            ray_gate=Gate(ray_slots) if ray_slots else None,
            events=lambda body, t, r, m: self.events.append((body["metadata"]["name"], t, r, m)),
        )
        self.controllers: dict[str, ClusterController[Any, Any]] = {
            TRAINING_KIND: TrainingController(self.deps),
            DEPLOYMENT_KIND: DeploymentController(self.deps),
        }

    async def reconcile(self, key: Key) -> float | None:
        return await self.controllers[key[0]].reconcile(key)

    def phase(self, key: Key) -> str:
        return str(self.kube.status(key).get("phase", ""))

    def condition(self, key: Key, type_: str) -> dict[str, Any]:
        for cond in self.kube.status(key).get("conditions") or []:
            if cond["type"] == type_:
                return dict(cond)
        return {}

    def reasons(self, name: str | None = None) -> list[str]:
        return [r for n, _, r, _ in self.events if name is None or n == name]

    def head_of(self, key: Key) -> FakeHead:
        return self.ray.head(self.settings.topology.head(key[2], key[1]).dashboard_url)
