"""Leader election on a ``coordination.k8s.io/v1`` Lease (client-go's leaderelection, in asyncio).

Two operator replicas (``replicas: 2``, or the old and new pod of a rolling update) watch the same
resources; only the one holding the Lease reconciles. Why a Lease and not Kopf peering: peering
*pauses* operators of equal priority when it sees another one (both pause; nobody leads), needs
extra CRDs, and is Kopf-specific, whereas a Lease is what kube-controller-manager and every
client-go controller use: ``kubectl get lease`` shows the leader, and platform teams know it.

The decision is a pure function (:func:`decide`) of the Lease as read, when this replica first saw
that exact record (its own monotonic clock: clocks of different machines are never compared),
now, and its identity. The I/O edge (:class:`LeaderElector`) writes only with the read
``resourceVersion``: of two candidates racing for a free Lease, the API server lets exactly one
write succeed (the other gets 409 Conflict and stays standby).

Timing (client-go's defaults): a leader that has not renewed for ``renew_deadline`` stops
reconciling; a standby takes over once the record it saw has not changed for ``lease_duration``.
``renew_deadline < lease_duration`` so the old leader has stopped before anyone else starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client import Gauge

logger = logging.getLogger("llmray.leader")

LEADER = Gauge("llmray_leader", "1 while this operator replica holds the leader Lease and reconciles")


@dataclass(frozen=True)
class LeaseRecord:
    """The parts of a Lease the election reads (``spec`` and ``metadata.resourceVersion``)."""

    holder: str | None
    duration_s: float
    acquire_time: str | None = None
    transitions: int = 0
    resource_version: str | None = None

    @classmethod
    def of(cls, lease: dict[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(
            holder=spec.get("holderIdentity") or None,
            duration_s=float(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=(lease.get("metadata") or {}).get("resourceVersion"),
        )

    @property
    def identity(self) -> tuple[Any, ...]:
        """What must change for the record to count as renewed (the resourceVersion covers it)."""
        return (self.holder, self.resource_version)


Action = Literal["acquire", "renew", "standby"]


@dataclass(frozen=True)
class Decision:
    action: Action
    spec: dict[str, Any] | None = None
    """The Lease spec to write (None for standby)."""


def micro_time(wall: datetime) -> str:
    """A ``MicroTime`` as the API server writes it."""
    return wall.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def decide(
    observed: LeaseRecord | None,
    *,
    observed_at: float,
    now: float,
    wall: datetime,
    identity: str,
    lease_duration: float,
) -> Decision:
    """Acquire, renew or stand by, given the Lease as read (None: there is none).

    ``observed_at`` is when this replica first saw this exact record (holder and resourceVersion)
    on its monotonic clock, ``now`` the same clock now: another holder's Lease counts as expired
    when it has not changed for its ``leaseDurationSeconds`` -- measured locally, so clock skew
    between machines does not matter. ``wall`` only fills the record's timestamps.
    """
    stamp = micro_time(wall)
    spec = {
        "holderIdentity": identity,
        "leaseDurationSeconds": max(1, round(lease_duration)),
        "renewTime": stamp,
    }
    if observed is None:
        return Decision("acquire", {**spec, "acquireTime": stamp, "leaseTransitions": 0})
    if observed.holder == identity:
        return Decision(
            "renew",
            {**spec, "acquireTime": observed.acquire_time or stamp, "leaseTransitions": observed.transitions},
        )
    duration = observed.duration_s if observed.duration_s > 0 else lease_duration
    if observed.holder and now - observed_at < duration:
        return Decision("standby")
    return Decision("acquire", {**spec, "acquireTime": stamp, "leaseTransitions": observed.transitions + 1})


def default_identity(env: Mapping[str, str]) -> str:
    """The pod's name in a cluster (``POD_NAME``), else hostname and process id."""
    return env.get("POD_NAME") or f"{socket.gethostname()}_{os.getpid()}"


@dataclass(frozen=True)
class ElectionConfig:
    name: str
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < --retry-period < --renew-deadline < --lease-duration "
                f"(got {self.retry_period:g}, {self.renew_deadline:g}, {self.lease_duration:g})"
            )


class LeaderElector:
    """The I/O loop around :func:`decide`: reads and writes the Lease every ``retry_period``.

    ``on_started`` / ``on_stopped`` run in the event loop when leadership is gained / lost; a
    leader that cannot renew for ``renew_deadline`` (API unreachable) or sees another holder stops
    at once. Every request has a deadline below ``renew_deadline``.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        config: ElectionConfig,
        *,
        on_started: Callable[[], None],
        on_stopped: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.api = client.CoordinationV1Api(api_client)
        self.on_started, self.on_stopped = on_started, on_stopped
        self.clock = clock
        self.leading = False
        self._seen: tuple[tuple[Any, ...], float] | None = None
        self._renewed = 0.0
        timeout = max(0.5, min(5.0, config.renew_deadline / 2))
        self._request_timeout = (min(2.0, timeout), timeout)
        self._deadline = sum(self._request_timeout) + 0.5
        self._task: asyncio.Task[None] | None = None

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = asyncio.to_thread(fn, *args, _request_timeout=self._request_timeout, **kwargs)
        return await asyncio.wait_for(call, self._deadline)

    async def _read(self) -> LeaseRecord | None:
        c = self.config
        try:
            lease = await self._call(self.api.read_namespaced_lease, c.name, c.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return LeaseRecord.of(self.api.api_client.sanitize_for_serialization(lease))

    async def try_once(self) -> bool:
        """One round: read, decide, write. True when this replica holds the Lease afterwards."""
        c = self.config
        observed = await self._read()
        now = self.clock()
        if observed is not None and (self._seen is None or self._seen[0] != observed.identity):
            self._seen = (observed.identity, now)  # the record changed: its holder is alive
        observed_at = self._seen[1] if self._seen is not None else now
        decision = decide(
            observed,
            observed_at=observed_at,
            now=now,
            wall=datetime.now(UTC),
            identity=c.identity,
            lease_duration=c.lease_duration,
        )
        if decision.action == "standby":
            return False
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": decision.spec}
        try:
            if observed is None:
                body["metadata"] = {"name": c.name, "namespace": c.namespace}
                await self._call(self.api.create_namespaced_lease, c.namespace, body)
            else:
                # Conditional on what was read: of two racing writers exactly one succeeds.
                body["metadata"] = {"name": c.name, "resourceVersion": observed.resource_version}
                await self._call(self.api.replace_namespaced_lease, c.name, c.namespace, body)
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote first (AlreadyExists or Conflict)
                logger.info("leader lease %s/%s: lost a race (%s)", c.namespace, c.name, exc.reason)
                return False
            raise
        if decision.action == "acquire":
            logger.info("leader lease %s/%s acquired by %s", c.namespace, c.name, c.identity)
        return True

    def _set(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        LEADER.set(1 if leading else 0)
        if leading:
            logger.info("became the leader (%s): reconciling", self.config.identity)
            self.on_started()
        else:
            logger.warning("lost leadership (%s): reconciling stopped", self.config.identity)
            self.on_stopped()

    async def step(self) -> None:
        """One round with its consequences for leadership."""
        try:
            held = await self.try_once()
        except Exception as exc:  # API down, timeout, 5xx: keep trying until the renew deadline
            logger.warning("leader lease %s/%s: %s", self.config.namespace, self.config.name, exc)
            held = None
        now = self.clock()
        if held:
            self._renewed = now
            self._set(True)
        elif held is False:
            self._set(False)  # another replica holds it (or won the race)
        elif self.leading and now - self._renewed > self.config.renew_deadline:
            self._set(False)

    async def run(self) -> None:
        while True:
            await self.step()
            # A leader that failed to renew retries at once-ish; jitter spreads the candidates.
            await asyncio.sleep(self.config.retry_period * random.uniform(1.0, 1.2))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="llmray-leader-election")

    async def stop(self) -> None:
        """Stop electing; a leader releases the Lease so a standby takes over without waiting."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.leading:
            self._set(False)
            await self._release()

    async def _release(self) -> None:
        c = self.config
        try:
            observed = await self._read()
            if observed is None or observed.holder != c.identity:
                return
            spec = {
                "holderIdentity": None,
                "leaseDurationSeconds": 1,
                "renewTime": micro_time(datetime.now(UTC)),
            }
            spec["acquireTime"] = observed.acquire_time
            spec["leaseTransitions"] = observed.transitions
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": c.name, "resourceVersion": observed.resource_version},
                "spec": spec,
            }
            await self._call(self.api.replace_namespaced_lease, c.name, c.namespace, body)
            logger.info("leader lease %s/%s released", c.namespace, c.name)
        except Exception as exc:  # the standby takes over after the lease duration anyway
            logger.warning("leader lease %s/%s: release failed: %s", c.namespace, c.name, exc)
