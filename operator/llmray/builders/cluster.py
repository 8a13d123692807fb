"""Ray cluster manifests: auth Secret, head Pod + Service, worker Pods, serve Service.

:class:`ClusterSpec` is the one input; :func:`training_cluster` and :func:`deployment_cluster` derive
it from a resource's spec, so both kinds get the same (KubeRay-style) pods:

- ``ray start`` arguments from the container resources (``--num-cpus``, ``--num-gpus``,
  ``--memory``), requests = limits (Ray must not be promised more than the pod has).
- Token auth on every container (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN`` from the Secret).
- Probes on Ray's unauthenticated health endpoints: the dashboard's ``/api/gcs_healthz`` (head)
  and the dashboard agent's ``/api/local_raylet_healthz`` (every node); an LLMDeployment's pods
  use them as startup and liveness probes and are Ready while their Serve proxy is.
- ``/dev/shm`` as a memory emptyDir (Ray's object store lives there).
- The ``restricted`` Pod Security Standard: non-root uid 1000, no privilege escalation, all
  capabilities dropped, RuntimeDefault seccomp, only volume types it allows.
- Pod template overrides (``spec.podTemplate``, ``spec.head/workers.podTemplate``, see
  :mod:`llmray.api.podtemplate`) merged on top: labels, annotations, env, envFrom, volumes and mounts
  added after the operator's own (which win any clash), pod-level fields set.
- Bounded local disk: ephemeral-storage request/limit and size-limited emptyDirs for TMPDIR, Ray's
  session directory (logs) and the model cache, from ``spec.*.storage``.
- A NetworkPolicy: Ray's ports only from the cluster's own pods and the operator, the serve port
  (on the head and the workers alike: every proxy is a serve Service endpoint) from where the
  serve Service is meant to be reached.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from llmray.api.common import (
    PVC_MOUNT_ROOT,
    HeadSpec,
    ObjectStorage,
    Placement,
    PodStorage,
    Resources,
    SecretKeyRef,
    pvc_claim,
)
from llmray.api.deployment import ServiceSpec
from llmray.api.podtemplate import PodTemplate, merge_templates
from llmray.api.runtime import API_KEY_ENV, AUTH_TOKEN_ENV, HF_TOKEN_ENV

from .common import (
    ANNOTATION_TEMPLATE_HASH,
    AUTH_TOKEN_KEY,
    CLIENT_PORT,
    DASHBOARD_AGENT_PORT,
    DASHBOARD_PORT,
    GCS_PORT,
    HEAD_GROUP,
    LABEL_KIND,
    LABEL_RAY_CLUSTER,
    LABEL_RAY_GROUP,
    LABEL_RAY_NODE_TYPE,
    LABEL_WORKER_INDEX,
    METRICS_PORT,
    NODE_TYPE_HEAD,
    NODE_TYPE_WORKER,
    SERVE_PORT,
    Owner,
    auth_secret_name,
    cpu_count,
    head_name,
    memory_bytes,
    metadata,
    network_policy_name,
    serve_service_name,
    stable_hash,
    worker_name,
)

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
RUN_AS_USER = 1000
SHM_VOLUME = "dshm"
TMP_VOLUME, TMP_PATH = "tmp", "/tmp/scratch"
RAY_VOLUME, RAY_PATH = "ray-session", "/tmp/ray"
CACHE_VOLUME, CACHE_PATH = "model-cache", "/home/ray/.cache/huggingface"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
"""Keys of spec.objectStorage.secretRef, exported under the same names (the AWS SDK's)."""
S3_SESSION_TOKEN_KEY = "AWS_SESSION_TOKEN"
"""Optional key of the same Secret (temporary credentials)."""
S3_ENDPOINT_ENV, S3_REGION_ENV = "AWS_ENDPOINT_URL_S3", "AWS_REGION"
ENV_FIELDS = {API_KEY_ENV: "spec.apiKeySecretRef", HF_TOKEN_ENV: "spec.model.secretRef"}
"""The spec field behind each Secret-backed variable of ClusterSpec.env."""
SERVE_HEALTH_PATH = "/-/healthz"
"""Health route of a Serve HTTP proxy: 200 while it takes traffic, 503 while it drains."""


@dataclass(frozen=True)
class PvcMount:
    """A PersistentVolumeClaim every Ray pod mounts at ``/mnt/pvc/<claim>``."""

    claim: str
    read_only: bool = False

    @property
    def volume_name(self) -> str:
        name = f"pvc-{self.claim}"
        return name if len(name) <= 63 else f"pvc-{stable_hash(self.claim)}"

    @property
    def mount_path(self) -> str:
        return f"{PVC_MOUNT_ROOT}/{self.claim}"


@dataclass(frozen=True)
class Assigned:
    """Placement a queue assigned to a pod set (Kueue's ResourceFlavors), added to its pods."""

    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[tuple[tuple[str, str], ...], ...] = ()


@dataclass(frozen=True)
class ClusterSpec:
    """Everything the children of one Ray cluster depend on (derived from a resource's spec)."""

    owner: Owner
    image: str
    image_pull_policy: str
    head: HeadSpec
    worker_resources: Resources
    worker_placement: Placement
    env: tuple[tuple[str, SecretKeyRef], ...] = ()
    """Extra env vars read from user Secrets: (variable, secret key ref)."""
    pvcs: tuple[PvcMount, ...] = ()
    object_storage: ObjectStorage | None = None
    """Credentials (Secret), endpoint and region of s3:// / gs:// URIs, as AWS SDK variables."""
    serve: ServiceSpec | None = None
    """The serve Service (LLMDeployment only)."""
    extra_labels: dict[str, str] = field(default_factory=dict)
    pod_template: PodTemplate | None = None
    """``spec.podTemplate``: additions to every pod (the roles' own templates add to it)."""
    head_assigned: Assigned | None = None
    """What Kueue's admission assigned to the head pod set (None: not queued)."""
    workers_assigned: Assigned | None = None
    """What Kueue's admission assigned to the workers pod set (None: not queued)."""

    def template(self, node_type: str) -> PodTemplate | None:
        """The pod template in force for the head or the workers (shared, then the role's)."""
        role = self.head if node_type == NODE_TYPE_HEAD else self.worker_placement
        return merge_templates(self.pod_template, role.pod_template)

    @property
    def name(self) -> str:
        return self.owner.name

    @property
    def worker_group(self) -> str:
        """Worker group name: ``gpu`` or ``cpu`` (part of worker pod names, label ray.io/group)."""
        return "gpu" if self.worker_resources.gpu > 0 else "cpu"

    @property
    def head_address(self) -> str:
        """GCS address workers join: the head Service's cluster DNS name."""
        return f"{head_name(self.name)}.{self.owner.namespace}.svc.cluster.local:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        """Ray dashboard / REST API (Jobs, Serve, cluster status) URL inside the cluster."""
        return f"http://{head_name(self.name)}.{self.owner.namespace}.svc.cluster.local:{DASHBOARD_PORT}"

    def secret_refs(self) -> list[SecretKeyRef]:
        """User Secrets the pods read (they must exist before the pods are created)."""
        return [ref for _, ref in self.secret_fields()]

    def secret_fields(self) -> list[tuple[str, SecretKeyRef]]:
        """(spec field that names it, Secret key) for every required key the pods read."""
        fields = [(ENV_FIELDS.get(var, "spec.model.secretRef"), ref) for var, ref in self.env]
        storage = self.object_storage
        if storage is not None and storage.secret_ref is not None:
            for key in S3_SECRET_KEYS:
                fields.append(
                    ("spec.objectStorage.secretRef", SecretKeyRef(name=storage.secret_ref.name, key=key))
                )
        return fields


def pvc_mounts(uris: list[tuple[str | None, bool]]) -> tuple[PvcMount, ...]:
    """PVC mounts for the ``pvc://`` URIs among ``(uri, read_only)``; a claim used read-write wins."""
    claims: dict[str, bool] = {}
    for uri, read_only in uris:
        claim = pvc_claim(uri) if uri else None
        if claim:
            claims[claim] = claims.get(claim, True) and read_only
    return tuple(PvcMount(claim, ro) for claim, ro in sorted(claims.items()))


# --- Secret and Services -------------------------------------------------------------------------


def derive_auth_token(key: bytes, owner: Owner) -> str:
    """The Ray auth token of ``owner``'s cluster: HMAC-SHA256(operator key, kind/namespace/name/uid).

    The operator generated it, so it can compute it again at any time (after a restart too) without
    reading the ``<name>-ray-auth`` Secret: it needs only ``create`` on Secrets, never ``get``. A new
    resource of the same name has a new uid, hence a new token.
    """
    message = f"{owner.kind}/{owner.namespace}/{owner.name}/{owner.uid}".encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def auth_fingerprint(token: str) -> str:
    """A short, non-reversible fingerprint of a token (part of the pod template hash)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def auth_secret(cluster: ClusterSpec, token: str) -> dict[str, Any]:
    """The ``<name>-ray-auth`` Secret holding the cluster's Ray auth token (key ``auth_token``)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(cluster.owner, auth_secret_name(cluster.name), "ray-auth"),
        "type": "Opaque",
        "data": {AUTH_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def _with_hash(service: dict[str, Any]) -> dict[str, Any]:
    """Annotate a Service with the hash of its spec, so a changed spec is detected and patched."""
    service["metadata"]["annotations"] = {ANNOTATION_TEMPLATE_HASH: stable_hash(service["spec"])}
    return service


def _head_selector(cluster: ClusterSpec) -> dict[str, str]:
    return {
        LABEL_RAY_CLUSTER: cluster.name,
        LABEL_KIND: cluster.owner.kind,
        LABEL_RAY_NODE_TYPE: NODE_TYPE_HEAD,
    }


def head_service(cluster: ClusterSpec) -> dict[str, Any]:
    """The ``<name>-head`` Service: GCS, dashboard/REST, client, serve and metrics ports.

    Not-ready addresses are published so workers can join the GCS before the head's readiness
    probe (which waits for the dashboard) passes.
    """
    ports = [
        ("gcs", GCS_PORT),
        ("dashboard", DASHBOARD_PORT),
        ("client", CLIENT_PORT),
        ("serve", SERVE_PORT),
        ("metrics", METRICS_PORT),
    ]
    return _with_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(cluster.owner, head_name(cluster.name), "ray-head"),
            "spec": {
                "type": "ClusterIP",
                "selector": _head_selector(cluster),
                "publishNotReadyAddresses": True,
                "ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in ports],
            },
        }
    )


def serve_service(cluster: ClusterSpec) -> dict[str, Any]:
    """The ``<name>-serve`` Service in front of the OpenAI endpoint (LLMDeployment).

    It selects every Ray pod of the cluster; Kubernetes sends traffic only to the Ready ones, and
    a serving pod is Ready while its Serve proxy answers ``/-/healthz`` (Serve runs a proxy on the
    head and on each node that hosts a replica, ``proxy_location: EveryNode``). So traffic is
    spread over the nodes that run replicas and survives the loss of any one proxy, the head's too.
    """
    service = cluster.serve or ServiceSpec()
    port: dict[str, Any] = {
        "name": "serve",
        "port": service.port,
        "targetPort": SERVE_PORT,
        "protocol": "TCP",
    }
    if service.node_port is not None:
        port["nodePort"] = service.node_port
    return _with_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(cluster.owner, serve_service_name(cluster.name), "serve"),
            "spec": {
                "type": service.type,
                "selector": dict(_cluster_pods(cluster)["matchLabels"]),
                "ports": [port],
            },
        }
    )


def _cluster_pods(cluster: ClusterSpec) -> dict[str, Any]:
    return {"matchLabels": {LABEL_RAY_CLUSTER: cluster.name, LABEL_KIND: cluster.owner.kind}}


def operator_peer(namespace: str, labels: str) -> dict[str, Any] | None:
    """The NetworkPolicy peer of the operator's pods: ``namespace`` and ``k=v,k=v`` pod labels.

    None when no namespace is given (an operator outside the cluster is no pod to select).
    """
    if not namespace:
        return None
    pairs = dict(item.split("=", 1) for item in labels.split(",") if "=" in item)
    return {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "podSelector": {"matchLabels": {k.strip(): v.strip() for k, v in pairs.items()}},
    }


def network_policy(
    cluster: ClusterSpec, operator_peer: dict[str, Any] | None, metrics_peer: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``<name>-ray`` NetworkPolicy over every pod of the cluster.

    - any port from the cluster's own pods (Ray nodes talk on many ports: GCS, raylets, object
      managers, workers);
    - the dashboard/REST port (and the serve port) from the operator, ``operator_peer`` (a
      NetworkPolicy peer selecting the operator's pods; None when it runs outside the cluster);
    - Ray's metrics port (8080, ``ray start --metrics-export-port``) from ``metrics_peer`` (the
      monitoring namespace's Prometheus, set with ``--metrics-scraper-namespace``; None: nobody);
    - the serve port (LLMDeployment) from everywhere when the serve Service is a NodePort or
      LoadBalancer, else from ``spec.service.allowFrom`` (default: every pod of the namespace).

    Everything else (6379, 8265, 10001, 8080 from other pods) is denied. Kubelet probes come from
    the node and are not subject to it. Enforcement needs a CNI that implements NetworkPolicy.
    """
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": _cluster_pods(cluster)}]}]
    if operator_peer:
        ingress.append(
            {
                "from": [operator_peer],
                "ports": [{"port": p, "protocol": "TCP"} for p in (DASHBOARD_PORT, SERVE_PORT)],
            }
        )
    if metrics_peer:
        ingress.append({"from": [metrics_peer], "ports": [{"port": METRICS_PORT, "protocol": "TCP"}]})
    if cluster.serve is not None:
        serve_port = [{"port": SERVE_PORT, "protocol": "TCP"}]
        if cluster.serve.type != "ClusterIP":
            ingress.append({"ports": serve_port})  # no "from": reachable from everywhere
        else:
            peers = (
                cluster.serve.allow_from if cluster.serve.allow_from is not None else [{"podSelector": {}}]
            )
            if peers:
                ingress.append({"from": [dict(p) for p in peers], "ports": serve_port})
    return _with_hash(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": metadata(cluster.owner, network_policy_name(cluster.name), "network-policy"),
            "spec": {"podSelector": _cluster_pods(cluster), "policyTypes": ["Ingress"], "ingress": ingress},
        }
    )


def serve_endpoint(cluster: ClusterSpec) -> str:
    """OpenAI base URL of the deployment inside the cluster."""
    port = (cluster.serve or ServiceSpec()).port
    return f"http://{serve_service_name(cluster.name)}.{cluster.owner.namespace}.svc.cluster.local:{port}/v1"


# --- Pods ----------------------------------------------------------------------------------------


def ray_start_args(cluster: ClusterSpec, node_type: str) -> list[str]:
    """``ray start`` command line of a head or worker container.

    The head advertises no CPUs or GPUs: it schedules, runs the job driver and the Serve
    controller/proxy (all 0-CPU), and never a training worker or a model replica.
    """
    common = [
        f"--metrics-export-port={METRICS_PORT}",
        f"--dashboard-agent-listen-port={DASHBOARD_AGENT_PORT}",
        "--disable-usage-stats",
        "--block",
    ]
    if node_type == NODE_TYPE_HEAD:
        return [
            "ray",
            "start",
            "--head",
            f"--port={GCS_PORT}",
            "--dashboard-host=0.0.0.0",
            f"--dashboard-port={DASHBOARD_PORT}",
            f"--ray-client-server-port={CLIENT_PORT}",
            "--num-cpus=0",
            "--num-gpus=0",
            f"--memory={memory_bytes(cluster.head.resources.memory)}",
            *common,
        ]
    res = cluster.worker_resources
    return [
        "ray",
        "start",
        f"--address={cluster.head_address}",
        f"--num-cpus={cpu_count(res.cpu)}",
        f"--num-gpus={res.gpu}",
        f"--memory={memory_bytes(res.memory)}",
        *common,
    ]


def _resources(res: Resources, storage: PodStorage) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, Any] = dict(requests)
    requests["ephemeral-storage"] = storage.ephemeral_storage_request
    limits["ephemeral-storage"] = storage.ephemeral_storage_limit
    if res.gpu > 0:
        requests[GPU_RESOURCE] = str(res.gpu)
        limits[GPU_RESOURCE] = str(res.gpu)
    return {"requests": requests, "limits": limits}


def _env(cluster: ClusterSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {
            "name": AUTH_TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": auth_secret_name(cluster.name), "key": AUTH_TOKEN_KEY}},
        },
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        {"name": "TMPDIR", "value": TMP_PATH},
        {"name": "RAY_TMPDIR", "value": RAY_PATH},
        {"name": "HF_HOME", "value": CACHE_PATH},
        {"name": "LLMRAY_CLUSTER", "value": cluster.name},
        {"name": "LLMRAY_NAMESPACE", "value": cluster.owner.namespace},
    ]
    for var, ref in cluster.env:
        env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env + object_storage_env(cluster.object_storage)


def object_storage_env(storage: ObjectStorage | None) -> list[dict[str, Any]]:
    """AWS SDK variables for spec.objectStorage: keys from the Secret, endpoint and region as values.

    Only named keys are exported (never ``envFrom``: a Secret must not be able to set other
    variables such as the Ray token). Without a Secret the SDK's default chain applies (workload
    identity, e.g. IRSA's AWS_ROLE_ARN + web identity token, or the node's role).
    """
    if storage is None:
        return []
    env: list[dict[str, Any]] = []
    if storage.secret_ref is not None:
        name = storage.secret_ref.name
        for key in S3_SECRET_KEYS:
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})
        env.append(
            {
                "name": S3_SESSION_TOKEN_KEY,
                "valueFrom": {"secretKeyRef": {"name": name, "key": S3_SESSION_TOKEN_KEY, "optional": True}},
            }
        )
        # With the creator's own keys, never fall back to the node's role (instance metadata): an
        # empty or wrong key must fail, not quietly read with the node's identity.
        env.append({"name": "AWS_EC2_METADATA_DISABLED", "value": "true"})
    if storage.endpoint:
        env.append({"name": S3_ENDPOINT_ENV, "value": storage.endpoint})
    if storage.region:
        env.append({"name": S3_REGION_ENV, "value": storage.region})
    return env


def _wire(items: list[Any] | None) -> list[dict[str, Any]]:
    return [item.to_wire() for item in items or []]


def _apply_template(spec: dict[str, Any], template: PodTemplate | None) -> None:
    """Merge a pod template onto a built pod spec; the operator's own entries win any clash.

    The API already refuses reserved names; dropping clashing entries here keeps the operator's
    pod intact even for a spec that skipped validation.
    """
    if template is None:
        return
    container = spec["containers"][0]
    taken_env = {e["name"] for e in container["env"]}
    container["env"] += [e for e in _wire(template.env) if e["name"] not in taken_env]
    if template.env_from:
        container["envFrom"] = _wire(template.env_from)
    taken_volumes = {v["name"] for v in spec["volumes"]}
    spec["volumes"] += [v for v in _wire(template.volumes) if v["name"] not in taken_volumes]
    taken_paths = {m["mountPath"] for m in container["volumeMounts"]}
    container["volumeMounts"] += [
        m for m in _wire(template.volume_mounts) if m["mountPath"] not in taken_paths
    ]
    for key, value in (
        ("serviceAccountName", template.service_account_name),
        ("priorityClassName", template.priority_class_name),
        ("runtimeClassName", template.runtime_class_name),
        ("schedulerName", template.scheduler_name),
    ):
        if value:
            spec[key] = value
    if template.image_pull_secrets:
        spec["imagePullSecrets"] = _wire(template.image_pull_secrets)
    if template.topology_spread_constraints:
        spec["topologySpreadConstraints"] = _wire(template.topology_spread_constraints)


def _probe(path: str, port: int, *, initial: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "initialDelaySeconds": initial,
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _tolerations(placement: Placement, gpu: int) -> list[dict[str, Any]]:
    tolerations = [t.to_wire() for t in placement.tolerations]
    if gpu > 0 and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append(dict(GPU_TOLERATION))
    return tolerations


def _pod_spec(cluster: ClusterSpec, node_type: str) -> dict[str, Any]:
    is_head = node_type == NODE_TYPE_HEAD
    res = cluster.head.resources if is_head else cluster.worker_resources
    placement: Placement = cluster.head if is_head else cluster.worker_placement
    gpu = 0 if is_head else res.gpu
    if is_head:
        # The head never uses GPUs (--num-gpus=0): asking the scheduler for them would waste a GPU.
        res = res.model_copy(update={"gpu": 0})
    ports = [("metrics", METRICS_PORT), ("serve", SERVE_PORT)]
    if is_head:
        ports = [("gcs", GCS_PORT), ("dashboard", DASHBOARD_PORT), ("client", CLIENT_PORT), *ports]
    health_path, health_port = (
        ("/api/gcs_healthz", DASHBOARD_PORT)
        if is_head
        else ("/api/local_raylet_healthz", DASHBOARD_AGENT_PORT)
    )
    probes = {
        "readinessProbe": _probe(health_path, health_port, initial=10, period=5, failures=10),
        "livenessProbe": _probe(health_path, health_port, initial=30, period=10, failures=12),
    }
    if cluster.serve is not None:
        # Serving pods: the Ray node's health gates start-up (the operator waits for it) and
        # liveness; Ready means "this pod's Serve proxy takes traffic", so the serve Service sends
        # requests to every pod whose proxy is up (the head's, and each worker's that hosts a
        # replica) and to none whose proxy is missing, starting or draining.
        probes = {
            "startupProbe": _probe(health_path, health_port, initial=5, period=3, failures=100),
            "readinessProbe": _probe(SERVE_HEALTH_PATH, SERVE_PORT, initial=0, period=2, failures=3),
            "livenessProbe": _probe(health_path, health_port, initial=0, period=10, failures=12),
        }
    storage = placement.storage
    scratch = [
        (TMP_VOLUME, TMP_PATH, storage.tmp),
        (RAY_VOLUME, RAY_PATH, storage.logs),
        (CACHE_VOLUME, CACHE_PATH, storage.model_cache),
    ]
    mounts: list[dict[str, Any]] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": res.memory}}
    ]
    for volume, path, size in scratch:
        mounts.append({"name": volume, "mountPath": path})
        volumes.append({"name": volume, "emptyDir": {"sizeLimit": size}})
    for pvc in cluster.pvcs:
        mounts.append({"name": pvc.volume_name, "mountPath": pvc.mount_path, "readOnly": pvc.read_only})
        volumes.append(
            {
                "name": pvc.volume_name,
                "persistentVolumeClaim": {"claimName": pvc.claim, "readOnly": pvc.read_only},
            }
        )
    container: dict[str, Any] = {
        "name": "ray-head" if is_head else "ray-worker",
        "image": cluster.image,
        "imagePullPolicy": cluster.image_pull_policy,
        "command": ray_start_args(cluster, node_type),
        "env": _env(cluster),
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports],
        "resources": _resources(res, storage),
        **probes,
        "volumeMounts": mounts,
        "securityContext": _container_security(),
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Always",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    assigned = cluster.head_assigned if is_head else cluster.workers_assigned
    selector = {**dict(placement.node_selector or {}), **dict(assigned.node_selector if assigned else ())}
    if selector:
        spec["nodeSelector"] = selector
    tolerations = _tolerations(placement, gpu)
    for toleration in assigned.tolerations if assigned else ():
        if dict(toleration) not in tolerations:
            tolerations.append(dict(toleration))
    if tolerations:
        spec["tolerations"] = tolerations
    if placement.affinity:
        spec["affinity"] = placement.affinity
    _apply_template(spec, cluster.template(node_type))
    return spec


def _template_metadata(cluster: ClusterSpec, node_type: str) -> dict[str, dict[str, str]]:
    """Labels and annotations the pod template adds (empty when none)."""
    template = cluster.template(node_type)
    if template is None:
        return {}
    out = {"labels": dict(template.labels or {}), "annotations": dict(template.annotations or {})}
    return {k: v for k, v in out.items() if v}


def pod_template_hash(cluster: ClusterSpec, node_type: str, auth_secret_uid: str) -> str:
    """Hash of everything a pod of this type is built from.

    A pod whose annotation differs was built from an older spec (image, resources, placement,
    env, volumes) or another auth token (``auth_secret_uid``: the token's fingerprint, see
    :func:`auth_fingerprint`): it must be recreated. Worker count is not part of it, so scaling
    never restarts pods.
    """
    group = HEAD_GROUP if node_type == NODE_TYPE_HEAD else cluster.worker_group
    basis: dict[str, Any] = {"spec": _pod_spec(cluster, node_type), "group": group, "auth": auth_secret_uid}
    extra = _template_metadata(cluster, node_type)
    if extra:  # only when set: pods without a template keep their hash across this upgrade
        basis["metadata"] = extra
    return stable_hash(basis)


def _pod(
    cluster: ClusterSpec, node_type: str, name: str, auth_secret_uid: str, **labels: str
) -> dict[str, Any]:
    meta = metadata(
        cluster.owner,
        name,
        "ray-head" if node_type == NODE_TYPE_HEAD else "ray-worker",
        **{LABEL_RAY_NODE_TYPE: node_type},
        **labels,
        **cluster.extra_labels,
    )
    extra = _template_metadata(cluster, node_type)
    meta["labels"] = {**extra.get("labels", {}), **meta["labels"]}  # the operator's labels win
    meta["annotations"] = {
        **extra.get("annotations", {}),
        ANNOTATION_TEMPLATE_HASH: pod_template_hash(cluster, node_type, auth_secret_uid),
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": _pod_spec(cluster, node_type)}


def head_pod(cluster: ClusterSpec, auth_secret_uid: str) -> dict[str, Any]:
    """The ``<name>-head`` Pod."""
    return _pod(
        cluster, NODE_TYPE_HEAD, head_name(cluster.name), auth_secret_uid, **{LABEL_RAY_GROUP: HEAD_GROUP}
    )


def worker_pod(cluster: ClusterSpec, index: int, auth_secret_uid: str) -> dict[str, Any]:
    """Worker Pod for slot ``index`` (name ``<name>-worker-<group>-<5 chars>``, see worker_name)."""
    group = cluster.worker_group
    return _pod(
        cluster,
        NODE_TYPE_WORKER,
        worker_name(cluster.name, group, cluster.owner.uid, index),
        auth_secret_uid,
        **{LABEL_RAY_GROUP: group, LABEL_WORKER_INDEX: str(index)},
    )


# --- from the resources' specs -------------------------------------------------------------------


def _cluster(
    owner: Owner,
    spec: Any,
    secrets: list[tuple[str, SecretKeyRef | None]],
    pvcs: tuple[PvcMount, ...],
    serve: ServiceSpec | None = None,
) -> ClusterSpec:
    """A cluster from the fields both kinds' specs share (image, head, workers).

    ``secrets``: (env variable, Secret key) pairs; the unset ones are left out.
    """
    return ClusterSpec(
        owner=owner,
        image=spec.image,
        image_pull_policy=spec.image_pull_policy,
        head=spec.head,
        worker_resources=spec.workers.resources,
        worker_placement=spec.workers,
        env=tuple((var, ref) for var, ref in secrets if ref is not None),
        pvcs=pvcs,
        object_storage=spec.object_storage,
        serve=serve,
        pod_template=spec.pod_template,
    )


def training_cluster(owner: Owner, spec: Any) -> ClusterSpec:
    """Cluster of an LLMTrainingJob (``spec``: LLMTrainingJobSpec)."""
    pvcs = pvc_mounts(
        [
            (spec.model.uri, True),
            (spec.dataset.uri, True),
            (spec.output.uri, False),
            (spec.checkpoint_uri(), False),
        ]
    )
    return _cluster(owner, spec, [(HF_TOKEN_ENV, spec.model.secret_ref)], pvcs)


def deployment_cluster(
    owner: Owner, spec: Any, model_uri: str | None, adapter_uris: tuple[str, ...] = ()
) -> ClusterSpec:
    """Cluster of an LLMDeployment (``spec``: LLMDeploymentSpec); ``model_uri``: the resolved model.

    ``adapter_uris``: resolved LoRA adapters; their ``pvc://`` claims are mounted read-only too (an
    adapter on a claim the pods do not mount yet changes the pod template).
    """
    secrets = [(HF_TOKEN_ENV, spec.model.secret_ref), (API_KEY_ENV, spec.api_key_secret_ref)]
    uris = [(model_uri, True), *((uri, True) for uri in adapter_uris)]
    return _cluster(owner, spec, secrets, pvc_mounts(uris), spec.service)
