"""Which model an LLMDeployment serves: its URI, or the output of an LLMTrainingJob (train -> deploy)."""

from __future__ import annotations

from typing import Any

from llmray.api.deployment import LLMDeploymentSpec

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


__all__ = ["R_MODEL_RESOLVED", "resolve_model"]
