"""Which model an LLMDeployment serves: its URI, or the output of an LLMTrainingJob (train -> deploy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmray.api.common import is_object_store, local_path
from llmray.api.deployment import AdapterState, AdapterStatus, LLMDeploymentSpec

from .status import (
    R_MODEL_RESOLVED,
    R_TRAINING_JOB_FAILED,
    R_TRAINING_JOB_NOT_FOUND,
    R_TRAINING_JOB_NOT_SUCCEEDED,
    Blocker,
)


def resolve_model(
    spec: LLMDeploymentSpec, training_job: dict[str, Any] | None, previous_uri: str
) -> tuple[str | None, Blocker | None, str]:
    """(model URI to serve, what blocks it, a status message).

    ``spec.model.uri`` is served as is. ``spec.model.fromTrainingJob`` is served once that job has
    Succeeded (its ``status.output.uri``, else its ``spec.output.uri``). While the job retrains, the
    previously resolved model (``previous_uri``) keeps being served rather than tearing down.
    """
    if spec.model.uri:
        return spec.model.uri, None, f"serving {spec.model.uri}"
    job_name = spec.model.from_training_job or ""
    if training_job is None:
        if previous_uri:
            return previous_uri, None, f"LLMTrainingJob {job_name} not found; still serving {previous_uri}"
        return (
            None,
            Blocker(
                R_TRAINING_JOB_NOT_FOUND,
                f"waiting for LLMTrainingJob {job_name} (spec.model.fromTrainingJob) to exist in this "
                "namespace",
            ),
            "",
        )
    status = training_job.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase == "Succeeded":
        uri = (status.get("output") or {}).get("uri") or (
            (training_job.get("spec") or {}).get("output") or {}
        ).get("uri")
        if uri:
            return str(uri), None, f"serving the output of LLMTrainingJob {job_name}: {uri}"
    if previous_uri:
        return previous_uri, None, f"LLMTrainingJob {job_name} is {phase}; still serving {previous_uri}"
    if phase == "Failed":
        return (
            None,
            Blocker(
                R_TRAINING_JOB_FAILED,
                f"LLMTrainingJob {job_name} (spec.model.fromTrainingJob) Failed: "
                f"{status.get('message') or 'see its status'}; fix and rerun it, or point spec.model at "
                "another model",
                fatal=True,
            ),
            "",
        )
    return (
        None,
        Blocker(
            R_TRAINING_JOB_NOT_SUCCEEDED,
            f"waiting for LLMTrainingJob {job_name} to succeed (it is {phase})",
        ),
        "",
    )


R_ADAPTER_WAITING = "AdapterWaiting"
R_ADAPTER_INVALID = "AdapterInvalid"
VLLM_ADAPTER_SCHEMES = ("s3://", "gs://")
TRANSFORMERS_ADAPTER_SCHEMES = ("hf://", "file://", "pvc://")


@dataclass(frozen=True)
class ResolvedAdapter:
    """One entry of spec.adapters after resolution: a URI to serve, or why there is none yet."""

    name: str
    uri: str | None
    state: AdapterState
    message: str
    reason: str = ""


def adapter_source(uri: str) -> str:
    """Where a replica loads an adapter from: a local folder, a hub repo id, or the URI itself."""
    if uri.startswith("hf://"):
        return uri[len("hf://") :]
    return local_path(uri) or uri


def _not_an_adapter(job: dict[str, Any] | None) -> bool:
    """Whether a training job's output is a full model rather than a LoRA adapter."""
    spec = (job or {}).get("spec") or {}
    return job is not None and (
        spec.get("method", "full") != "lora" or bool((spec.get("lora") or {}).get("mergeOnExport"))
    )


def _job_adapter_uri(job_name: str, job: dict[str, Any]) -> tuple[str | None, AdapterState, str]:
    """(uri, state, message) for an adapter taken from LLMTrainingJob ``job``."""
    spec = job.get("spec") or {}
    if spec.get("method", "full") != "lora":
        return (
            None,
            "Failed",
            f"LLMTrainingJob {job_name} is a full fine-tune (spec.method {spec.get('method', 'full')}), "
            "not a LoRA adapter: serve it as spec.model.fromTrainingJob, or train with method lora",
        )
    if (spec.get("lora") or {}).get("mergeOnExport"):
        return (
            None,
            "Failed",
            f"LLMTrainingJob {job_name} merges its adapter into the base on export "
            "(spec.lora.mergeOnExport), so its output is a full model: serve it as "
            "spec.model.fromTrainingJob, or set mergeOnExport false",
        )
    status = job.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase == "Succeeded":
        uri = (status.get("output") or {}).get("uri") or (spec.get("output") or {}).get("uri")
        if uri:
            return str(uri), "Loading", f"the output of LLMTrainingJob {job_name}: {uri}"
    if phase == "Failed":
        return (
            None,
            "Failed",
            f"LLMTrainingJob {job_name} Failed: {status.get('message') or 'see its status'}",
        )
    return None, "Pending", f"waiting for LLMTrainingJob {job_name} to succeed (it is {phase})"


def resolve_adapters(
    spec: LLMDeploymentSpec,
    jobs: Mapping[str, dict[str, Any] | None],
    previous: Sequence[AdapterStatus],
    served_name: str,
) -> list[ResolvedAdapter]:
    """Each of spec.adapters resolved (pure): its URI, or Pending/Failed with a message.

    ``jobs``: the LLMTrainingJobs named by ``fromTrainingJob`` (None: not found). As for the base
    model, an adapter whose job is retraining or gone keeps serving its previously resolved URI.
    Semantic errors (a full fine-tune job, a name equal to the base's served name, a URI scheme
    the engine cannot load) are Failed, not blocking the base model or the other adapters.
    """
    before = {a.name: a.uri for a in previous if a.uri}
    schemes = VLLM_ADAPTER_SCHEMES if spec.engine == "vllm" else TRANSFORMERS_ADAPTER_SCHEMES
    out: list[ResolvedAdapter] = []
    for adapter in spec.adapters:
        name = adapter.name
        if name == served_name:
            message = (
                f"adapter name {name} is the base model's served name (spec.model.name, default: the "
                "resource name); give the adapter another name"
            )
            out.append(ResolvedAdapter(name, None, "Failed", message, R_ADAPTER_INVALID))
            continue
        if adapter.uri is not None:
            uri: str | None = adapter.uri
            state: AdapterState = "Loading"
            message = f"serving {adapter.uri}"
        else:
            job_name = adapter.from_training_job or ""
            job = jobs.get(job_name)
            if job is None:
                uri, state = None, "Pending"
                message = f"waiting for LLMTrainingJob {job_name} to exist in this namespace"
            else:
                uri, state, message = _job_adapter_uri(job_name, job)
            if uri is None and before.get(name) and not _not_an_adapter(job):
                uri, state = before[name], "Loading"  # retraining, failed or gone: keep the last one
                message = f"{message}; still serving {uri}"
        if uri is not None and not uri.startswith(schemes):
            message = (
                f"engine {spec.engine} loads adapters from {', '.join(s.rstrip('/') for s in schemes)} URIs, "
                f"not {uri}"
            )
            out.append(ResolvedAdapter(name, None, "Failed", message, R_ADAPTER_INVALID))
            continue
        folder = uri.rstrip("/").rsplit("/", 1)[0] if uri is not None else None
        if spec.engine == "vllm" and folder is not None:  # Serve LLM: one dynamic_lora_loading_path
            first = next((a.uri for a in out if a.uri is not None), None)
            if first is not None and first.rstrip("/").rsplit("/", 1)[0] != folder:
                message = (
                    "engine vllm loads every adapter from one folder (Ray Serve LLM's "
                    f"dynamic_lora_loading_path): put {uri} next to {first}"
                )
                out.append(ResolvedAdapter(name, None, "Failed", message, R_ADAPTER_INVALID))
                continue
        reason = R_ADAPTER_INVALID if state == "Failed" else (R_ADAPTER_WAITING if uri is None else "")
        out.append(ResolvedAdapter(name, uri, state, message, reason))
    return out


def adapter_statuses(
    resolved: Sequence[ResolvedAdapter],
    deployed: Mapping[str, str] | None,
    running: bool,
    listed: frozenset[str] | None = None,
) -> list[AdapterStatus]:
    """status.adapters from resolution, what Serve runs and what a replica lists.

    ``deployed``: adapter name -> source in the user_config Serve has deployed (None: unknown);
    ``running``: the Serve application is RUNNING, i.e. every replica applied that config;
    ``listed``: the model ids a replica's ``/v1/models`` answered (None: not known). An adapter is
    Ready once the replicas run a config that has it and (when known) a replica lists it; Failed
    when they run that config but do not list it (the replica could not load it); Loading before.
    """
    out: list[AdapterStatus] = []
    for adapter in resolved:
        state, message = adapter.state, adapter.message
        if adapter.uri is not None:
            live = deployed is not None and deployed.get(adapter.name) == adapter_source(adapter.uri)
            state = "Ready" if running and live else "Loading"
            message = f"served from {adapter.uri}" if state == "Ready" else f"loading {adapter.uri}"
            if state == "Ready" and listed is not None and adapter.name not in listed:
                state = "Failed"
                message = (
                    f"the replicas could not load {adapter.uri} (not in /v1/models): see the replica's "
                    "log for why (a missing folder, a rank above engineArgs.maxLoraRank, another base)"
                )
        out.append(AdapterStatus(name=adapter.name, uri=adapter.uri or "", state=state, message=message))
    return out


HOLD_OVER_RESOLUTION: frozenset[tuple[AdapterState, AdapterState]] = frozenset(
    {("Ready", "Loading"), ("Failed", "Loading")}
)
"""Before the Serve step looks: resolution alone says Loading, so what Serve last saw holds."""
HOLD_WITHOUT_LISTING: frozenset[tuple[AdapterState, AdapterState]] = frozenset({("Failed", "Ready")})
"""No model listing this pass: a load failure seen before (not listed by a replica) still holds."""


def hold_verdicts(
    now: Sequence[AdapterStatus],
    previous: Sequence[AdapterStatus],
    holds: frozenset[tuple[AdapterState, AdapterState]],
) -> list[AdapterStatus]:
    """``now`` with the last verdict kept where this pass knows less than the last one did.

    ``holds``: (previous state, new state) pairs in which the previous state and message stay, for
    the same adapter at the same uri; without it the state would flap (and send an Event) each pass.
    """
    before = {a.name: a for a in previous}
    out: list[AdapterStatus] = []
    for adapter in now:
        last = before.get(adapter.name)
        if last is not None and last.uri == adapter.uri and (last.state, adapter.state) in holds:
            adapter = adapter.model_copy(update={"state": last.state, "message": last.message})
        out.append(adapter)
    return out


def serve_model_path(uri: str) -> str | None:
    """What the Serve app loads a resolved model from (its ``modelPath``).

    A file:// or pvc:// model is a path inside the pods; an s3:// / gs:// one stays a URI (the
    replica downloads it with the deployment's spec.objectStorage); hf:// gives None (the app
    reads spec.model.uri).
    """
    return uri if is_object_store(uri) else local_path(uri)


def same_uri(a: str, b: str) -> bool:
    """Whether two model URIs name the same folder (a trailing slash does not matter)."""
    return bool(a) and a.rstrip("/") == b.rstrip("/")


def latest_export(uri: str, jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Of ``jobs`` (training job bodies), the one whose last export is at ``uri`` and newest.

    Export versions start with the export's UTC time, so the greatest is the newest export.
    """
    exported = [
        (str(output["version"]), job)
        for job in jobs
        if (output := (job.get("status") or {}).get("output") or {}).get("version")
        and same_uri(str(output.get("uri") or ""), uri)
    ]
    return max(exported, key=lambda pair: pair[0])[1] if exported else None


def model_version(spec: LLMDeploymentSpec, training_job: dict[str, Any] | None, previous: str) -> str:
    """The model version to serve: a training job's ``status.output.version`` (new per export).

    The job is ``spec.model.fromTrainingJob``, or for a ``spec.model.uri`` the job in the same
    namespace whose last export is at that URI (:func:`latest_export`), so a retrain into the
    folder a deployment serves rolls out either way. ``previous`` (the version being rolled out,
    else the one serving) is kept while the job has no version to offer (not found, recreated and
    not done yet). A ``spec.model.uri`` no job exports to has no version.
    """
    if spec.model.uri and training_job is None:
        return ""
    output = ((training_job or {}).get("status") or {}).get("output") or {}
    version = output.get("version")
    return str(version)[:128] if isinstance(version, str) and version else previous


__all__ = [
    "R_MODEL_RESOLVED",
    "ResolvedAdapter",
    "adapter_source",
    "adapter_statuses",
    "latest_export",
    "model_version",
    "resolve_adapters",
    "resolve_model",
    "same_uri",
    "serve_model_path",
]
