"""Names, labels, owner references and quantities shared by every builder.

All pure: the same inputs always give the same manifest, which is what makes a reconcile pass
repeatable after an operator restart (children have deterministic names, see :func:`worker_name`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from llmray.api.common import API_VERSION
from llmray.api.deployment import SERVE_PORT as SERVE_PORT  # re-exported: one definition

# --- label and annotation keys (DESIGN.md "Names") ---------------------------------------------
LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_KIND = "llmray.io/kind"
LABEL_RAY_CLUSTER = "ray.io/cluster"
LABEL_RAY_NODE_TYPE = "ray.io/node-type"
LABEL_RAY_GROUP = "ray.io/group"
LABEL_WORKER_INDEX = "llmray.io/worker-index"
APP_NAME = "llmray"
MANAGED_BY = "llmray-operator"
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
"""Server-side label selector of everything the operator creates (its watches use it)."""

ANNOTATION_TEMPLATE_HASH = "llmray.io/template-hash"
"""Hash of the pod spec a pod was built from; a different hash means the pod must be recreated."""

AUTH_TOKEN_KEY = "auth_token"
"""Key of the Ray auth token in Secret ``<name>-ray-auth``."""

HEAD_GROUP = "headgroup"
NODE_TYPE_HEAD = "head"
NODE_TYPE_WORKER = "worker"

# --- ports (DESIGN.md) ---------------------------------------------------------------------------
GCS_PORT = 6379
DASHBOARD_PORT = 8265
CLIENT_PORT = 10001
# SERVE_PORT (8000) comes from llmray.api.deployment: the serve Service port's default.
METRICS_PORT = 8080
DASHBOARD_AGENT_PORT = 52365
"""Dashboard agent's HTTP port: serves /api/local_raylet_healthz, the worker health probe."""

# Kubernetes' own generateName alphabet: no vowels (no accidental words), no look-alikes.
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_SUFFIX_LEN = 5
_SUFFIX_SPACE = len(_SUFFIX_ALPHABET) ** _SUFFIX_LEN  # 27**5 = 3**15


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns a Ray cluster's children."""

    kind: str
    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        """Owner reference that makes Kubernetes' garbage collector delete the child with its owner.

        No ``blockOwnerDeletion``: it would need the ``<plural>/finalizers`` update permission and
        only matters for foreground deletion.
        """
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
        }


def head_name(cluster: str) -> str:
    """Head Pod and head Service name."""
    return f"{cluster}-head"


def serve_service_name(cluster: str) -> str:
    """The LLMDeployment's serve Service name."""
    return f"{cluster}-serve"


def auth_secret_name(cluster: str) -> str:
    """The Ray auth token Secret name."""
    return f"{cluster}-ray-auth"


def network_policy_name(cluster: str) -> str:
    """The Ray cluster's NetworkPolicy name."""
    return f"{cluster}-ray"


def worker_suffix(uid: str, group: str, index: int) -> str:
    """Five random-looking characters for worker slot ``index``, stable for one owner uid.

    An affine map ``a*index + b mod 27**5`` with ``a`` coprime to the modulus is a bijection, so
    two slots of a group never share a name, and the same slot always gets the same name: after
    an operator restart a half-done scale-up re-issues the same creates (409, harmless) instead of
    creating a second set. A new owner (new uid) gets different names, so leftovers of a deleted
    resource of the same name never collide with the new one's pods.
    """
    digest = hashlib.sha256(f"{uid}/{group}".encode()).digest()
    a = int.from_bytes(digest[:8], "big") % _SUFFIX_SPACE
    if a % 3 == 0:  # the modulus is a power of 3: any a not divisible by 3 is invertible
        a += 1
    b = int.from_bytes(digest[8:16], "big") % _SUFFIX_SPACE
    x = (a * index + b) % _SUFFIX_SPACE
    chars = []
    for _ in range(_SUFFIX_LEN):
        x, r = divmod(x, len(_SUFFIX_ALPHABET))
        chars.append(_SUFFIX_ALPHABET[r])
    return "".join(chars)


def worker_name(cluster: str, group: str, uid: str, index: int) -> str:
    """Worker pod name ``<name>-worker-<group>-<5 chars>`` for slot ``index``."""
    return f"{cluster}-worker-{group}-{worker_suffix(uid, group, index)}"


def base_labels(owner: Owner, component: str) -> dict[str, str]:
    """Labels of every child: who made it, for which resource, and which Ray cluster."""
    return {
        LABEL_NAME: APP_NAME,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_INSTANCE: owner.name,
        LABEL_COMPONENT: component,
        LABEL_KIND: owner.kind,
        LABEL_RAY_CLUSTER: owner.name,
    }


def metadata(owner: Owner, name: str, component: str, **extra_labels: str) -> dict[str, Any]:
    """Object metadata of a child: name, namespace, labels and the controller owner reference."""
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**base_labels(owner, component), **extra_labels},
        "ownerReferences": [owner.reference()],
    }


_QUANTITY_MAX = Decimal(2**63 - 1)  # what a Kubernetes int64 quantity value can hold


def quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity ('500m', '64Gi', 8, '1e3') as an exact Decimal; the one parser.

    Parsed by the kubernetes client's ``parse_quantity``; refused (``ValueError`` naming the
    value) when negative, not finite, beyond int64, or containing spaces.
    """
    text = str(value)
    if isinstance(value, bool) or not text or any(c.isspace() for c in text):
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    try:
        number = Decimal(parse_quantity(text))
    except (ValueError, ArithmeticError) as exc:
        raise ValueError(f"not a Kubernetes quantity: {value!r}") from exc
    if not number.is_finite() or number < 0 or number > _QUANTITY_MAX:
        raise ValueError(f"not a Kubernetes quantity: {value!r} (must be finite, >= 0, < 2**63)")
    return number


def cpu_count(value: str | int | float) -> int:
    """Whole CPUs Ray may schedule on a pod: the quantity rounded up (Ray counts CPUs in integers)."""
    return math.ceil(quantity(value))


def memory_bytes(value: str | int | float) -> int:
    """Memory quantity in whole bytes (what ``ray start --memory`` takes), rounded up.

    Kubernetes' ``Quantity.Value()`` rounds a fractional value up (``100m`` bytes is 1 byte), and
    KubeRay passes that to Ray; rounding down here would let the autoscaler pack one byte more
    than the pod gives Ray.
    """
    return math.ceil(quantity(value))


def stable_hash(obj: Any) -> str:
    """Short content hash of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
