"""Kubernetes I/O for the controllers: a small async facade over the official client.

The official client is synchronous; its calls run in a bounded thread pool so one slow request
never blocks the event loop that Kopf's watches share. Responses are read as raw JSON (no model
deserialisation: cheaper, and the controllers work on plain dicts anyway). Every request is
counted by verb and resource (``llmray_kube_requests_total``), which the scale benchmark reads.

Every request carries ``_request_timeout`` (connect, read): a pool thread blocked on a silent API
server is given back after that long (a thread cannot be cancelled, so without it one hung
connection holds a worker of the pool for ever). urllib3's read timeout is per socket read, so the
awaiting coroutine also has an overall deadline (connect + read + 1 s): the reconcile moves on even
if the connection trickles, and the thread ends at its next socket timeout.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from prometheus_client import Counter as PromCounter
from urllib3.exceptions import HTTPError as Urllib3Error

from llmray.api.common import GROUP, VERSION

KUBE_REQUESTS = PromCounter(
    "llmray_kube_requests", "Kubernetes API requests made by the reconcilers", ["verb", "resource", "code"]
)


class KubeError(Exception):
    """A failed API request, with the HTTP status and the API server's reason and message."""

    def __init__(self, status: int, reason: str, message: str, verb: str, what: str) -> None:
        self.status, self.reason, self.message = status, reason, message
        super().__init__(f"{verb} {what}: {status} {reason}: {message}")

    @property
    def transient(self) -> bool:
        """Worth retrying as is: conflicts, throttling, timeouts, server errors, connection loss."""
        return self.status in (0, 409, 429) or self.status >= 500

    @classmethod
    def of(cls, exc: ApiException, verb: str, what: str) -> KubeError:
        status = int(exc.status or 0)
        reason, message = str(exc.reason or ""), ""
        try:
            body = json.loads(exc.body or "{}")
            reason = str(body.get("reason") or reason)
            message = str(body.get("message") or "")
        except (ValueError, TypeError):
            message = str(exc.body or "")[:500]
        return cls(status, reason, message, verb, what)


class AlreadyExists(KubeError):
    """409 AlreadyExists on create: the object is there (ours after a restart, or someone else's)."""


class NotFound(KubeError):
    """404."""


def _raise(exc: ApiException, verb: str, what: str) -> KubeError:
    err = KubeError.of(exc, verb, what)
    if err.status == 409 and verb == "create" and err.reason == "AlreadyExists":
        return AlreadyExists(err.status, err.reason, err.message, verb, what)
    if err.status == 404:
        return NotFound(err.status, err.reason, err.message, verb, what)
    return err


def load_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """An ApiClient from the in-cluster ServiceAccount, else from kubeconfig (``$KUBECONFIG``)."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    return config.new_client_from_config(config_file=kubeconfig)


def status_patch_body(patch: dict[str, Any], resource_version: str | None) -> dict[str, Any]:
    """The merge-patch body of a status write; with ``resource_version`` it is conditional.

    The API server refuses it with 409 Conflict when the object's resourceVersion moved on.
    """
    body: dict[str, Any] = {"status": patch}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    return body


_CORE_PLURALS = {
    "Pod": "pods",
    "Service": "services",
    "Secret": "secrets",
    "NetworkPolicy": "networkpolicies",
}


@dataclass(frozen=True)
class CustomKind:
    """Where a custom kind of another API group is served."""

    group: str
    version: str
    plural: str
    namespaced: bool = True


RequestTimeout = float | tuple[float, float]
DEFAULT_REQUEST_TIMEOUT: RequestTimeout = (5.0, 30.0)
"""(connect, read) seconds per API request: connecting to a healthy API server takes
milliseconds, and 30 s is twice the API server's own default for a mutating request to time out."""


class Kube:
    """Async Kubernetes API access for the reconcilers (pods, services, secrets, custom resources)."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        max_workers: int = 8,
        request_timeout: RequestTimeout = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        api_client.configuration.connection_pool_maxsize = max(max_workers, 4)
        self.request_timeout = request_timeout
        parts = request_timeout if isinstance(request_timeout, tuple) else (request_timeout,)
        self.deadline_s = sum(parts) + 1.0
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kube")
        self.requests: Counter[tuple[str, str]] = Counter()
        self.custom_kinds: dict[str, CustomKind] = {}
        """Other APIs' custom kinds this client may use (e.g. Kueue's), by kind."""

    def register(self, kind: str, api_version: str, plural: str, namespaced: bool = True) -> None:
        """Let create/read/delete/patch/patch_status handle a custom kind of another API group."""
        group, _, version = api_version.partition("/")
        self.custom_kinds[kind] = CustomKind(group, version, plural, namespaced)

    def _custom(self, kind: str) -> CustomKind | None:
        return self.custom_kinds.get(kind)

    async def _custom_call(
        self, verb: str, kind: str, namespace: str, name: str, method: str, *args: Any, **kw: Any
    ) -> Any:
        ck = self.custom_kinds[kind]
        where = (namespace,) if ck.namespaced else ()
        fn = getattr(self.custom, method if ck.namespaced else method.replace("namespaced_", "cluster_"))
        return await self._call(
            verb, ck.plural, f"{kind} {namespace}/{name}", fn, ck.group, ck.version, *where, ck.plural, *args,
            _preload_content=False, **kw,
        )  # fmt: skip

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.api_client.close()

    async def _call(
        self, verb: str, resource: str, what: str, fn: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any:
        self.requests[(verb, resource)] += 1
        kw.setdefault("_request_timeout", self.request_timeout)
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(
                loop.run_in_executor(self._pool, functools.partial(fn, *args, **kw)), self.deadline_s
            )
        except TimeoutError:
            KUBE_REQUESTS.labels(verb, resource, "0").inc()
            raise KubeError(0, "Timeout", f"no answer within {self.deadline_s:g}s", verb, what) from None
        except ApiException as exc:
            KUBE_REQUESTS.labels(verb, resource, str(exc.status or 0)).inc()
            raise _raise(exc, verb, what) from None
        except (OSError, Urllib3Error) as exc:  # connection refused/reset, DNS: transient by nature
            KUBE_REQUESTS.labels(verb, resource, "0").inc()
            raise KubeError(0, "ConnectionError", str(exc), verb, what) from None
        KUBE_REQUESTS.labels(verb, resource, "ok").inc()
        return result

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        data = json.loads(response.data or b"{}")
        return data if isinstance(data, dict) else {}

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create a Pod, Service, Secret or NetworkPolicy; return it as the API server stored it."""
        kind = obj["kind"]
        ns = obj["metadata"]["namespace"]
        what = f"{kind} {ns}/{obj['metadata']['name']}"
        if self._custom(kind) is not None:
            return self._json(
                await self._custom_call(
                    "create", kind, ns, obj["metadata"]["name"], "create_namespaced_custom_object", obj
                )
            )
        method: Any = {
            "Pod": self.core.create_namespaced_pod,
            "Service": self.core.create_namespaced_service,
            "Secret": self.core.create_namespaced_secret,
            "NetworkPolicy": self.networking.create_namespaced_network_policy,
        }[kind]
        resp = await self._call("create", _CORE_PLURALS[kind], what, method, ns, obj, _preload_content=False)
        return self._json(resp)

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """Read a Pod, Service, Secret, NetworkPolicy or registered custom kind; None when absent."""
        if self._custom(kind) is not None:
            try:
                resp = await self._custom_call(
                    "get", kind, namespace, name, "get_namespaced_custom_object", name
                )
            except NotFound:
                return None
            return self._json(resp)
        method: Any = {
            "Pod": self.core.read_namespaced_pod,
            "Service": self.core.read_namespaced_service,
            "Secret": self.core.read_namespaced_secret,
            "NetworkPolicy": self.networking.read_namespaced_network_policy,
        }[kind]
        try:
            resp = await self._call(
                "get", _CORE_PLURALS[kind], f"{kind} {namespace}/{name}", method, name, namespace,
                _preload_content=False,
            )  # fmt: skip
        except NotFound:
            return None
        return self._json(resp)

    async def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete a Pod, Service, Secret or registered custom kind (only the one with ``uid``, when given).

        Returns False when it was already gone or replaced by another object of that name.
        """
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        if self._custom(kind) is not None:
            try:
                await self._custom_call(
                    "delete", kind, namespace, name, "delete_namespaced_custom_object", name, body=body
                )
            except NotFound:
                return False
            except KubeError as err:
                if err.status == 409:
                    return False
                raise
            return True
        method: Any = {
            "Pod": self.core.delete_namespaced_pod,
            "Service": self.core.delete_namespaced_service,
            "Secret": self.core.delete_namespaced_secret,
        }[kind]
        try:
            await self._call(
                "delete", _CORE_PLURALS[kind], f"{kind} {namespace}/{name}", method, name, namespace,
                body=body, _preload_content=False,
            )  # fmt: skip
        except NotFound:
            return False
        except KubeError as err:
            if err.status == 409:  # uid precondition failed: a newer object took the name
                return False
            raise
        return True

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """JSON-merge-patch a Service, NetworkPolicy or registered custom kind (lists in the patch
        replace the stored ones)."""
        if self._custom(kind) is not None:
            return self._json(
                await self._custom_call(
                    "patch", kind, namespace, name, "patch_namespaced_custom_object", name, patch,
                    _content_type="application/merge-patch+json",
                )
            )  # fmt: skip
        method: Any = {
            "Service": self.core.patch_namespaced_service,
            "NetworkPolicy": self.networking.patch_namespaced_network_policy,
        }[kind]
        resp = await self._call(
            "patch", _CORE_PLURALS[kind], f"{kind} {namespace}/{name}", method, name, namespace, patch,
            _content_type="application/merge-patch+json", _preload_content=False,
        )  # fmt: skip
        return self._json(resp)

    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        """JSON-merge-patch the status subresource of an llmray.io custom resource; return the object.

        With ``resource_version`` the write is conditional (optimistic concurrency): the API server
        answers 409 Conflict when the object changed since, so a status computed from a stale view
        never overwrites a newer one.
        """
        body = status_patch_body(patch, resource_version)
        custom = next((ck for ck in self.custom_kinds.values() if ck.plural == plural), None)
        if custom is not None:
            resp = await self._call(
                "patch", f"{plural}/status", f"{plural} {namespace}/{name} status",
                self.custom.patch_namespaced_custom_object_status,
                custom.group, custom.version, namespace, plural, name, body,
                _content_type="application/merge-patch+json", _preload_content=False,
            )  # fmt: skip
            return self._json(resp)
        resp = await self._call(
            "patch", f"{plural}/status", f"{plural} {namespace}/{name} status",
            self.custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, namespace, plural, name, body,
            _content_type="application/merge-patch+json", _preload_content=False,
        )  # fmt: skip
        return self._json(resp)
