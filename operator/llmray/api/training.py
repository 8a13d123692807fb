"""``LLMTrainingJob``: fine-tune a causal LM on a dataset with N Ray Train workers."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, model_validator

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
    with_cel_rules,
)

KIND = "LLMTrainingJob"
PLURAL = "llmtrainingjobs"
SHORT_NAME = "ltj"
DESCRIPTION = (
    "LLMTrainingJob fine-tunes a language model on a dataset with distributed Ray Train "
    "workers, mirroring progress into its status and writing the trained model to spec.output.uri. "
    "The label kueue.x-k8s.io/queue-name (optionally kueue.x-k8s.io/priority-class) makes it wait in "
    "that Kueue LocalQueue until Kueue admits its whole Ray cluster (status.queue)."
)

Phase = Literal["Pending", "Queued", "Provisioning", "Running", "Succeeded", "Failed", "Suspended"]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})


class ModelSource(ApiModel):
    """The base model to fine-tune."""

    uri: StorageURI = Field(
        ...,
        description="Where the model lives: hf://org/name (Hugging Face hub), file:///path "
        "(a path inside the Ray pods), pvc://claim/path (a PersistentVolumeClaim, mounted for you), "
        "or s3://bucket/prefix, gs://bucket/prefix (a Hugging Face model folder, downloaded to each "
        "pod's model cache; see spec.objectStorage).",
    )
    secret_ref: SecretKeyRef | None = Field(
        None, description="Secret holding a hub token (exported as HF_TOKEN), for gated models."
    )
    revision: str | None = Field(None, max_length=256, description="Hub revision (branch, tag or commit).")


class DatasetSpec(ApiModel):
    """The training data and how to read it."""

    uri: StorageURI = Field(
        ...,
        description="JSONL, Parquet or plain-text file or directory (file://, pvc://, s3:// or gs://), "
        "or hf://org/set.",
    )
    format: Literal["text", "instruction", "chat"] = Field(
        "text",
        description="text: one text field; instruction: prompt/response fields (loss on the response "
        "only); chat: a messages list rendered with the tokenizer's chat template (loss on assistant "
        "turns only).",
    )
    text_field: str = Field("text", min_length=1, description="Field holding the text (format text).")
    prompt_field: str = Field("prompt", min_length=1, description="Prompt field (format instruction).")
    response_field: str = Field("response", min_length=1, description="Response field (format instruction).")
    messages_field: str = Field("messages", min_length=1, description="Messages field (format chat).")
    split: str = Field("train", min_length=1, description="Split to read from hf:// datasets.")
    validation_split: float = Field(
        0.0, ge=0.0, le=0.5, description="Fraction held out for evaluation (eval loss); 0 disables it."
    )
    packing: bool = Field(
        False,
        description="Pack several examples into each maxSeqLength sequence (format text only) instead of "
        "padding each example.",
    )


class LoraSpec(ApiModel):
    """LoRA adapter settings (method: lora)."""

    r: int = Field(8, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(16, ge=1, le=4096, description="Scaling numerator (alpha / r scales the update).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        max_length=64,
        description="Names of the modules that get adapters (e.g. q_proj, v_proj); must exist in the model.",
    )
    merge_on_export: bool = Field(
        False, description="Merge the adapter into the base weights when writing the output model."
    )


class Hyperparameters(ApiModel):
    """Optimisation settings."""

    epochs: int = Field(1, ge=1, le=1000, description="Passes over the dataset (unless maxSteps is set).")
    max_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Stop after this many optimiser steps; overrides epochs."
    )
    learning_rate: float = Field(2e-5, gt=0.0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    batch_size_per_worker: int = Field(8, ge=1, le=4096, description="Sequences per worker per micro-step.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-steps accumulated per optimiser step."
    )
    max_seq_length: int = Field(
        512, ge=8, le=1_048_576, description="Tokens per sequence; must not exceed the model's limit."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp32 (CPU)."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Seed for data order and initialisation.")
    logging_steps: int = Field(1, ge=1, le=100_000, description="Publish progress every N steps.")


class FsdpSpec(ApiModel):
    """FSDP2 settings (strategy fsdp, GPU workers; Hugging Face Trainer + accelerate)."""

    sharding_strategy: Literal["full_shard", "shard_grad_op"] = Field(
        "full_shard",
        description="full_shard: parameters, gradients and optimizer state sharded, parameters "
        "re-gathered for the backward pass (least memory); shard_grad_op: parameters stay gathered "
        "between forward and backward (more memory, less communication; ZeRO-2-like).",
    )
    cpu_offload: bool = Field(
        False,
        description="Keep sharded parameters, gradients and optimizer state in CPU memory between uses "
        "(fits larger models on the GPUs, at a large speed cost).",
    )


class DistributedSpec(ApiModel):
    """How workers share the model. A worker pod with N GPUs runs N workers, one per GPU."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: replicate the model on each worker; fsdp: shard parameters, grads and "
        "optimizer state across workers (large models; GPU workers only, CPU workers fall back to ddp).",
    )
    fsdp: FsdpSpec = Field(default_factory=FsdpSpec, description="FSDP settings (strategy fsdp).")


class TrainingWorkers(Placement):
    """The Ray Train worker pods: one Ray worker pod per training worker."""

    replicas: int = Field(
        1, ge=1, le=1024, description="Worker pods (each runs one training worker per GPU, or one on CPU)."
    )
    resources: Resources = Field(
        default=Resources(cpu="4", memory="16Gi"),
        description="Resources of each worker pod; gpu > 0 trains on GPUs, one Ray Train worker per GPU "
        "with an equal share of the pod's CPUs.",
    )


class CheckpointSpec(ApiModel):
    """Checkpointing, which also makes restarts resume instead of starting over."""

    storage_uri: StorageURI | None = Field(
        None,
        description="Where checkpoints go (file://, pvc://, s3://, gs://); "
        "default: output.uri + /checkpoints.",
    )
    every_steps: int = Field(100, ge=1, le=10_000_000, description="Save every N optimiser steps.")
    keep: int = Field(3, ge=1, le=1000, description="How many recent checkpoints to keep.")


class OutputSpec(ApiModel):
    """Where the final model (or adapter) is written, in Hugging Face format."""

    uri: StorageURI = Field(..., description="Output location (file://, pvc://, s3://, gs://).")


class FailurePolicy(ApiModel):
    """What happens when the training job fails."""

    max_restarts: int = Field(
        3,
        ge=0,
        le=100,
        description="Times the job is resubmitted (from the latest checkpoint) after a failure.",
    )
    backoff_seconds: int = Field(
        0,
        ge=0,
        le=3600,
        description="Wait before resubmitting after a failure, doubling with each restart "
        "(backoffSeconds x 2^(restart-1), at most 1 hour); the Ray pods stay up meanwhile and "
        "status.message says 'restarting at <time> (backoff Ns)'. 0 resubmits at once.",
    )


FSDP_WORKERS_MESSAGE = (
    "spec.distributed.strategy fsdp needs at least 2 workers: spec.workers.replicas >= 2, or "
    "spec.workers.resources.gpu >= 2 (one worker per GPU)"
)


class LLMTrainingJobSpec(ApiModel):
    """Fine-tune a causal language model on a dataset with distributed Ray Train workers."""

    model_config = with_cel_rules(
        cel_rule(
            "self.method == 'lora' || !has(self.lora)",
            "spec.lora may only be set when spec.method is lora",
            ".lora",
            "FieldValueForbidden",
        ),
        cel_rule(
            "self.dataset.format == 'text' || !self.dataset.packing",
            "spec.dataset.packing is only supported with format text",
            ".dataset.packing",
        ),
        cel_rule(
            "self.distributed.strategy != 'fsdp' || self.workers.replicas >= 2 || "
            "self.workers.resources.gpu >= 2",
            FSDP_WORKERS_MESSAGE,
            ".distributed.strategy",
        ),
        cel_rule(
            "self.hyperparameters.precision != 'fp16' || self.workers.resources.gpu > 0",
            "spec.hyperparameters.precision fp16 needs GPU workers (spec.workers.resources.gpu > 0)",
            ".hyperparameters.precision",
        ),
    )

    model: ModelSource = Field(..., description="The base model to fine-tune.")
    dataset: DatasetSpec = Field(..., description="The training data.")
    method: Literal["full", "lora"] = Field(
        "full", description="full: train every weight; lora: train adapters."
    )
    lora: LoraSpec | None = Field(None, description="LoRA settings; only with method lora (defaults apply).")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Optimisation settings."
    )
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Distribution strategy."
    )
    workers: TrainingWorkers = Field(default_factory=TrainingWorkers, description="Training worker pods.")
    head: HeadSpec = Field(default_factory=HeadSpec, description="The Ray head pod.")
    image: Image = DEFAULT_IMAGE
    image_pull_policy: ImagePullPolicy = "IfNotPresent"
    pod_template: SharedPodTemplate = None
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    output: OutputSpec = Field(..., description="Where the trained model is written.")
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, description="Restart policy.")
    object_storage: ObjectStorage | None = Field(
        None,
        description="Credentials, endpoint and region for the s3:// and gs:// URIs of this job "
        "(model, dataset, checkpoints, output).",
    )
    suspend: bool = Field(
        False,
        description="true stops the job and removes its Ray pods; false resumes from the latest checkpoint.",
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        le=31_536_000,
        description="Longest the job may run, counted from status.startTime (its first Ray job "
        "submission) across restarts; beyond it the job is stopped and Failed with reason "
        "DeadlineExceeded. Suspending stops the clock; resuming starts it afresh.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=31_536_000,
        description="Delete the Ray cluster (not this resource) this long after the job finished.",
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> LLMTrainingJobSpec:
        """Mirror the CEL rules so standalone configs (the workloads) fail the same way."""
        if self.lora is not None and self.method != "lora":
            raise ValueError("spec.lora may only be set when spec.method is lora")
        if self.dataset.packing and self.dataset.format != "text":
            raise ValueError("spec.dataset.packing is only supported with format text")
        if self.distributed.strategy == "fsdp" and self.train_workers() < 2:
            raise ValueError(FSDP_WORKERS_MESSAGE)
        if self.hyperparameters.precision == "fp16" and self.workers.resources.gpu == 0:
            raise ValueError(
                "spec.hyperparameters.precision fp16 needs GPU workers (spec.workers.resources.gpu > 0)"
            )
        return self

    def train_workers(self) -> int:
        """Ray Train workers: one per GPU of every worker pod (one per pod on CPU pods)."""
        return self.workers.replicas * max(1, self.workers.resources.gpu)

    def effective_lora(self) -> LoraSpec | None:
        """LoRA settings in force: the given ones, defaults for method lora, None for full."""
        if self.method != "lora":
            return None
        return self.lora or LoraSpec()

    def checkpoint_uri(self) -> str:
        """Where checkpoints go when the user did not say."""
        return self.checkpoint.storage_uri or self.output.uri.rstrip("/") + "/checkpoints"


class Progress(StatusModel):
    """Live training progress, mirrored from the running job."""

    step: int = Field(0, description="Optimiser steps done.")
    total_steps: int = Field(0, description="Optimiser steps planned.")
    percent: int = Field(0, description="step / totalSteps, 0-100.")
    epoch: float = Field(0.0, description="Fractional epoch.")
    loss: str = Field("", description="Latest training loss (as text, for kubectl columns).")
    eval_loss: str = Field("", description="Latest evaluation loss.")
    learning_rate: str = Field("", description="Current learning rate.")
    tokens_per_second: int = Field(0, description="Training throughput over all workers.")
    mfu: str = Field(
        "",
        description="Model FLOPs utilisation: share of the accelerators' peak FLOPs, e.g. 41.3% (empty: "
        "unknown, e.g. on CPU).",
    )
    eta: str = Field("", description="Estimated time left, e.g. 3m20s.")
    updated_at: datetime | None = Field(None, description="When the job last reported progress.")


class CheckpointStatus(StatusModel):
    """The latest checkpoint the job wrote."""

    uri: str = Field("", description="Checkpoint location.")
    step: int = Field(0, description="Step it was taken at.")


class OutputStatus(StatusModel):
    """The trained model."""

    uri: str = Field("", description="Where the final model was written.")
    version: str = Field(
        "",
        description="Version of the model at uri (new per export; also in <uri>/.llmray/manifest.json); "
        "deployments with fromTrainingJob, or with model.uri equal to this uri, roll it out.",
    )


class QueueStatus(StatusModel):
    """Kueue: where the job waits (label kueue.x-k8s.io/queue-name) and what Kueue decided."""

    name: str = Field("", description="The Kueue LocalQueue (label kueue.x-k8s.io/queue-name).")
    workload: str = Field("", description="The Kueue Workload that stands for this job in its queue.")
    cluster_queue: str = Field("", description="The ClusterQueue that admitted it (empty while queued).")
    preemptions: int = Field(
        0,
        description="Times Kueue evicted the running job (preempted, deactivated); each time its Ray "
        "pods were removed and it waited in the queue again, then resumed from the latest checkpoint.",
    )


class LLMTrainingJobStatus(StatusModel):
    """Observed state of an LLMTrainingJob."""

    phase: Phase = Field(
        "Pending",
        description="Pending, Queued (waiting for Kueue to admit it), Provisioning, Running, Succeeded, "
        "Failed or Suspended.",
    )
    conditions: Conditions = Field(description="Ready-style conditions per Kubernetes API conventions.")
    observed_generation: ObservedGeneration = 0
    ray_cluster: RayClusterStatus = Field(
        default_factory=RayClusterStatus, description="The job's Ray cluster."
    )
    workers: PodCounts = Field(default_factory=PodCounts, description="Worker pods ready / desired.")
    job_id: str = Field("", description="Ray job submission id of the current attempt.")
    restarts: int = Field(0, description="Resubmissions after failures so far.")
    attempt: int = Field(
        0,
        description="Ray job attempt number: +1 per restart and per resume after suspend; the job's "
        "submission id is derived from (uid, attempt), so no attempt ever runs twice.",
    )
    progress: Progress = Field(default_factory=Progress, description="Live training progress.")
    checkpoint: CheckpointStatus = Field(default_factory=CheckpointStatus, description="Latest checkpoint.")
    output: OutputStatus = Field(
        default_factory=OutputStatus, description="The trained model, once Succeeded."
    )
    start_time: datetime | None = Field(
        None,
        description="When the first attempt was submitted (reset on resume after a suspension); "
        "spec.activeDeadlineSeconds counts from it.",
    )
    next_attempt_at: datetime | None = Field(
        None, description="When the next attempt is submitted, while backing off after a failure."
    )
    completion_time: datetime | None = Field(None, description="When the job Succeeded or Failed.")
    queue: QueueStatus | None = Field(
        None, description="Kueue admission, for jobs labelled kueue.x-k8s.io/queue-name."
    )
    message: StatusMessage = ""


PRINTER_COLUMNS: list[dict[str, Any]] = [
    PHASE_COLUMN,
    printer_column("Progress", "integer", ".status.progress.percent", description="percent done"),
    printer_column("Step", "integer", ".status.progress.step"),
    printer_column("Loss", "string", ".status.progress.loss"),
    printer_column("Tokens/s", "integer", ".status.progress.tokensPerSecond", priority=1),
    printer_column(
        "MFU", "string", ".status.progress.mfu", priority=1, description="model FLOPs utilisation"
    ),
    printer_column("ETA", "string", ".status.progress.eta", priority=1),
    printer_column("Restarts", "integer", ".status.restarts"),
    printer_column(
        "Queue", "string", ".status.queue.name", priority=1, description="Kueue LocalQueue (queued jobs)"
    ),
    WORKERS_COLUMN,
    AGE_COLUMN,
]
