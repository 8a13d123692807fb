"""Pod template overrides: what a platform team adds to the Ray pods the operator builds.

One shared ``spec.podTemplate`` applies to every Ray pod; ``spec.head.podTemplate`` and
``spec.workers.podTemplate`` add to it for one role (KubeRay users set these per group). They are
merged onto the operator's pod, never replace it:

- the operator's own labels, annotations, env vars, volumes and mount paths are *reserved*: a
  template naming one is refused (CEL in the CRD, so ``kubectl apply`` fails naming the field);
- only what the ``restricted`` Pod Security Standard allows can be expressed: volumes of the types
  it allows (configMap, secret, emptyDir, persistentVolumeClaim, projected, downwardAPI, csi,
  ephemeral); no hostPath, host namespaces, privilege, capabilities or security context at all.
  Other fields are unknown: ``kubectl`` (strict field validation) refuses them, and a client that
  skips validation gets them pruned -- a volume whose only source was pruned is then refused;
- what it references is checked against the creator's own rights by the chart's admission policy
  (``charts/llmray/templates/admission.yaml``): every Secret (env, envFrom, volumes,
  imagePullSecrets) and claim needs ``get``, a ServiceAccount other than ``default`` needs the
  right to create pods (or tokens for that ServiceAccount), csi/ephemeral volumes need the right
  to create pods.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, model_validator

from .common import ApiModel, Quantity, cel_rule, with_cel_rules

# --- what the operator owns (builders/cluster.py and builders/common.py set these) ---------------
RESERVED_LABEL_PREFIXES: tuple[str, ...] = ("llmray.io/", "ray.io/")
RESERVED_LABELS: tuple[str, ...] = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
)
RESERVED_ANNOTATION_PREFIXES: tuple[str, ...] = ("llmray.io/",)
RESERVED_ENV: tuple[str, ...] = (
    "RAY_USAGE_STATS_ENABLED",
    "TMPDIR",
    "RAY_TMPDIR",
    "HF_HOME",
    "HF_TOKEN",
    # what loads code or picks the GPUs: a shell's startup file, the search path, the loader's and
    # Python's own settings, and NVIDIA_VISIBLE_DEVICES (=all shows every GPU of the node)
    "PATH",
    "BASH_ENV",
    "ENV",
)
RESERVED_ENV_PREFIXES: tuple[str, ...] = ("LLMRAY_", "RAY_AUTH", "PYTHON", "LD_", "NVIDIA_")
RESERVED_VOLUMES: tuple[str, ...] = ("dshm", "tmp", "ray-session", "model-cache")
RESERVED_VOLUME_PREFIXES: tuple[str, ...] = ("pvc-",)
RESERVED_MOUNT_PATHS: tuple[str, ...] = (
    "/dev/shm",
    "/tmp/scratch",
    "/tmp/ray",
    "/home/ray/.cache/huggingface",
    "/mnt/pvc",
)
SYSTEM_MOUNT_PATHS: tuple[str, ...] = (
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/bin",
    "/sbin",
    "/etc",
    "/opt",
    "/root",
    "/home",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/var/run",
    "/var/lib",
    "/boot",
    "/src",
)
"""Code and system directories (the image's WORKDIRs /src and /home/ray, Python under /usr/local):
a mount at or below one would shadow what the pod runs. ``/`` itself is refused by the pattern."""
CA_MOUNT_PATHS: tuple[str, ...] = ("/etc/ssl/certs", "/usr/local/share/ca-certificates")
"""Where CA bundles go: allowed (at and below) although under :data:`SYSTEM_MOUNT_PATHS`."""
MOUNT_PATH = r"^(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+))+$"
"""An absolute, normalised path: no empty, ``.`` or ``..`` segment, no trailing slash."""
VOLUME_SOURCES: tuple[str, ...] = (
    "configMap",
    "secret",
    "emptyDir",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
    "csi",
    "ephemeral",
)
"""The volume types the ``restricted`` Pod Security Standard allows, and the only ones accepted."""

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
FileMode = Annotated[int, Field(ge=0, le=0o777, description="File mode bits (0-0777, e.g. 0440 as 288).")]


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _starts(var: str, prefixes: tuple[str, ...]) -> str:
    return " || ".join(f"{var}.startsWith('{p}')" for p in prefixes)


def _one_of(fields: tuple[str, ...], what: str) -> tuple[Any, str]:
    """CEL rule and message: exactly one of ``fields`` is set."""
    message = f"set exactly one of {', '.join(fields)} ({what})"
    rule = "[" + ", ".join(f"has(self.{f})" for f in fields) + "].filter(x, x).size() == 1"
    return cel_rule(rule, message), message


def _check_one_of(model: ApiModel, fields: tuple[str, ...], message: str) -> None:
    wire = model.model_dump(by_alias=True, exclude_none=True)
    if sum(1 for f in fields if f in wire) != 1:
        raise ValueError(message)


# --- references ------------------------------------------------------------------------------------


class LocalObjectReference(ApiModel):
    """An object of the resource's namespace, by name."""

    name: ObjectName = Field(..., description="Name of the object.")


class OptionalObjectReference(LocalObjectReference):
    """An object of the resource's namespace whose absence may be tolerated."""

    optional: bool | None = Field(None, description="Start the pod even when the object is missing.")


class KeySelector(ApiModel):
    """One key of a Secret or ConfigMap of the resource's namespace."""

    name: ObjectName = Field(..., description="Name of the Secret or ConfigMap.")
    key: str = Field(..., min_length=1, max_length=253, description="Key inside it.")
    optional: bool | None = Field(None, description="Start the pod even when the key is missing.")


class ObjectFieldSelector(ApiModel):
    """A field of the pod itself (downward API), e.g. metadata.name or status.podIP."""

    field_path: str = Field(..., min_length=1, max_length=256, description="Path of the field.")
    api_version: str | None = Field(None, max_length=64, description="API version of the path (v1).")


class ResourceFieldSelector(ApiModel):
    """A resource request or limit of the Ray container (downward API), e.g. limits.memory."""

    resource: str = Field(..., min_length=1, max_length=128, description="Resource, e.g. limits.cpu.")
    container_name: str | None = Field(None, max_length=63, description="Container (default: the Ray one).")
    divisor: Quantity | None = Field(None, description="Unit the value is expressed in (default 1).")


# --- env ---------------------------------------------------------------------------------------------

_ENV_SOURCES = ("secretKeyRef", "configMapKeyRef", "fieldRef", "resourceFieldRef")
_env_source_rule, _env_source_message = _one_of(_ENV_SOURCES, "env[].valueFrom")


class EnvVarSource(ApiModel):
    """Where an env var's value comes from (exactly one source)."""

    model_config = with_cel_rules(_env_source_rule)

    secret_key_ref: KeySelector | None = Field(None, description="A key of a Secret (needs your get right).")
    config_map_key_ref: KeySelector | None = Field(None, description="A key of a ConfigMap.")
    field_ref: ObjectFieldSelector | None = Field(None, description="A field of the pod.")
    resource_field_ref: ResourceFieldSelector | None = Field(None, description="A resource of the container.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        _check_one_of(self, _ENV_SOURCES, _env_source_message)
        return self


class EnvVar(ApiModel):
    """An environment variable of the Ray container."""

    model_config = with_cel_rules(
        cel_rule(
            "!(has(self.value) && has(self.valueFrom))",
            "env[]: set value or valueFrom, not both",
            ".valueFrom",
            "FieldValueForbidden",
        )
    )

    name: str = Field(..., min_length=1, max_length=128, pattern=ENV_NAME, description="Variable name.")
    value: str | None = Field(None, max_length=32_768, description="Literal value.")
    value_from: EnvVarSource | None = Field(
        None, description="Value read from a Secret, ConfigMap or the pod."
    )

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("env[]: set value or valueFrom, not both")
        return self


_ENV_FROM_SOURCES = ("configMapRef", "secretRef")
_env_from_rule, _env_from_message = _one_of(_ENV_FROM_SOURCES, "envFrom[]")

#: Names an envFrom prefix must not be able to complete (prefix + a key): the code-loading and GPU
#: names and the operator's prefixes. The operator's exact names need no rule: env wins over envFrom.
_ENV_FROM_GUARDED = ("PATH", "BASH_ENV", "ENV")
ENV_FROM_PREFIX_MESSAGE = (
    "podTemplate.envFrom[].prefix: prefix + key could make "
    f"{', '.join(_ENV_FROM_GUARDED)} or a name starting with {', '.join(RESERVED_ENV_PREFIXES)}; "
    "use a prefix of your own such as APP_"
)
_ENV_FROM_PREFIX_RULE = cel_rule(
    "!has(self.prefix) || self.prefix == '' || "
    f"(!{_cel_list(_ENV_FROM_GUARDED + RESERVED_ENV_PREFIXES)}.exists(d, d.startsWith(self.prefix)) "
    f"&& !({_starts('self.prefix', RESERVED_ENV_PREFIXES)}))",
    ENV_FROM_PREFIX_MESSAGE,
)


def env_from_prefix_ok(prefix: str | None) -> bool:
    """Whether keys under ``prefix`` can never become a guarded or reserved env name."""
    if not prefix:
        return True  # without a prefix the creator needs the right to create pods (admission)
    guarded = _ENV_FROM_GUARDED + RESERVED_ENV_PREFIXES
    return not any(d.startswith(prefix) for d in guarded) and not prefix.startswith(RESERVED_ENV_PREFIXES)


class EnvFromSource(ApiModel):
    """Every key of a ConfigMap or Secret as env vars (explicit env vars, the operator's first, win)."""

    model_config = with_cel_rules(_env_from_rule, _ENV_FROM_PREFIX_RULE)

    prefix: str | None = Field(
        None, max_length=128, pattern=ENV_NAME, description="Prefix added to each name."
    )
    config_map_ref: OptionalObjectReference | None = Field(None, description="A ConfigMap.")
    secret_ref: OptionalObjectReference | None = Field(None, description="A Secret (needs your get right).")

    @model_validator(mode="after")
    def _one_source(self) -> EnvFromSource:
        _check_one_of(self, _ENV_FROM_SOURCES, _env_from_message)
        if not env_from_prefix_ok(self.prefix):
            raise ValueError(ENV_FROM_PREFIX_MESSAGE)
        return self


# --- volumes ---------------------------------------------------------------------------------------


class KeyToPath(ApiModel):
    """Project one key to a file path inside the volume."""

    key: str = Field(..., min_length=1, max_length=253, description="Key to project.")
    path: str = Field(
        ..., min_length=1, max_length=1024, pattern=r"^[^/]", description="Relative file path (no leading /)."
    )
    mode: FileMode | None = None


class SecretVolumeSource(ApiModel):
    """A Secret as files (needs your get right on it)."""

    secret_name: ObjectName = Field(..., description="Secret name.")
    items: list[KeyToPath] | None = Field(None, max_length=64, description="Keys to project (default: all).")
    default_mode: FileMode | None = None
    optional: bool | None = Field(None, description="Start the pod even when the Secret is missing.")


class ConfigMapVolumeSource(ApiModel):
    """A ConfigMap as files."""

    name: ObjectName = Field(..., description="ConfigMap name.")
    items: list[KeyToPath] | None = Field(None, max_length=64, description="Keys to project (default: all).")
    default_mode: FileMode | None = None
    optional: bool | None = Field(None, description="Start the pod even when the ConfigMap is missing.")


class EmptyDirVolumeSource(ApiModel):
    """Scratch space that lives as long as the pod."""

    medium: Literal["", "Memory"] | None = Field(None, description="'' (node disk) or Memory (tmpfs).")
    size_limit: Quantity | None = Field(None, description="Size limit (counts against the pod's limits).")


class PersistentVolumeClaimVolumeSource(ApiModel):
    """A PersistentVolumeClaim of the namespace (needs your get right on it)."""

    claim_name: ObjectName = Field(..., description="Claim name.")
    read_only: bool | None = Field(None, description="Mount read-only.")


class DownwardAPIVolumeFile(ApiModel):
    """One file holding a field of the pod or a resource of the container."""

    model_config = with_cel_rules(
        cel_rule(
            "has(self.fieldRef) != has(self.resourceFieldRef)",
            "set exactly one of fieldRef, resourceFieldRef",
        )
    )

    path: str = Field(..., min_length=1, max_length=1024, pattern=r"^[^/]", description="Relative file path.")
    field_ref: ObjectFieldSelector | None = Field(None, description="A field of the pod.")
    resource_field_ref: ResourceFieldSelector | None = Field(None, description="A resource of the container.")
    mode: FileMode | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DownwardAPIVolumeFile:
        if (self.field_ref is None) == (self.resource_field_ref is None):
            raise ValueError("set exactly one of fieldRef, resourceFieldRef")
        return self


class DownwardAPIVolumeSource(ApiModel):
    """Fields of the pod as files."""

    items: list[DownwardAPIVolumeFile] = Field(..., min_length=1, max_length=32, description="Files.")
    default_mode: FileMode | None = None


class SecretProjection(ApiModel):
    """A Secret inside a projected volume (needs your get right on it)."""

    name: ObjectName = Field(..., description="Secret name.")
    items: list[KeyToPath] | None = Field(None, max_length=64, description="Keys to project (default: all).")
    optional: bool | None = Field(None, description="Tolerate a missing Secret.")


class ConfigMapProjection(ApiModel):
    """A ConfigMap inside a projected volume."""

    name: ObjectName = Field(..., description="ConfigMap name.")
    items: list[KeyToPath] | None = Field(None, max_length=64, description="Keys to project (default: all).")
    optional: bool | None = Field(None, description="Tolerate a missing ConfigMap.")


class DownwardAPIProjection(ApiModel):
    """Pod fields inside a projected volume."""

    items: list[DownwardAPIVolumeFile] = Field(..., min_length=1, max_length=32, description="Files.")


class ServiceAccountTokenProjection(ApiModel):
    """A token of the pod's ServiceAccount for an audience (e.g. a cloud's workload identity)."""

    path: str = Field(..., min_length=1, max_length=1024, pattern=r"^[^/]", description="Relative file path.")
    audience: str | None = Field(None, max_length=512, description="Audience the token is meant for.")
    expiration_seconds: int | None = Field(
        None, ge=600, le=2**31 - 1, description="Requested lifetime (at least 600); the kubelet rotates it."
    )


_PROJECTIONS = ("secret", "configMap", "downwardAPI", "serviceAccountToken")
_projection_rule, _projection_message = _one_of(_PROJECTIONS, "projected.sources[]")


class VolumeProjection(ApiModel):
    """One source of a projected volume (exactly one)."""

    model_config = with_cel_rules(_projection_rule)

    secret: SecretProjection | None = Field(None, description="A Secret (needs your get right).")
    config_map: ConfigMapProjection | None = Field(None, description="A ConfigMap.")
    downward_api: DownwardAPIProjection | None = Field(None, alias="downwardAPI", description="Pod fields.")
    service_account_token: ServiceAccountTokenProjection | None = Field(
        None, description="A token of the pod's ServiceAccount."
    )

    @model_validator(mode="after")
    def _one_source(self) -> VolumeProjection:
        _check_one_of(self, _PROJECTIONS, _projection_message)
        return self


class ProjectedVolumeSource(ApiModel):
    """Several Secrets, ConfigMaps, pod fields and tokens in one directory."""

    sources: list[VolumeProjection] = Field(..., min_length=1, max_length=16, description="The sources.")
    default_mode: FileMode | None = None


class CSIVolumeSource(ApiModel):
    """An inline CSI volume (e.g. a secrets-store driver); needs your right to create pods."""

    driver: str = Field(..., min_length=1, max_length=253, description="CSI driver name.")
    read_only: bool | None = Field(None, description="Mount read-only.")
    fs_type: str | None = Field(None, max_length=32, description="Filesystem type, e.g. ext4.")
    volume_attributes: dict[str, str] | None = Field(
        None, max_length=32, description="Driver-specific attributes."
    )
    node_publish_secret_ref: LocalObjectReference | None = Field(
        None, description="Secret passed to the driver (needs your get right)."
    )


ClaimTemplate = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "description": "A PersistentVolumeClaim template (metadata, spec), passed through.",
        }
    ),
]


class EphemeralVolumeSource(ApiModel):
    """A PersistentVolumeClaim created for the pod and deleted with it; needs your right to create pods."""

    volume_claim_template: ClaimTemplate = Field(..., description="The claim to create (metadata, spec).")


_volume_rule, _volume_message = _one_of(
    VOLUME_SOURCES, "volumes[]: the volume types Pod Security 'restricted' allows"
)


class Volume(ApiModel):
    """An extra volume of the Ray pods: one source, of a type Pod Security 'restricted' allows."""

    model_config = with_cel_rules(_volume_rule)

    name: str = Field(..., min_length=1, max_length=63, pattern=DNS_LABEL, description="Volume name.")
    config_map: ConfigMapVolumeSource | None = Field(None, description="A ConfigMap as files.")
    secret: SecretVolumeSource | None = Field(None, description="A Secret as files (needs your get right).")
    empty_dir: EmptyDirVolumeSource | None = Field(None, description="Scratch space.")
    persistent_volume_claim: PersistentVolumeClaimVolumeSource | None = Field(
        None, description="A claim (needs your get right)."
    )
    projected: ProjectedVolumeSource | None = Field(None, description="Several sources in one directory.")
    downward_api: DownwardAPIVolumeSource | None = Field(None, alias="downwardAPI", description="Pod fields.")
    csi: CSIVolumeSource | None = Field(None, description="An inline CSI volume (needs pod-create rights).")
    ephemeral: EphemeralVolumeSource | None = Field(
        None, description="A per-pod claim (needs pod-create rights)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        _check_one_of(self, VOLUME_SOURCES, _volume_message)
        return self


SUB_PATH_MESSAGE = "podTemplate.volumeMounts[].subPath: must not contain '..'"


class VolumeMount(ApiModel):
    """Where a volume of the same podTemplate appears in the Ray container."""

    model_config = with_cel_rules(
        cel_rule(
            "!has(self.subPath) || !self.subPath.contains('..')",
            SUB_PATH_MESSAGE,
            ".subPath",
            "FieldValueForbidden",
        )
    )

    name: str = Field(..., min_length=1, max_length=63, pattern=DNS_LABEL, description="Volume name.")
    mount_path: str = Field(
        ...,
        min_length=2,
        max_length=1024,
        pattern=MOUNT_PATH,
        description="Absolute, normalised path (no ., .. or empty segments, no trailing slash).",
    )
    sub_path: str | None = Field(
        None,
        max_length=1024,
        pattern=r"^[^/]",
        description="Path inside the volume to mount instead of its root (without '..').",
    )
    read_only: bool | None = Field(None, description="Mount read-only.")

    @model_validator(mode="after")
    def _sub_path(self) -> VolumeMount:
        if self.sub_path is not None and ".." in self.sub_path:
            raise ValueError(SUB_PATH_MESSAGE)
        return self


LabelSelector = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "description": "A label selector (matchLabels, matchExpressions), passed through.",
        }
    ),
]


class TopologySpreadConstraint(ApiModel):
    """Spread the pods over a topology domain (Pod topologySpreadConstraints)."""

    max_skew: int = Field(..., ge=1, le=1024, description="Largest allowed difference of pod counts.")
    topology_key: str = Field(..., min_length=1, max_length=316, description="Node label of the domain.")
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"] = Field(
        ..., description="DoNotSchedule or ScheduleAnyway."
    )
    label_selector: LabelSelector | None = Field(None, description="Pods counted (default: none).")
    min_domains: int | None = Field(None, ge=1, le=1024, description="Fewest eligible domains.")
    match_label_keys: list[str] | None = Field(
        None, max_length=16, description="Pod label keys whose values further select the counted pods."
    )
    node_affinity_policy: Literal["Honor", "Ignore"] | None = Field(None, description="Honor or Ignore.")
    node_taints_policy: Literal["Honor", "Ignore"] | None = Field(None, description="Honor or Ignore.")


# --- the template ----------------------------------------------------------------------------------

_LABEL_RULE = (
    f"!has(self.labels) || self.labels.all(k, !({_starts('k', RESERVED_LABEL_PREFIXES)}) "
    f"&& !(k in {_cel_list(RESERVED_LABELS)}))"
)
LABEL_MESSAGE = (
    "podTemplate.labels: keys under llmray.io/ and ray.io/ and the app.kubernetes.io/ labels the "
    "operator sets are reserved"
)
_ANNOTATION_RULE = (
    f"!has(self.annotations) || self.annotations.all(k, !({_starts('k', RESERVED_ANNOTATION_PREFIXES)}))"
)
ANNOTATION_MESSAGE = "podTemplate.annotations: keys under llmray.io/ are reserved"
_ENV_RULE = (
    f"!has(self.env) || self.env.all(e, !(e.name in {_cel_list(RESERVED_ENV)}) "
    f"&& !({_starts('e.name', RESERVED_ENV_PREFIXES)}))"
)
ENV_MESSAGE = (
    f"podTemplate.env: {', '.join(RESERVED_ENV)} and names starting with "
    f"{' or '.join(RESERVED_ENV_PREFIXES)} are set by the operator"
)
_VOLUME_RULE = (
    f"!has(self.volumes) || self.volumes.all(v, !(v.name in {_cel_list(RESERVED_VOLUMES)}) "
    f"&& !({_starts('v.name', RESERVED_VOLUME_PREFIXES)}))"
)
VOLUME_MESSAGE = (
    f"podTemplate.volumes: the names {', '.join(RESERVED_VOLUMES)} and pvc-* are the operator's volumes"
)
_MOUNT_RULE = (
    "!has(self.volumeMounts) || self.volumeMounts.all(m, "
    + " && ".join(f"m.mountPath != '{p}' && !m.mountPath.startsWith('{p}/')" for p in RESERVED_MOUNT_PATHS)
    + ")"
)
MOUNT_MESSAGE = (
    f"podTemplate.volumeMounts: {', '.join(RESERVED_MOUNT_PATHS)} (and below) are the operator's mount paths"
)


def _at_or_below(var: str, path: str) -> str:
    return f"({var} == '{path}' || {var}.startsWith('{path}/'))"


def _is_at_or_below(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


_SYSTEM_MOUNT_RULE = (
    "!has(self.volumeMounts) || self.volumeMounts.all(m, "
    + " || ".join(_at_or_below("m.mountPath", p) for p in CA_MOUNT_PATHS)
    + " || !("
    + " || ".join(_at_or_below("m.mountPath", p) for p in SYSTEM_MOUNT_PATHS)
    + "))"
)
SYSTEM_MOUNT_MESSAGE = (
    f"podTemplate.volumeMounts: {', '.join(SYSTEM_MOUNT_PATHS)} (and below) hold the pod's code and "
    f"system files; only {' and '.join(CA_MOUNT_PATHS)} (and below) may be mounted there"
)
_MOUNT_VOLUME_RULE = (
    "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && "
    "self.volumes.exists(v, v.name == m.name))"
)
MOUNT_VOLUME_MESSAGE = (
    "podTemplate.volumeMounts: each name must be a volume of the same podTemplate's volumes"
)


def _reserved(name: str, exact: tuple[str, ...], prefixes: tuple[str, ...]) -> bool:
    return name in exact or any(name.startswith(p) for p in prefixes)


def _named_list(key: str) -> dict[str, Any]:
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


class PodTemplate(ApiModel):
    """Additions to the Ray pods the operator builds (merged; the operator's own settings are reserved).

    Set ``spec.podTemplate`` for every Ray pod, ``spec.head.podTemplate`` or
    ``spec.workers.podTemplate`` for one role; a role's template adds to the shared one (its
    labels, annotations and same-named env vars, volumes and mounts win; scalars replace).
    """

    model_config = with_cel_rules(
        cel_rule(_LABEL_RULE, LABEL_MESSAGE, ".labels", "FieldValueForbidden"),
        cel_rule(_ANNOTATION_RULE, ANNOTATION_MESSAGE, ".annotations", "FieldValueForbidden"),
        cel_rule(_ENV_RULE, ENV_MESSAGE, ".env", "FieldValueForbidden"),
        cel_rule(_VOLUME_RULE, VOLUME_MESSAGE, ".volumes", "FieldValueForbidden"),
        cel_rule(_MOUNT_RULE, MOUNT_MESSAGE, ".volumeMounts", "FieldValueForbidden"),
        cel_rule(_SYSTEM_MOUNT_RULE, SYSTEM_MOUNT_MESSAGE, ".volumeMounts", "FieldValueForbidden"),
        cel_rule(_MOUNT_VOLUME_RULE, MOUNT_VOLUME_MESSAGE, ".volumeMounts"),
    )

    labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=32, description="Labels added to the pods (reserved: llmray.io/*, ray.io/*)."
    )
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(
        None, max_length=32, description="Annotations added to the pods (reserved: llmray.io/*)."
    )
    service_account_name: ObjectName | None = Field(
        None,
        description="ServiceAccount the pods run as, e.g. for a cloud's workload identity (its token is "
        "not mounted unless a projected serviceAccountToken volume asks for it). Other than default it "
        "needs your right to create pods or tokens for it.",
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        None,
        max_length=8,
        json_schema_extra=_named_list("name"),
        description="Secrets with registry credentials for the image (needs your get right on each).",
    )
    env: list[EnvVar] | None = Field(
        None,
        max_length=64,
        json_schema_extra=_named_list("name"),
        description="Env vars added to the Ray container (the operator's own names are reserved).",
    )
    env_from: list[EnvFromSource] | None = Field(
        None, max_length=16, description="ConfigMaps and Secrets whose keys become env vars."
    )
    volumes: list[Volume] | None = Field(
        None,
        max_length=32,
        json_schema_extra=_named_list("name"),
        description="Extra volumes (types Pod Security 'restricted' allows); mount them with volumeMounts.",
    )
    volume_mounts: list[VolumeMount] | None = Field(
        None,
        max_length=32,
        json_schema_extra=_named_list("mountPath"),
        description="Where this template's volumes appear in the Ray container.",
    )
    priority_class_name: str | None = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN, description="PriorityClass of the pods."
    )
    runtime_class_name: str | None = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN, description="RuntimeClass of the pods (e.g. nvidia)."
    )
    scheduler_name: str | None = Field(
        None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Scheduler of the pods (default: default-scheduler).",
    )
    topology_spread_constraints: list[TopologySpreadConstraint] | None = Field(
        None, max_length=8, description="How the pods spread over zones or nodes."
    )

    @model_validator(mode="after")
    def _reserved_and_references(self) -> PodTemplate:
        """Mirror the CEL rules, so the operator and standalone configs refuse the same things."""
        if any(_reserved(k, RESERVED_LABELS, RESERVED_LABEL_PREFIXES) for k in self.labels or {}):
            raise ValueError(LABEL_MESSAGE)
        if any(_reserved(k, (), RESERVED_ANNOTATION_PREFIXES) for k in self.annotations or {}):
            raise ValueError(ANNOTATION_MESSAGE)
        if any(_reserved(e.name, RESERVED_ENV, RESERVED_ENV_PREFIXES) for e in self.env or []):
            raise ValueError(ENV_MESSAGE)
        if any(_reserved(v.name, RESERVED_VOLUMES, RESERVED_VOLUME_PREFIXES) for v in self.volumes or []):
            raise ValueError(VOLUME_MESSAGE)
        for mount in self.volume_mounts or []:
            if _is_at_or_below(mount.mount_path, RESERVED_MOUNT_PATHS):
                raise ValueError(MOUNT_MESSAGE)
            path = mount.mount_path
            if _is_at_or_below(path, SYSTEM_MOUNT_PATHS) and not _is_at_or_below(path, CA_MOUNT_PATHS):
                raise ValueError(SYSTEM_MOUNT_MESSAGE)
        names = [v.name for v in self.volumes or []]
        if any(m.name not in names for m in self.volume_mounts or []):
            raise ValueError(MOUNT_VOLUME_MESSAGE)
        for what, keys in (
            ("env", [e.name for e in self.env or []]),
            ("volumes", names),
            ("volumeMounts", [m.mount_path for m in self.volume_mounts or []]),
            ("imagePullSecrets", [s.name for s in self.image_pull_secrets or []]),
        ):
            if len(keys) != len(set(keys)):
                raise ValueError(f"podTemplate.{what}: duplicate entries")
        return self


def _by_key(shared: list[Any] | None, role: list[Any] | None, key: str) -> list[Any] | None:
    """Shared entries, each replaced by the role's entry of the same key, then the role's new ones."""
    if not shared and not role:
        return None
    mine = {getattr(item, key): item for item in role or []}
    out = [mine.pop(getattr(item, key), item) for item in shared or []]
    return out + list(mine.values())


def merge_templates(shared: PodTemplate | None, role: PodTemplate | None) -> PodTemplate | None:
    """The template in force for one role: ``role`` added to ``shared`` (the role wins a clash).

    Built without validation: both inputs are valid, and the union may exceed a list's max_length
    (5 + 5 imagePullSecrets of at most 8), which must not fail every reconcile.
    """
    if shared is None or role is None:
        return role or shared
    return PodTemplate.model_construct(
        labels={**(shared.labels or {}), **(role.labels or {})} or None,
        annotations={**(shared.annotations or {}), **(role.annotations or {})} or None,
        service_account_name=role.service_account_name or shared.service_account_name,
        image_pull_secrets=_by_key(shared.image_pull_secrets, role.image_pull_secrets, "name"),
        env=_by_key(shared.env, role.env, "name"),
        env_from=[*(shared.env_from or []), *(role.env_from or [])] or None,
        volumes=_by_key(shared.volumes, role.volumes, "name"),
        volume_mounts=_by_key(shared.volume_mounts, role.volume_mounts, "mount_path"),
        priority_class_name=role.priority_class_name or shared.priority_class_name,
        runtime_class_name=role.runtime_class_name or shared.runtime_class_name,
        scheduler_name=role.scheduler_name or shared.scheduler_name,
        topology_spread_constraints=[
            *(shared.topology_spread_constraints or []),
            *(role.topology_spread_constraints or []),
        ]
        or None,
    )
