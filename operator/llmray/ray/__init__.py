"""Async REST clients for a Ray head (Jobs, Serve, cluster status), over httpx only.

The operator never imports ``ray``: it talks to each cluster's dashboard over HTTP with the
cluster's token. Entry point: :class:`RayClient`; addresses: :class:`HeadEndpoints`.
"""

from ._http import DEFAULT_DEADLINE_S, DEFAULT_MAX_BODY, NO_RETRY, RayResponse, RetryPolicy, pooled_client
from .client import RayClient
from .cluster import ClusterStatus, GangDemand, RayNode, ResourceDemand, parse_cluster_status, parse_nodes
from .endpoints import HeadEndpoints, ServeRoute, serve_route, submission_id
from .errors import (
    RayAPIError,
    RayAuthError,
    RayBadResponse,
    RayDeadlineExceeded,
    RayError,
    RayHeadUnavailable,
    RayNotFound,
    RayResponseTooLarge,
)
from .jobs import JobInfo, JobStatus, Submission, parse_job, tail_text
from .serve import (
    DeploymentStatus,
    ServeApplication,
    ServeInstance,
    parse_serve_details,
    remove_app_config,
    upsert_app_config,
)

__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_MAX_BODY",
    "NO_RETRY",
    "ClusterStatus",
    "DeploymentStatus",
    "GangDemand",
    "HeadEndpoints",
    "JobInfo",
    "JobStatus",
    "RayAPIError",
    "RayAuthError",
    "RayBadResponse",
    "RayClient",
    "RayDeadlineExceeded",
    "RayError",
    "RayHeadUnavailable",
    "RayNode",
    "RayNotFound",
    "RayResponse",
    "RayResponseTooLarge",
    "ResourceDemand",
    "RetryPolicy",
    "ServeApplication",
    "ServeInstance",
    "ServeRoute",
    "Submission",
    "parse_cluster_status",
    "parse_job",
    "parse_nodes",
    "parse_serve_details",
    "pooled_client",
    "remove_app_config",
    "serve_route",
    "submission_id",
    "tail_text",
    "upsert_app_config",
]
