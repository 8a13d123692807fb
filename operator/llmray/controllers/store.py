"""Read access to what the watches have seen (Kopf's in-memory indexes), plus our own recent writes.

The reconcilers never list objects from the API server: they read these caches, filled by
server-side-filtered watches. A cache can lag behind our own writes by a few milliseconds, so
:class:`Expectations` overlays the pods we just created or deleted (controller-runtime calls this
"expectations"); with deterministic pod names a lagging cache can only cause a harmless 409.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from llmray.builders.observe import ChildView, PodView
from llmray.metrics import CHILDREN_CREATED, CHILDREN_DELETED, RESOURCES, count_phases

Key = tuple[str, str, str]
"""(kind, namespace, name) of an LLMTrainingJob or LLMDeployment."""


class _Index(Protocol):
    """The part of ``kopf.Index`` we use: key -> iterable of values."""

    def get(self, key: Any, default: Any = None) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...


class KubeAPI(Protocol):
    """The Kubernetes calls the controllers make (:class:`llmray.kube.Kube`; tests use a fake)."""

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]: ...
    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...
    async def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool: ...
    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]: ...
    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any]: ...


class CountingKube:
    """A :class:`KubeAPI` that counts the children one kind's controller creates and deletes
    (``llmray_children_created_total`` / ``..._deleted_total``), whatever step made the call."""

    def __init__(self, kube: KubeAPI, kind: str) -> None:
        self.inner = kube
        self.kind = kind

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        created = await self.inner.create(obj)
        CHILDREN_CREATED.labels(self.kind, str(obj.get("kind") or "")).inc()
        return created

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.inner.read(kind, namespace, name)

    async def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        deleted = await self.inner.delete(kind, namespace, name, uid)
        if deleted:
            CHILDREN_DELETED.labels(self.kind, kind).inc()
        return deleted

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.inner.patch(kind, namespace, name, patch)

    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        return await self.inner.patch_status(plural, namespace, name, patch, resource_version)


@dataclass
class Store:
    """The operator's caches: custom resources by kind, and children by owner key."""

    resources: dict[str, _Index] = field(default_factory=dict)
    pods: _Index | None = None
    services: _Index | None = None
    secrets: _Index | None = None
    deployments_by_job: _Index | None = None
    """(namespace, training job name) -> names of the LLMDeployments serving its output."""
    deployments_by_uri: _Index | None = None
    """(namespace, spec.model.uri without a trailing slash) -> names of the LLMDeployments serving it."""
    workloads: dict[Key, dict[str, Any]] = field(default_factory=dict)
    """Owner key -> its Kueue Workload as last watched (kept by the Workload watch)."""

    def resource(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The latest body of a custom resource, or None when it is gone."""
        index = self.resources.get(kind)
        if index is None:
            return None
        values = index.get((namespace, name))
        return next(iter(values), None) if values is not None else None

    def phase_counts(self) -> dict[tuple[str, str], int]:
        """(kind, phase) -> how many resources the caches hold (``llmray_resources``)."""
        bodies = [(key[0], body) for key in self.keys() if (body := self.resource(*key)) is not None]
        return count_phases(bodies, RESOURCES.phases)

    def keys(self) -> list[Key]:
        """Every custom resource the watches know."""
        out: list[Key] = []
        for kind, index in self.resources.items():
            for namespace, name in list(index):
                out.append((kind, namespace, name))
        return out

    @staticmethod
    def _values(index: _Index | None, key: tuple[str, ...]) -> list[Any]:
        if index is None:
            return []
        values = index.get(key)
        return list(values) if values is not None else []

    def pods_of(self, key: Key) -> list[PodView]:
        return self._values(self.pods, key)

    def services_of(self, key: Key) -> dict[str, ChildView]:
        return {v.name: v for v in self._values(self.services, key)}

    def secrets_of(self, key: Key) -> dict[str, ChildView]:
        return {v.name: v for v in self._values(self.secrets, key)}

    def deployments_of_uri(self, namespace: str, uri: str) -> list[str]:
        """Names of the LLMDeployments in ``namespace`` whose ``spec.model.uri`` is ``uri``."""
        return sorted(set(self._values(self.deployments_by_uri, (namespace, uri.rstrip("/")))))

    def resources_in(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        """The latest bodies of every ``kind`` resource in ``namespace``."""
        index = self.resources.get(kind)
        if index is None:
            return []
        names = [name for ns, name in list(index) if ns == namespace]
        return [body for name in names if (body := self.resource(kind, namespace, name)) is not None]

    def deployments_of_job(self, namespace: str, job: str) -> list[str]:
        """Names of the LLMDeployments in ``namespace`` whose model is training job ``job``'s output."""
        return sorted(set(self._values(self.deployments_by_job, (namespace, job))))


@dataclass
class Expectations:
    """Pods this operator created or deleted that the cache may not show yet."""

    ttl: float = 60.0
    _created: dict[Key, dict[str, tuple[float, PodView]]] = field(default_factory=dict)
    _deleted: dict[Key, dict[str, float]] = field(default_factory=dict)

    def created(self, key: Key, pod: PodView) -> None:
        self._created.setdefault(key, {})[pod.name] = (time.monotonic(), pod)

    def deleted(self, key: Key, uid: str) -> None:
        if uid:
            self._deleted.setdefault(key, {})[uid] = time.monotonic()

    def forget(self, key: Key) -> None:
        self._created.pop(key, None)
        self._deleted.pop(key, None)

    def merge(self, key: Key, observed: list[PodView]) -> list[PodView]:
        """``observed`` plus the pods we created, with the ones we deleted marked as deleting."""
        now = time.monotonic()
        names = {p.name for p in observed}
        uids = {p.uid for p in observed}
        created = self._created.get(key, {})
        for name in [n for n, (t, _) in created.items() if n in names or now - t > self.ttl]:
            del created[name]
        deleted = self._deleted.get(key, {})
        for uid in [u for u, t in deleted.items() if u not in uids or now - t > self.ttl]:
            del deleted[uid]
        out: list[PodView] = []
        for pod in observed:
            if pod.uid in deleted:
                if pod.deleting:
                    del deleted[pod.uid]
                else:
                    pod = replace(pod, deleting=True)
            out.append(pod)
        out.extend(view for _, view in created.values())
        return out

    def pending(self, key: Key) -> int:
        """How many of our writes the cache has not shown yet."""
        return len(self._created.get(key, {})) + len(self._deleted.get(key, {}))
