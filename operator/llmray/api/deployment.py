"""``LLMDeployment``: serve a model behind an OpenAI-compatible API on Ray Serve, autoscaled."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, WithJsonSchema, model_validator

from .common import (
    AGE_COLUMN,
    DEFAULT_IMAGE,
    PHASE_COLUMN,
    WORKERS_COLUMN,
    ApiModel,
    Conditions,
    HeadSpec,
    Image,
    ImagePullPolicy,
    ObjectStorage,
    ObservedGeneration,
    Placement,
    PodCounts,
    RayClusterStatus,
    Resources,
    SecretKeyRef,
    SharedPodTemplate,
    StatusMessage,
    StatusModel,
    StorageURI,
    cel_rule,
    printer_column,
    replica_bounds,
    with_cel_rules,
)

KIND = "LLMDeployment"
PLURAL = "llmdeployments"
SHORT_NAME = "llmd"
DESCRIPTION = (
    "LLMDeployment serves a language model behind an OpenAI-compatible API on Ray Serve, "
    "autoscaling replicas on load and GPU worker pods on pending demand."
)
SERVE_PORT = 8000

Phase = Literal["Pending", "Deploying", "Ready", "Degraded", "Failed"]


class ServedModel(ApiModel):
    """Which model to serve: a URI, or the output of an LLMTrainingJob."""

    model_config = with_cel_rules(
        cel_rule(
            "has(self.uri) != has(self.fromTrainingJob)",
            "set exactly one of spec.model.uri and spec.model.fromTrainingJob",
        )
    )

    uri: StorageURI | None = Field(
        None,
        description="hf://org/name, file:///path, pvc://claim/path, s3://bucket/prefix or "
        "gs://bucket/prefix. Exclusive with fromTrainingJob.",
    )
    from_training_job: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="Name of an LLMTrainingJob in this namespace; served once it has Succeeded.",
    )
    name: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description="Model name clients send in requests (default: the resource name).",
    )
    secret_ref: SecretKeyRef | None = Field(
        None, description="Secret with a hub token (HF_TOKEN) for gated models."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ServedModel:
        if (self.uri is None) == (self.from_training_job is None):
            raise ValueError("set exactly one of spec.model.uri and spec.model.fromTrainingJob")
        return self


ADAPTER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$"
MAX_ADAPTERS = 16


class Adapter(ApiModel):
    """A LoRA adapter served on the deployment's base model, as its own model id."""

    model_config = with_cel_rules(
        cel_rule(
            "has(self.uri) != has(self.fromTrainingJob)",
            "set exactly one of spec.adapters[].uri and spec.adapters[].fromTrainingJob",
        )
    )

    name: str = Field(
        ...,
        min_length=1,
        max_length=63,
        pattern=ADAPTER_NAME_PATTERN,
        description="Model id clients send for this adapter (lowercase letters, digits, '-', '.', '_'; "
        "unique; not the base model's served name).",
    )
    uri: StorageURI | None = Field(
        None,
        description="Adapter folder (adapter_config.json + weights): hf://org/name, file:///path, "
        "pvc://claim/path (s3:// or gs:// for engine vllm). Exclusive with fromTrainingJob.",
    )
    from_training_job: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="Name of a LoRA LLMTrainingJob (method lora, mergeOnExport false) in this namespace; "
        "served once it has Succeeded.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Adapter:
        if (self.uri is None) == (self.from_training_job is None):
            raise ValueError("set exactly one of spec.adapters[].uri and spec.adapters[].fromTrainingJob")
        return self


class VllmExtra(ApiModel):
    """Further vLLM engine arguments: an allowlist of tuning knobs, in vLLM's own snake_case names.

    Anything else is an unknown field: refused by the API server (``kubectl`` asks for strict field
    validation) or pruned, so it never reaches vLLM. Arguments that load code or files
    (``trust_remote_code``, ``worker_cls``, ``worker_extension_cls``, ``load_format``,
    ``download_dir``, ``hf_overrides``, ``tokenizer``, speculative or LoRA models) are left out on
    purpose: a Ray pod would run them with the pod's identity.
    """

    model_config = ConfigDict(extra="forbid", alias_generator=None, populate_by_name=True)

    block_size: int | None = Field(None, ge=1, le=1024, description="KV cache block size in tokens.")
    cpu_offload_gb: float | None = Field(
        None, ge=0, le=4096, description="CPU memory per GPU for offloaded weights."
    )
    disable_log_stats: bool | None = Field(None, description="Turn off vLLM's periodic stats logging.")
    enable_chunked_prefill: bool | None = Field(None, description="Split long prefills into chunks.")
    enable_prefix_caching: bool | None = Field(
        None, description="Reuse the KV cache of shared prompt prefixes."
    )
    enforce_eager: bool | None = Field(None, description="No CUDA graphs (less memory, slower).")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] | None = Field(
        None, description="KV cache data type."
    )
    max_logprobs: int | None = Field(None, ge=0, le=1024, description="Most logprobs a request may ask for.")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, le=10_000_000, description="Tokens processed per engine step."
    )
    max_seq_len_to_capture: int | None = Field(
        None, ge=1, le=1_048_576, description="Longest sequence covered by CUDA graphs."
    )
    pipeline_parallel_size: int | None = Field(None, ge=1, le=64, description="Pipeline-parallel stages.")
    quantization: str | None = Field(
        None, pattern=r"^[a-z0-9_-]{1,32}$", description="Quantization method of the weights (e.g. awq, fp8)."
    )
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Random seed.")
    swap_space: float | None = Field(None, ge=0, le=1024, description="CPU swap space per GPU, GiB.")
    tokenizer_mode: Literal["auto", "slow", "mistral"] | None = Field(None, description="Tokenizer mode.")

    def kwargs(self) -> dict[str, Any]:
        """The set arguments, as vLLM engine keyword arguments."""
        return self.model_dump(exclude_none=True)


ENGINE_EXTRA_ALLOWED: tuple[str, ...] = tuple(VllmExtra.model_fields)


class EngineArgs(ApiModel):
    """Engine settings. vLLM uses them all; transformers uses dtype, maxModelLen and batching."""

    max_model_len: int | None = Field(
        None, ge=16, le=1_048_576, description="Context length limit in tokens."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="GPUs one replica shards the model over (vLLM)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; auto picks bfloat16 on GPUs that support it, float32 on CPU."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="Fraction of GPU memory vLLM may use."
    )
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Sequences batched together per replica.")
    batch_wait_timeout_ms: int = Field(
        10, ge=0, le=10_000, description="How long the transformers engine waits to fill a batch."
    )
    max_loras: int = Field(
        4,
        ge=1,
        le=MAX_ADAPTERS,
        description="Adapters one batch may mix (vLLM max_loras; the transformers engine keeps every "
        "adapter of spec.adapters loaded and mixes any of them).",
    )
    max_lora_rank: int = Field(
        16, ge=1, le=512, description="Largest LoRA rank an adapter may have (larger ones fail to load)."
    )
    extra: VllmExtra = Field(
        default_factory=VllmExtra,
        description="Further vLLM engine arguments (an allowlist; other names are unknown fields).",
    )


class Autoscaling(ApiModel):
    """Ray Serve replica autoscaling."""

    model_config, _bounds = replica_bounds("spec.autoscaling")

    min_replicas: int = Field(1, ge=0, le=1024, description="Fewest Serve replicas (0 scales to zero).")
    max_replicas: int = Field(1, ge=1, le=1024, description="Most Serve replicas.")
    target_ongoing_requests: float = Field(
        4.0, gt=0.0, le=10_000.0, description="In-flight requests per replica the autoscaler aims for."
    )
    upscale_delay_seconds: float = Field(
        10.0, ge=0.0, le=3600.0, description="Load must persist this long to add replicas."
    )
    downscale_delay_seconds: float = Field(
        60.0, ge=0.0, le=86_400.0, description="Load must stay low this long to remove replicas."
    )


class RequestLimits(ApiModel):
    """Protection against oversized or too many requests."""

    max_prompt_tokens: int = Field(
        4096, ge=1, le=1_048_576, description="Longest prompt accepted, in tokens."
    )
    max_tokens: int = Field(1024, ge=1, le=1_048_576, description="Largest max_tokens a request may ask for.")
    max_ongoing_requests: int = Field(
        32, ge=1, le=100_000, description="Requests one replica works on at once; more are queued by Serve."
    )
    max_queued_requests: int = Field(
        64,
        ge=0,
        le=1_000_000,
        description="Requests waiting for a replica; beyond it clients get 503 with Retry-After.",
    )


class WorkerPool(Placement):
    """Ray worker pods, added on pending demand and removed when idle (like Ray's autoscaler)."""

    model_config, _bounds = replica_bounds("spec.workers")

    min_replicas: int = Field(0, ge=0, le=1024, description="Worker pods kept even when idle.")
    max_replicas: int = Field(4, ge=0, le=1024, description="Most worker pods.")
    resources: Resources = Field(
        default=Resources(gpu=1, cpu="8", memory="32Gi"), description="Resources of each worker pod."
    )
    idle_timeout_seconds: int = Field(
        60, ge=0, le=86_400, description="Idle time before a worker is removed."
    )


NetworkPeer = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "description": "A NetworkPolicy peer (podSelector, namespaceSelector, ipBlock), passed through.",
        }
    ),
]


class ServiceSpec(ApiModel):
    """The ``<name>-serve`` Service in front of the OpenAI endpoint."""

    model_config = with_cel_rules(
        cel_rule(
            "!has(self.nodePort) || self.type != 'ClusterIP'",
            "spec.service.nodePort needs spec.service.type NodePort or LoadBalancer",
            ".nodePort",
            "FieldValueForbidden",
        ),
        cel_rule(
            "!has(self.allowFrom) || self.type == 'ClusterIP'",
            "spec.service.allowFrom applies to a ClusterIP Service only (a NodePort or "
            "LoadBalancer Service is reached from outside the cluster)",
            ".allowFrom",
            "FieldValueForbidden",
        ),
    )

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: int = Field(SERVE_PORT, ge=1, le=65535, description="Service port.")
    node_port: int | None = Field(
        None,
        ge=30000,
        le=32767,
        description="Fixed node port (type NodePort or LoadBalancer), e.g. to match a kind port mapping; "
        "default: one is allocated.",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="Serve a NodePort or LoadBalancer Service without spec.apiKeySecretRef (an open "
        "endpoint that spends your GPUs for anyone who reaches it); false refuses that.",
    )
    allow_from: list[NetworkPeer] | None = Field(
        None,
        max_length=16,
        description="NetworkPolicy peers that may reach the serve port of a ClusterIP Service "
        "(default: every pod of this namespace). NodePort and LoadBalancer Services are open to all.",
    )

    @model_validator(mode="after")
    def _node_port(self) -> ServiceSpec:
        if self.node_port is not None and self.type == "ClusterIP":
            raise ValueError("spec.service.nodePort needs spec.service.type NodePort or LoadBalancer")
        if self.allow_from is not None and self.type != "ClusterIP":
            raise ValueError("spec.service.allowFrom applies to a ClusterIP Service only")
        return self


class LLMDeploymentSpec(ApiModel):
    """Serve a model behind an OpenAI-compatible HTTP API on Ray Serve."""

    model_config = with_cel_rules(
        cel_rule(
            "self.engine != 'vllm' || self.resourcesPerReplica.gpu >= self.engineArgs.tensorParallelSize",
            "engine vllm needs spec.resourcesPerReplica.gpu >= spec.engineArgs.tensorParallelSize",
            ".resourcesPerReplica.gpu",
        ),
        cel_rule(
            "self.resourcesPerReplica.gpu <= self.workers.resources.gpu",
            "a replica must fit on one worker pod: spec.resourcesPerReplica.gpu must be "
            "<= spec.workers.resources.gpu",
            ".resourcesPerReplica.gpu",
        ),
        cel_rule(
            "self.service.type == 'ClusterIP' || has(self.apiKeySecretRef) || "
            "self.service.allowUnauthenticated",
            "spec.service.type NodePort or LoadBalancer exposes the endpoint outside the "
            "cluster: set spec.apiKeySecretRef, or spec.service.allowUnauthenticated: true to serve "
            "it without a key",
            ".service.type",
            "FieldValueForbidden",
        ),
        cel_rule(
            "self.autoscaling.minReplicas == 0 || self.workers.maxReplicas >= 1",
            "replicas run on worker pods: spec.workers.maxReplicas must be >= 1 when "
            "spec.autoscaling.minReplicas > 0",
            ".workers.maxReplicas",
        ),
        cel_rule(
            "!has(self.adapters) || !has(self.model.name) || self.adapters.all(a, a.name != self.model.name)",
            "spec.adapters[].name must differ from spec.model.name (each is a model id of its own)",
            ".adapters",
        ),
    )

    model: ServedModel = Field(..., description="The model to serve.")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="transformers: CPU or GPU, dynamic batching; vllm: GPU, via Ray Serve LLM.",
    )
    adapters: list[Adapter] = Field(
        default_factory=list,
        max_length=MAX_ADAPTERS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="LoRA adapters served on the base model, each a model id of its own; adding or "
        "removing one does not restart replicas (transformers engine).",
    )
    engine_args: EngineArgs = Field(default_factory=EngineArgs, description="Engine settings.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replica autoscaling.")
    resources_per_replica: Resources = Field(
        default=Resources(cpu="1", memory="4Gi"),
        description="What one Serve replica requests from Ray (gpu, cpu, memory).",
    )
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Request limits.")
    workers: WorkerPool = Field(default_factory=WorkerPool, description="Ray worker pods.")
    head: HeadSpec = Field(
        default_factory=HeadSpec, description="The Ray head pod (also runs the HTTP proxy)."
    )
    image: Image = DEFAULT_IMAGE
    image_pull_policy: ImagePullPolicy = "IfNotPresent"
    pod_template: SharedPodTemplate = None
    api_key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret with the API key clients must send as 'Authorization: Bearer <key>'."
    )
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="The serve Service.")
    object_storage: ObjectStorage | None = Field(
        None,
        description="Credentials, endpoint and region for an s3:// or gs:// model (also one resolved "
        "from spec.model.fromTrainingJob: credentials are never taken from the training job).",
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> LLMDeploymentSpec:
        if self.engine == "vllm" and self.resources_per_replica.gpu < self.engine_args.tensor_parallel_size:
            raise ValueError(
                "engine vllm needs spec.resourcesPerReplica.gpu >= spec.engineArgs.tensorParallelSize"
            )
        if self.resources_per_replica.gpu > self.workers.resources.gpu:
            raise ValueError(
                "a replica must fit on one worker pod: spec.resourcesPerReplica.gpu must be "
                "<= spec.workers.resources.gpu"
            )
        if (
            self.service.type != "ClusterIP"
            and self.api_key_secret_ref is None
            and not self.service.allow_unauthenticated
        ):
            raise ValueError(
                "spec.service.type NodePort or LoadBalancer exposes the endpoint outside the cluster: set "
                "spec.apiKeySecretRef, or spec.service.allowUnauthenticated: true to serve it without a key"
            )
        if self.autoscaling.min_replicas > 0 and self.workers.max_replicas < 1:
            raise ValueError(
                "replicas run on worker pods: spec.workers.maxReplicas must be >= 1 when "
                "spec.autoscaling.minReplicas > 0"
            )
        names = [a.name for a in self.adapters]
        duplicate = sorted({n for n in names if names.count(n) > 1})
        if duplicate:
            raise ValueError(f"spec.adapters[].name must be unique: {', '.join(duplicate)} repeated")
        if self.model.name is not None and self.model.name in names:
            raise ValueError(
                "spec.adapters[].name must differ from spec.model.name (each is a model id of its own)"
            )
        return self


def adapter_name_rules() -> list[dict[str, str]]:
    """Root-level CEL: an adapter may not take the base's default served name (the resource name)."""
    return [
        {
            "rule": "!has(self.spec.adapters) || has(self.spec.model.name) || "
            "self.spec.adapters.all(a, a.name != self.metadata.name)",
            "message": "spec.adapters[].name must differ from the base model's served name (spec.model.name, "
            "default: metadata.name)",
            "fieldPath": ".spec.adapters",
            "reason": "FieldValueInvalid",
        }
    ]


ROOT_RULES = adapter_name_rules()

AdapterState = Literal["Pending", "Loading", "Ready", "Failed"]


class AdapterStatus(StatusModel):
    """One adapter of spec.adapters as served."""

    name: str = Field(..., description="Model id of the adapter.")
    uri: str = Field("", description="Resolved adapter location.")
    state: AdapterState = Field(
        "Pending",
        description="Pending (waiting for its training job), Loading (sent to the replicas), Ready "
        "(the replicas serve it) or Failed (see message).",
    )
    message: str = Field("", description="What is happening, or what went wrong and what to do.")


class ServedModelStatus(StatusModel):
    """What is being served."""

    uri: str = Field("", description="Resolved model location.")
    name: str = Field("", description="Model name clients use.")
    version: str = Field(
        "",
        description="Version of the model the replicas serve (a training job's export version); a "
        "retrain into the same URI rolls out a new version with no failed requests.",
    )
    pending_version: str = Field(
        "", description="Version being rolled out (old replicas keep serving until it is ready)."
    )


class ServingStatus(StatusModel):
    """Live serving figures, polled from the Serve application (all replicas, last minute)."""

    requests_per_second: float = Field(0.0, description="Requests completed per second.")
    ttft_p50_ms: int | None = Field(None, description="Median time to first token, in milliseconds.")
    running: int = Field(0, description="Sequences being generated now.")
    waiting: int = Field(0, description="Requests waiting for a replica.")


class LLMDeploymentStatus(StatusModel):
    """Observed state of an LLMDeployment."""

    phase: Phase = Field("Pending", description="Pending, Deploying, Ready, Degraded or Failed.")
    conditions: Conditions = Field(description="Conditions per Kubernetes API conventions.")
    observed_generation: ObservedGeneration = 0
    replicas: PodCounts = Field(default_factory=PodCounts, description="Serve replicas ready / desired.")
    workers: PodCounts = Field(default_factory=PodCounts, description="Ray worker pods ready / desired.")
    endpoint: str = Field("", description="OpenAI base URL inside the cluster.")
    model: ServedModelStatus = Field(default_factory=ServedModelStatus, description="The served model.")
    serving: ServingStatus | None = Field(
        None, description="Live serving figures (absent when the serving engine reports none)."
    )
    adapters: list[AdapterStatus] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="LoRA adapters and their state.",
    )
    ray_cluster: RayClusterStatus = Field(default_factory=RayClusterStatus, description="The Ray cluster.")
    message: StatusMessage = ""


PRINTER_COLUMNS: list[dict[str, Any]] = [
    PHASE_COLUMN,
    printer_column("Ready", "integer", ".status.replicas.ready", description="ready replicas"),
    printer_column("Desired", "integer", ".status.replicas.desired"),
    WORKERS_COLUMN,
    printer_column("Req/s", "number", ".status.serving.requestsPerSecond", priority=1),
    printer_column("TTFT-ms", "integer", ".status.serving.ttftP50Ms", priority=1, description="p50 TTFT"),
    printer_column("Waiting", "integer", ".status.serving.waiting", priority=1),
    printer_column("Endpoint", "string", ".status.endpoint"),
    printer_column(
        "Version", "string", ".status.model.version", description="model version served", priority=1
    ),
    AGE_COLUMN,
]
