"""A tiny Ray Serve application for client tests; imported by Ray workers via PYTHONPATH.

``tests.ray.serve_dummy:build`` is an application builder: ``args`` (``{"message": ...}``) come
from the application config, so two apps of the same import path answer differently.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from starlette.requests import Request

from ray import serve


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Echo:
    """Answers every request with a fixed message."""

    def __init__(self, message: str) -> None:
        self.message = message

    async def __call__(self, request: Request) -> str:
        return self.message


def build(args: dict[str, Any]) -> Application:
    """Application builder: ``args["message"]`` is what the app answers."""
    return Echo.bind(str(args.get("message", "hello")))  # type: ignore[attr-defined]
