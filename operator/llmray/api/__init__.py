"""The llmray API (``llmray.io/v1alpha1``): pydantic models shared by the operator and workloads.

Imports only pydantic, so the workloads can validate the exact config the operator passes them.
"""

from .common import API_VERSION, GROUP, VERSION, Resources, local_path, pvc_claim
from .deployment import LLMDeploymentSpec, LLMDeploymentStatus
from .training import LLMTrainingJobSpec, LLMTrainingJobStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "LLMDeploymentSpec",
    "LLMDeploymentStatus",
    "LLMTrainingJobSpec",
    "LLMTrainingJobStatus",
    "Resources",
    "local_path",
    "pvc_claim",
]
