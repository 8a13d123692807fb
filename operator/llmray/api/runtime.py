"""Contracts between the operator and the workloads it submits into Ray.

- :class:`TrainingRun` is the config file of ``python -m llmray_workloads.train --config``.
- :class:`ServeAppArgs` is the ``args`` of the Serve application the operator deploys.
- Progress lines: the training driver prints ``LLMRAY_PROGRESS {json}`` lines (and keeps the same
  JSON in ``<output>/.llmray/progress.json``); the operator tails the Ray job's logs and parses the
  last line with :func:`parse_progress`. One documented line format, readable with ``kubectl logs``
  or ``ray job logs`` too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import Field, ValidationError

from .common import ApiModel, StatusModel
from .deployment import LLMDeploymentSpec
from .training import LLMTrainingJobSpec

PROGRESS_MARKER = "LLMRAY_PROGRESS"
_PROGRESS_RE = re.compile(PROGRESS_MARKER + r" (\{.*\})\s*$", re.MULTILINE)
SERVE_APP_IMPORT_PATH = "llmray_workloads.serve.app:build_app"
SERVE_DEPLOYMENT_NAME = "LLMServer"
"""Name of the transformers engine's Serve deployment (its ``user_config`` carries the adapters)."""
TRAIN_ENTRYPOINT_MODULE = "llmray_workloads.train"
# Environment of every Ray pod the operator creates (set from Secrets, never written into the spec).
API_KEY_ENV = "LLMRAY_API_KEY"
"""Holds the LLMDeployment's API key (from spec.apiKeySecretRef); pass it as ServeAppArgs.api_key_env."""
HF_TOKEN_ENV = "HF_TOKEN"
"""Holds the hub token from spec.model.secretRef (read by huggingface_hub)."""
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
"""The Ray cluster's auth token (RAY_AUTH_MODE=token), from the <name>-ray-auth Secret."""


class TrainingRun(ApiModel):
    """Everything one training attempt needs: the resource's spec plus where this run keeps state."""

    name: str = Field(..., min_length=1, description="Resource name (used for run and Ray job names).")
    namespace: str = Field("default", description="Resource namespace.")
    uid: str | None = Field(
        None,
        description="Resource uid: part of the checkpoint run name, so a deleted and recreated resource "
        "never resumes its predecessor's checkpoints.",
    )
    attempt: int = Field(0, ge=0, description="0 for the first submission, +1 per restart.")
    spec: LLMTrainingJobSpec = Field(..., description="The LLMTrainingJob spec.")
    storage_path: str | None = Field(
        None, description="Override of the checkpoint storage path (default: from spec.checkpoint)."
    )
    output_path: str | None = Field(
        None, description="Override of the output path (default: from spec.output)."
    )


class AdapterSource(ApiModel):
    """One resolved LoRA adapter: its model id and where a replica loads it from."""

    name: str = Field(..., min_length=1, max_length=63, description="Model id clients send.")
    source: str = Field(
        ..., min_length=1, max_length=2048, description="Local folder, hub repo id or object-store URI."
    )


class ServeUserConfig(ApiModel):
    """The Serve ``user_config`` of the transformers deployment: what a replica applies in
    ``reconfigure()`` without restarting (Serve sends it to running replicas on change)."""

    adapters: list[AdapterSource] = Field(default_factory=list, max_length=16)


class ServeAppArgs(ApiModel):
    """Arguments of the Serve application builder (``import_path`` + ``args``)."""

    name: str = Field(..., min_length=1, description="Resource name; also the Serve application name.")
    spec: LLMDeploymentSpec = Field(..., description="The LLMDeployment spec.")
    model_path: str | None = Field(
        None,
        description="Resolved model location: a local path or an s3:// / gs:// URI (e.g. a training "
        "job's output); overrides spec.model.uri.",
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (set by the operator from the Secret)."
    )
    route_prefix: str = Field("/", description="HTTP route prefix of the application.")
    adapters: list[AdapterSource] = Field(
        default_factory=list,
        max_length=16,
        description="Resolved adapters for engines that take them at build time (vllm); the "
        "transformers engine gets them in its deployment's user_config instead.",
    )
    model_version: str | None = Field(
        None,
        description="Version of the weights at the model path (a training job's export version). Part "
        "of the args, so a new version changes Serve's code version and rolls the replicas over.",
    )


class ProgressReport(StatusModel):
    """One progress report of a training run (the JSON after ``LLMRAY_PROGRESS``)."""

    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    elapsed_seconds: float | None = None
    checkpoint_path: str | None = None
    checkpoint_step: int | None = None
    output_path: str | None = None
    model_version: str | None = Field(
        None, description="Version of the exported model (final report only; see .llmray/manifest.json)."
    )
    state: str = Field("running", description="running, checkpointed, finished or failed.")


def format_progress(report: ProgressReport) -> str:
    """The log line a training driver prints for ``report``."""
    return (
        f"{PROGRESS_MARKER} {json.dumps(report.model_dump(by_alias=True, exclude_none=True), sort_keys=True)}"
    )


def parse_progress(log_text: str) -> ProgressReport | None:
    """The last well-formed progress report in a log text, or None."""
    for raw in reversed(_PROGRESS_RE.findall(log_text)):
        try:
            data: Any = json.loads(raw)
            return ProgressReport.model_validate(data)
        except (ValueError, ValidationError):
            continue
    return None
