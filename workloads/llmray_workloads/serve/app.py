"""Serve application builder: ``llmray_workloads.serve.app:build_app``.

The operator deploys ``{"import_path": SERVE_APP_IMPORT_PATH, "args": ServeAppArgs}`` through
``PUT /api/serve/applications/``; ``serve run llmray_workloads.serve.app:build_app name=... ``
and config files use the same builder. ``args`` is validated with the shared
:class:`llmray.api.runtime.ServeAppArgs`, so operator and workload cannot disagree on its shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmray.api.runtime import ServeAppArgs

from .config import deployment_options, server_settings

if TYPE_CHECKING:  # importing ray is deferred to the builders (cheap imports for config checks)
    from ray.serve import Application


def parse_args(args: dict[str, Any] | ServeAppArgs) -> ServeAppArgs:
    """Validate builder args (camelCase as the operator sends them, or snake_case)."""
    return args if isinstance(args, ServeAppArgs) else ServeAppArgs.model_validate(args)


def build_app(args: dict[str, Any]) -> Application:
    """The OpenAI-compatible application for one LLMDeployment (engine chosen by ``spec.engine``)."""
    return build_app_from(parse_args(args))


def build_app_from(args: ServeAppArgs, runtime_env: dict[str, Any] | None = None) -> Application:
    """Like :func:`build_app`, from parsed args; ``runtime_env`` goes to the replicas (tests, CLI)."""
    if args.spec.engine == "vllm":
        from .vllm import build_vllm_app

        app: Application = build_vllm_app(args)
        return app
    from .deployment import build_transformers_app

    return build_transformers_app(server_settings(args), deployment_options(args.spec), runtime_env)
