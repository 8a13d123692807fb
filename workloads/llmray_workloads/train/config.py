"""Reading a TrainingRun config and resolving it into a plan: paths, run name, worker resources.

Everything here is pure (no Ray, no torch) so the driver can fail on bad input in milliseconds and
unit tests can cover every rule. Errors are :class:`ConfigError` with the offending field spelled
as it is on the wire (``spec.hyperparameters.maxSeqLength``) so users can find it in their YAML.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from llmray.api import local_path
from llmray.api.common import is_object_store
from llmray.api.runtime import TrainingRun

from ..storage import StoreSettings

Precision = Literal["bf16", "fp16", "fp32"]
RESOURCE_WAIT_ENV = "LLMRAY_RESOURCE_WAIT_SECONDS"


class ConfigError(ValueError):
    """Bad input the user must fix; raised before any worker starts or anything is written."""


def parse_run(text: str, source: str = "config") -> TrainingRun:
    """Validate a TrainingRun given as JSON or YAML text."""
    try:
        data: Any = json.loads(text)
    except ValueError:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: neither valid JSON nor YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a TrainingRun object, got {type(data).__name__}")
    try:
        return TrainingRun.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid TrainingRun: {format_validation_error(exc)}") from exc


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field path (``spec.dataset.uri: ...``)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def read_config(path: str, stdin_text: str | None = None) -> TrainingRun:
    """Load the config from a file, or from ``stdin_text`` when ``path`` is ``-``."""
    if path == "-":
        return parse_run(stdin_text or "", "stdin")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror or exc}") from exc
    return parse_run(text, path)


def cpu_quantity(value: str, field: str = "spec.workers.resources.cpu") -> float:
    """Kubernetes CPU quantity (``4``, ``500m``, ``1.5``) as a number of cores for Ray."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(m?)", value)
    if not match:
        raise ConfigError(f"{field}: {value!r} is not a CPU quantity Ray understands (use e.g. 4 or 500m)")
    cores = float(match.group(1)) / (1000 if match.group(2) else 1)
    if cores <= 0:
        raise ConfigError(f"{field}: must be more than 0 cores")
    return cores


def hf_repo(uri: str) -> str | None:
    """``org/name`` of an ``hf://org/name`` URI, else None."""
    return uri[len("hf://") :].strip("/") if uri.startswith("hf://") else None


@dataclass(frozen=True)
class Plan:
    """Where a run reads and writes, resolved from the TrainingRun (all paths absolute or URIs)."""

    run_name: str
    attempt: int
    model_ref: str  # local folder or hub repo id
    model_is_hub: bool
    dataset_ref: str  # local file/folder or hub repo id
    dataset_is_hub: bool
    output_dir: str
    storage_path: str  # local folder or s3:// / gs:// URI Ray can write to
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    max_failures: int
    model_uri: str | None = None
    """s3:// / gs:// model: each node downloads it to its model cache (see :func:`localized`)."""
    dataset_uri: str | None = None
    """s3:// / gs:// dataset: the driver downloads it before reading."""
    output_uri: str | None = None
    """s3:// / gs:// output: rank 0 uploads the model there; ``output_dir`` is then local scratch."""
    store: StoreSettings = field(default_factory=StoreSettings)
    """Endpoint and region of the object store (credentials come from the pods' environment)."""

    @property
    def output_location(self) -> str:
        """Where the final model ends up (the URI for object-store outputs)."""
        return self.output_uri or self.output_dir

    @property
    def storage_is_remote(self) -> bool:
        return is_object_store(self.storage_path)

    @property
    def run_dir(self) -> str:
        """Folder of this run's checkpoints (``<storage>/<run name>``)."""
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"

    def checkpoint_path(self, dir_name: str) -> str:
        """Where Ray stores the checkpoint named ``dir_name``."""
        return f"{self.run_dir}/{dir_name}"


def run_name(run: TrainingRun) -> str:
    """Ray Train run name of one resource incarnation: every attempt finds the same checkpoints.

    ``<namespace>.<name>.<uid>``: with the uid, a deleted and recreated resource (maybe another model)
    starts afresh instead of resuming its predecessor's checkpoints. Configs written by hand have no
    uid: ``<namespace>.<name>``. Namespaces and uids contain no dots, so both forms are unambiguous.
    """
    return ".".join(part for part in (run.namespace, run.name, run.uid) if part)


def _local_or_error(uri: str, field: str, what: str) -> str:
    path = local_path(uri)
    if path is None:
        scheme = uri.split("://", 1)[0]
        raise ConfigError(
            f"{field}: {scheme}:// is not supported for {what}; use file://, pvc://, s3:// or gs://"
        )
    return str(Path(path).absolute())


def worker_shape(pods: int, cpu: str, gpu: int) -> tuple[int, dict[str, float]]:
    """Ray Train workers and each one's resources for ``pods`` worker pods of ``cpu`` and ``gpu``.

    CPU pods: one worker per pod asking for every CPU the pod advertises to Ray (``ray start
    --num-cpus`` is the pod's CPU rounded up), so two workers never share a pod and the loss of a
    pod is the loss of one worker. GPU pods: one worker per GPU (a worker drives one device; one
    worker asking for all N GPUs would train on one of them), each with an equal share of the
    pod's CPUs: N workers fill the pod exactly, so a pod's workers always land on it together.
    """
    cpus = max(1, math.ceil(cpu_quantity(cpu)))
    if gpu <= 0:
        return pods, {"CPU": float(cpus)}
    share = float(cpus // gpu) if cpus >= gpu else cpus / gpu
    return pods * gpu, {"CPU": share, "GPU": 1.0}


def remote_scratch(run: TrainingRun, what: str) -> str:
    """Local folder standing in for an object-store location (under the pod's TMPDIR)."""
    return str(Path(tempfile.gettempdir()) / "llmray" / what / run_name(run))


def resolve_plan(run: TrainingRun, environ: dict[str, str] | None = None) -> Plan:
    """Resolve URIs, run name and worker resources; pure (touches no file or cluster).

    ``environ``: where the object store's endpoint/region fall back to (default: the process's).
    """
    spec = run.spec
    store = StoreSettings.resolve(spec.object_storage, environ)
    model_repo = hf_repo(spec.model.uri)
    model_uri = spec.model.uri if is_object_store(spec.model.uri) else None
    model_ref = model_repo or model_uri or _local_or_error(spec.model.uri, "spec.model.uri", "models")
    data_repo = hf_repo(spec.dataset.uri)
    dataset_uri = spec.dataset.uri if is_object_store(spec.dataset.uri) else None
    dataset_ref = (
        data_repo or dataset_uri or _local_or_error(spec.dataset.uri, "spec.dataset.uri", "datasets")
    )
    output_uri = None
    if run.output_path:
        output_dir = run.output_path
    elif is_object_store(spec.output.uri):
        output_uri = spec.output.uri.rstrip("/")
        output_dir = remote_scratch(run, "output")
    else:
        output_dir = _local_or_error(spec.output.uri, "spec.output.uri", "the output model")
    storage_uri = run.storage_path or spec.checkpoint_uri()
    if hf_repo(storage_uri) is not None:
        raise ConfigError(
            "spec.checkpoint.storageUri: hf:// cannot hold checkpoints; use file://, pvc://, s3://, gs://"
        )
    storage = local_path(storage_uri)
    storage_path = str(Path(storage).absolute()) if storage is not None else storage_uri
    resources = spec.workers.resources
    num_workers, per_worker = worker_shape(spec.workers.replicas, resources.cpu, resources.gpu)
    return Plan(
        run_name=run_name(run),
        attempt=run.attempt,
        model_ref=model_ref,
        model_is_hub=model_repo is not None,
        dataset_ref=dataset_ref,
        dataset_is_hub=data_repo is not None,
        output_dir=str(Path(output_dir).absolute()),
        storage_path=storage_path,
        num_workers=num_workers,
        use_gpu=resources.gpu > 0,
        resources_per_worker=per_worker,
        # Retries are the operator's: each failed attempt is resubmitted as the next one, counted
        # in status.restarts and bounded by failurePolicy.maxRestarts. Ray Train restarting the
        # worker group inside an attempt would hide failures from both.
        max_failures=0,
        model_uri=model_uri,
        dataset_uri=dataset_uri,
        output_uri=output_uri,
        store=store,
    )


def resolve_precision(requested: str, cuda: bool, bf16_supported: bool) -> Precision:
    """Mixed-precision mode for the workers' hardware.

    auto: bf16 where the GPU supports it, else fp32. bf16 on CPU workers falls back to fp32 (CPU
    autocast is slower than fp32 for these kernels); fp16 needs a GPU (the spec already forbids it
    with gpu 0, this guards hand-written configs).
    """
    if requested == "fp32":
        return "fp32"
    if requested == "fp16":
        if not cuda:
            raise ConfigError("spec.hyperparameters.precision: fp16 needs GPU workers")
        return "fp16"
    if requested == "bf16":
        if cuda and not bf16_supported:
            raise ConfigError("spec.hyperparameters.precision: bf16 is not supported by this GPU; use fp16")
        return "bf16" if cuda else "fp32"
    return "bf16" if cuda and bf16_supported else "fp32"


def workers_that_fit(nodes: list[dict[str, float]], per_worker: dict[str, float]) -> int:
    """How many workers of shape ``per_worker`` the nodes' total resources can hold (one node each)."""
    count = 0
    for node in nodes:
        fits = [int(node.get(name, 0.0) // amount) for name, amount in per_worker.items() if amount > 0]
        count += min(fits) if fits else 0
    return count


def check_capacity(nodes: list[dict[str, float]], plan: Plan) -> None:
    """Refuse a run the cluster could never schedule, naming the field and the shortfall."""
    fit = workers_that_fit(nodes, plan.resources_per_worker)
    if fit >= plan.num_workers:
        return
    totals = {name: sum(node.get(name, 0.0) for node in nodes) for name in plan.resources_per_worker}
    shape = ", ".join(f"{k} {v:g}" for k, v in plan.resources_per_worker.items())
    have = ", ".join(f"{k} {v:g}" for k, v in totals.items())
    raise ConfigError(
        f"spec.workers: {plan.num_workers} worker(s) of {{{shape}}} each do not fit the Ray cluster "
        f"(total {have}; room for {fit}). Lower spec.workers.replicas or spec.workers.resources, "
        "or add nodes."
    )
