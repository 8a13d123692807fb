"""Pure translation of an LLMDeployment spec into Ray Serve options and replica settings.

Everything here is a function of :class:`llmray.api.runtime.ServeAppArgs` and the environment passed
in, so the operator's contract and what Serve receives can be checked by unit tests without Ray.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmray.api.common import Resources, is_object_store, local_path
from llmray.api.deployment import Autoscaling, LLMDeploymentSpec
from llmray.api.runtime import SERVE_DEPLOYMENT_NAME, ServeAppArgs

DEPLOYMENT_NAME = SERVE_DEPLOYMENT_NAME
RETRY_AFTER_S = 1
"""Seconds clients are told to wait (``Retry-After``) when a replica or the queue is full."""
MAX_REQUEST_BYTES = 1 << 20
"""Largest request body accepted; bigger bodies get 413 before any JSON parsing."""
MAX_SURGE_PERCENT = 100
"""Replicas Serve may start on top of the target during a rolling update (a new model version):
the new replicas load and pass their health check before the old ones drain and stop, so a
rollout never lowers capacity (it needs room for the extra replicas; the worker autoscaler adds
pods for them, and if none fit the old version keeps serving)."""
MODEL_VERSION_HEADER = "x-llmray-model-version"
"""Response header naming the model version the answering replica loaded."""

_QUANTITY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
_SUFFIX: dict[str, float] = {
    "": 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``4Gi``) as a plain number."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _QUANTITY_RE.match(str(value).strip())
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2) or ""]


def ray_actor_options(resources: Resources) -> dict[str, Any]:
    """What one replica asks Ray for: CPUs (fractional), GPUs and memory in bytes."""
    options: dict[str, Any] = {
        "num_cpus": parse_quantity(resources.cpu),
        "num_gpus": resources.gpu,
    }
    memory = int(parse_quantity(resources.memory))
    if memory > 0:
        options["memory"] = memory
    return options


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def autoscaling_config(autoscaling: Autoscaling) -> dict[str, Any]:
    """Serve ``autoscaling_config`` from the spec.

    Serve's defaults average load over 30 s and push metrics every 10 s, which would make the
    spec's delays meaningless when they are short; the metric interval and look-back window are
    therefore derived from the delays (bounded to Serve's defaults) so "upscale after N s of load"
    means roughly N s.
    """
    up, down = autoscaling.upscale_delay_seconds, autoscaling.downscale_delay_seconds
    metrics_interval = _clamp(min(up, down) / 2, 0.5, 10.0)
    look_back = _clamp(max(up, 2 * metrics_interval), 2 * metrics_interval, 30.0)
    return {
        "min_replicas": autoscaling.min_replicas,
        "max_replicas": autoscaling.max_replicas,
        "target_ongoing_requests": autoscaling.target_ongoing_requests,
        "upscale_delay_s": up,
        "downscale_delay_s": down,
        "metrics_interval_s": metrics_interval,
        "look_back_period_s": look_back,
    }


def deployment_options(spec: LLMDeploymentSpec) -> dict[str, Any]:
    """``@serve.deployment`` options: autoscaling, per-replica resources and admission limits.

    Serve admits at most ``maxOngoingRequests`` per replica and queues at most
    ``maxQueuedRequests`` at the proxy; beyond that it answers 503 with ``Retry-After``. Serve
    cannot express a zero-length queue, so 0 becomes 1.
    """
    return {
        "autoscaling_config": autoscaling_config(spec.autoscaling),
        "ray_actor_options": ray_actor_options(spec.resources_per_replica),
        "max_ongoing_requests": spec.limits.max_ongoing_requests,
        "max_queued_requests": max(1, spec.limits.max_queued_requests),
        "backpressure_config": {"status_code": 503, "retry_after_s": float(RETRY_AFTER_S)},
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 20.0,
        "max_surge_percent": MAX_SURGE_PERCENT,
    }


def served_model_name(args: ServeAppArgs) -> str:
    """The model id clients send: ``spec.model.name``, else the resource name."""
    return args.spec.model.name or args.name


def model_source(args: ServeAppArgs) -> str:
    """Where the replica loads weights from: a local folder, a hub repo id, or an s3:// / gs:// URI.

    ``modelPath`` (set by the operator, e.g. a training job's output) wins over ``spec.model.uri``.
    Object-store models are downloaded by the replica (see :mod:`llmray_workloads.storage`).
    """
    if args.model_path:
        return args.model_path
    uri = args.spec.model.uri
    if uri is None:
        raise ValueError(
            f"spec.model.fromTrainingJob={args.spec.model.from_training_job!r} needs modelPath in the "
            "Serve app args (the operator resolves the job's output)"
        )
    if uri.startswith("hf://"):
        return uri[len("hf://") :]
    if is_object_store(uri):
        return uri
    path = local_path(uri)
    if path is None:
        raise ValueError(f"cannot serve {uri!r}: use hf://, file://, pvc://, s3:// or gs://")
    return path


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EngineSettings(_Settings):
    """What the generation engine of one replica needs."""

    model_source: str = Field(..., description="Local folder, hub repo id, or s3:// / gs:// URI.")
    store_endpoint: str | None = Field(None, description="S3 endpoint of an object-store model.")
    store_region: str | None = Field(None, description="S3 region of an object-store model.")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = Field(64, ge=1)
    batch_wait_timeout_ms: int = Field(10, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    max_lora_rank: int | None = Field(None, ge=1)


class ApiSettings(_Settings):
    """What the HTTP layer of one replica enforces."""

    served_model_name: str
    max_prompt_tokens: int = Field(4096, ge=1)
    max_tokens: int = Field(1024, ge=1)
    max_ongoing_requests: int = Field(32, ge=1)
    api_key_env: str | None = None
    api_key_file: str | None = None
    retry_after_s: int = RETRY_AFTER_S
    max_request_bytes: int = MAX_REQUEST_BYTES
    model_version: str = Field("", description="Version of the loaded weights (response header).")


class ServerSettings(_Settings):
    """Everything a replica is constructed with (JSON-serialisable, no secrets)."""

    engine: EngineSettings
    api: ApiSettings


def server_settings(args: ServeAppArgs) -> ServerSettings:
    """Replica settings for the transformers engine from the Serve app args."""
    spec = args.spec
    num_cpus = parse_quantity(spec.resources_per_replica.cpu)
    return ServerSettings(
        engine=EngineSettings(
            model_source=model_source(args),
            store_endpoint=spec.object_storage.endpoint if spec.object_storage else None,
            store_region=spec.object_storage.region if spec.object_storage else None,
            device="cuda" if spec.resources_per_replica.gpu > 0 else "cpu",
            dtype=spec.engine_args.dtype,
            max_model_len=spec.engine_args.max_model_len,
            max_num_seqs=spec.engine_args.max_num_seqs,
            batch_wait_timeout_ms=spec.engine_args.batch_wait_timeout_ms,
            torch_threads=max(1, math.ceil(num_cpus)),
            max_lora_rank=spec.engine_args.max_lora_rank,
        ),
        api=ApiSettings(
            served_model_name=served_model_name(args),
            max_prompt_tokens=spec.limits.max_prompt_tokens,
            max_tokens=spec.limits.max_tokens,
            max_ongoing_requests=spec.limits.max_ongoing_requests,
            api_key_env=args.api_key_env,
            model_version=args.model_version or "",
        ),
    )


class ApiKeyMissingError(RuntimeError):
    """An API key was configured but is not available: refuse to serve unauthenticated."""


def resolve_api_key(env_name: str | None, file_path: str | None, environ: Mapping[str, str]) -> str | None:
    """The API key clients must present, or None when the endpoint is open.

    Sources, first match wins: the variable ``env_name``; the file named by ``<env_name>_FILE``;
    ``file_path``. A configured but missing or empty key fails closed.
    """
    if env_name is None and file_path is None:
        return None
    candidates: list[tuple[str, str | None]] = []
    if env_name is not None:
        candidates.append((f"${env_name}", environ.get(env_name)))
        file_var = environ.get(f"{env_name}_FILE")
        if file_var:
            candidates.append((file_var, _read_key_file(file_var)))
    if file_path is not None:
        candidates.append((file_path, _read_key_file(file_path)))
    for _, value in candidates:
        if value and value.strip():
            return value.strip()
    where = ", ".join(source for source, _ in candidates)
    raise ApiKeyMissingError(f"an API key is configured but none was found in {where}")


def _read_key_file(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None
