"""Types shared by both resources: resources, scheduling, secrets, storage URIs, conditions.

These models are the single source of truth for the CRD schemas (see :mod:`llmray.api.crd`): field
descriptions become ``kubectl explain`` text, ``Field`` bounds become OpenAPI bounds, and
``x-kubernetes-validations`` entries are CEL rules the API server enforces. The same models
validate the config the workloads receive, so the two halves can never disagree.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

GROUP = "llmray.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Child objects are named <name>-head, <name>-serve, <name>-worker-<group>-<5 chars>: Service names
# must be DNS-1035 labels (<= 63 chars, starting with a letter) and the name is also a label value.
MAX_NAME_LENGTH = 50
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_RULES: list[dict[str, str]] = [
    {
        "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (it prefixes the names of "
        "the Ray pods and Services)",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
        "message": "metadata.name must start with a letter and contain only lowercase letters, digits "
        "and '-' (it names Services, which must be DNS-1035 labels)",
        "reason": "FieldValueInvalid",
    },
]

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
URI_PATTERN = r"^(hf|file|pvc|s3|gs)://.+$"


def _quantity_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=QUANTITY_PATTERN),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]
"""A Kubernetes resource quantity such as ``8``, ``500m`` or ``64Gi``."""

StorageURI = Annotated[str, Field(pattern=URI_PATTERN, max_length=2048)]


class ApiModel(BaseModel):
    """Base for spec models: camelCase on the wire, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it (camelCase, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(ApiModel):
    """Base for status models: tolerant of fields written by newer operators."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


def cel_rule(
    rule: str, message: str, field_path: str | None = None, reason: str = "FieldValueInvalid"
) -> JsonDict:
    """One ``x-kubernetes-validations`` entry: a CEL rule the API server enforces, and its message."""
    out: JsonDict = {"rule": rule, "message": message}
    if field_path is not None:
        out["fieldPath"] = field_path
    return {**out, "reason": reason}


def with_cel_rules(*rules: JsonDict) -> ConfigDict:
    """:class:`ApiModel`'s config plus CEL rules on the object (pydantic validators mirror them)."""
    return ConfigDict(**ApiModel.model_config, json_schema_extra={"x-kubernetes-validations": [*rules]})


class Resources(ApiModel):
    """Compute resources of one Ray pod (or one serving replica)."""

    gpu: int = Field(0, ge=0, le=64, description="NVIDIA GPUs (nvidia.com/gpu) per pod.")
    cpu: Quantity = Field("1", description="CPU cores per pod, as a Kubernetes quantity (e.g. 8, 500m).")
    memory: Quantity = Field("4Gi", description="Memory per pod, as a Kubernetes quantity (e.g. 64Gi).")


class Toleration(ApiModel):
    """A Kubernetes toleration, passed through to the pods unchanged."""

    key: str | None = Field(None, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value to match when operator is Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="How long a NoExecute taint is tolerated before eviction."
    )


Affinity = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "description": "A Kubernetes affinity (nodeAffinity, podAffinity, podAntiAffinity), "
            "passed through to the pods unchanged.",
        }
    ),
]


class PodStorage(ApiModel):
    """Local disk of each Ray pod: size-limited scratch volumes and the pod's ephemeral-storage budget.

    Without limits a large ``hf://`` download or chatty logs fill the node's disk and get other
    tenants' pods evicted; with them only the offending pod is evicted, and the scheduler places
    pods where the requested disk exists.
    """

    tmp: Quantity = Field("4Gi", description="Size limit of the scratch emptyDir (TMPDIR).")
    logs: Quantity = Field(
        "8Gi", description="Size limit of Ray's session directory (/tmp/ray: logs, spilled objects)."
    )
    model_cache: Quantity = Field(
        "40Gi", description="Size limit of the model cache emptyDir (HF_HOME: hf:// downloads)."
    )
    ephemeral_storage_request: Quantity = Field(
        "1Gi", description="ephemeral-storage the pod requests (the scheduler reserves it on the node)."
    )
    ephemeral_storage_limit: Quantity = Field(
        "64Gi",
        description="ephemeral-storage limit of the pod (volumes above plus the container's own writes); "
        "the kubelet evicts a pod that exceeds it.",
    )


# Placement carries a PodTemplate, whose module builds on the base models above.
from .podtemplate import PodTemplate  # noqa: E402


class Placement(ApiModel):
    """Where Ray pods may run (passed through to every pod of the group), their local disk, and
    what the platform adds to them (podTemplate)."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match (Pod nodeSelector)."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="Tolerations added to the pods; GPU pods get nvidia.com/gpu automatically.",
    )
    affinity: Affinity | None = Field(None, description="Pod affinity rules, passed through unchanged.")
    storage: PodStorage = Field(default_factory=PodStorage, description="Local disk limits of each pod.")
    pod_template: PodTemplate | None = Field(
        None,
        description="Additions to these pods only (labels, env, volumes, serviceAccountName, ...), merged "
        "over spec.podTemplate; this role's entries win a clash.",
    )


class HeadSpec(Placement):
    """The Ray head pod. It schedules work and serves the dashboard; it runs no training."""

    resources: Resources = Field(
        default=Resources(cpu="2", memory="8Gi"),
        description="Resources of the head pod (its GPUs are never used).",
    )


class SecretKeyRef(ApiModel):
    """A key in a Secret of the resource's namespace."""

    name: str = Field(..., min_length=1, max_length=253, description="Secret name.")
    key: str = Field("token", min_length=1, max_length=253, description="Key inside the Secret.")


class ObjectStorageSecretRef(ApiModel):
    """A Secret of the resource's namespace holding S3 credentials under the AWS SDK's names."""

    name: str = Field(
        ...,
        min_length=1,
        max_length=253,
        description="Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally "
        "AWS_SESSION_TOKEN), exported under those names to every Ray pod.",
    )


class ObjectStorage(ApiModel):
    """How the Ray pods reach s3:// (and gs://) URIs of this resource.

    Unset: the pods use the default credential chain of the cloud SDK (the pods' ServiceAccount
    through workload identity such as EKS IRSA or GKE Workload Identity, or the node's role).
    """

    secret_ref: ObjectStorageSecretRef | None = Field(
        None, description="S3 credentials; unset: the default AWS credential chain (workload identity)."
    )
    endpoint: str | None = Field(
        None,
        max_length=512,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="S3 endpoint URL of an S3-compatible store (e.g. http://minio.minio.svc:9000); "
        "exported as AWS_ENDPOINT_URL_S3. Unset: AWS S3.",
    )
    region: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[a-z0-9-]+$",
        description="S3 region (exported as AWS_REGION); unset: found from the bucket (AWS) or us-east-1.",
    )


class ConditionStatus(StatusModel):
    """A Kubernetes API convention condition."""

    type: str = Field(..., description="Condition type, e.g. Ready, RayClusterReady, JobRunning.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase machine-readable reason for the last transition.")
    message: str = Field("", description="Human-readable details, including what to do.")
    last_transition_time: datetime | None = Field(None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        None, description="The .metadata.generation this condition was computed from."
    )


class RayClusterStatus(StatusModel):
    """Where the resource's Ray cluster lives."""

    name: str = Field("", description="Ray cluster name (the resource's name).")
    head_service: str = Field("", description="Head Service name.")
    dashboard_url: str = Field("", description="Ray dashboard URL (cluster-internal).")
    head_ready: bool = Field(False, description="Whether the head pod is Ready.")


class PodCounts(StatusModel):
    """Ready versus desired counts (pods or replicas)."""

    ready: int = Field(0, description="How many are ready.")
    desired: int = Field(0, description="How many the operator wants.")


def condition_list_schema() -> dict[str, Any]:
    """Schema extras for a conditions list: a map keyed by type, as the API conventions ask."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


# Fields both resources share, spelled once. Each kind lists them in its own order (the CRD schema
# keeps the order of the model's fields), so they are annotated types rather than a base class.
DEFAULT_IMAGE = "llmray/ray-runtime:0.1.0"
Image = Annotated[str, Field(min_length=1, max_length=512, description="Ray runtime image for every pod.")]
ImagePullPolicy = Annotated[
    Literal["Always", "IfNotPresent", "Never"], Field(description="Image pull policy of every pod.")
]
SharedPodTemplate = Annotated[
    PodTemplate | None,
    Field(
        description="Additions to every Ray pod (labels, annotations, serviceAccountName, "
        "imagePullSecrets, env, envFrom, volumes, volumeMounts, priorityClassName, runtimeClassName, "
        "schedulerName, topologySpreadConstraints); head.podTemplate and workers.podTemplate add to it."
    ),
]
Conditions = Annotated[
    list[ConditionStatus], Field(default_factory=list, json_schema_extra=condition_list_schema())
]
ObservedGeneration = Annotated[int, Field(description="The .metadata.generation last acted on.")]
StatusMessage = Annotated[str, Field(description="What is happening now, or what went wrong and what to do.")]


def replica_bounds(path: str) -> tuple[ConfigDict, Any]:
    """Config and validator of an object with ``minReplicas <= maxReplicas`` (at ``path`` in a spec)."""
    message = f"{path}.minReplicas must be <= {path}.maxReplicas"

    def check(model: Any) -> Any:
        if model.min_replicas > model.max_replicas:
            raise ValueError(message)
        return model

    config = with_cel_rules(cel_rule("self.minReplicas <= self.maxReplicas", message, ".minReplicas"))
    return config, model_validator(mode="after")(check)


def printer_column(name: str, type_: str, json_path: str, **extra: Any) -> dict[str, Any]:
    """A ``kubectl get`` column (``extra``: description, priority)."""
    return {"name": name, "type": type_, "jsonPath": json_path, **extra}


PHASE_COLUMN = printer_column("Phase", "string", ".status.phase")
WORKERS_COLUMN = printer_column("Workers", "integer", ".status.workers.ready", priority=1)
AGE_COLUMN = printer_column("Age", "date", ".metadata.creationTimestamp")


OBJECT_STORE_SCHEMES = ("s3://", "gs://")


def is_object_store(uri: str | None) -> bool:
    """Whether a URI names an object store (``s3://bucket/key`` or ``gs://bucket/key``)."""
    return bool(uri) and str(uri).startswith(OBJECT_STORE_SCHEMES)


_PVC_RE = re.compile(r"^pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)(?P<path>/.*)?$")
PVC_MOUNT_ROOT = "/mnt/pvc"


def pvc_claim(uri: str) -> str | None:
    """The PersistentVolumeClaim a ``pvc://claim/path`` URI names, else None."""
    match = _PVC_RE.match(uri)
    return match.group("claim") if match else None


def local_path(uri: str) -> str | None:
    """Filesystem path a URI resolves to inside a Ray pod (PVCs mount under /mnt/pvc/<claim>).

    ``hf://`` and object-store URIs have no local path and give None.
    """
    if uri.startswith("file://"):
        return uri[len("file://") :]
    match = _PVC_RE.match(uri)
    if match:
        return f"{PVC_MOUNT_ROOT}/{match.group('claim')}{match.group('path') or ''}"
    return None
