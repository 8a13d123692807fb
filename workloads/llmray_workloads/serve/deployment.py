"""The Ray Serve deployment: one replica = one engine + the OpenAI FastAPI app as its ingress.

The app is built per replica (``__serve_build_asgi_app__``) because it closes over the replica's
engine. Serve's own health checks call :meth:`LLMServer.check_health`, so a replica whose
generation loop died is replaced.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ray.serve import Application

from llmray.api.runtime import ServeUserConfig
from ray import serve

from ..train.export import read_model_version
from .api import OpenAIServer, create_app
from .config import DEPLOYMENT_NAME, ServerSettings, resolve_api_key
from .engine import TransformersEngine
from .engine_process import IN_PROCESS_ENV, ProcessEngine
from .protocol import MAX_CHOICES
from .telemetry import CACHE, RUNNING, WAITING, ReplicaReporter


def replica_identity() -> tuple[str, str]:
    """``(replica id, application name)`` inside a Serve replica; placeholders outside one."""
    try:
        context = serve.get_replica_context()
        return str(context.replica_id.unique_id), str(context.app_name)
    except Exception:
        return f"pid-{os.getpid()}", "default"


logger = logging.getLogger(__name__)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class LLMServer:
    """A Serve replica serving one model with the transformers engine."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = ServerSettings.model_validate(settings)
        # The version this replica loads: what the export recorded next to the weights (the truth
        # even if the folder changed since the config was written), else what the config says.
        loaded = read_model_version(self.settings.engine.model_source)
        if loaded:
            self.settings = self.settings.model_copy(
                update={"api": self.settings.api.model_copy(update={"model_version": loaded})}
            )
        api = self.settings.api
        # Fail before loading weights when a configured key is missing: never serve unauthenticated.
        self.api_key = resolve_api_key(api.api_key_env, api.api_key_file, os.environ)
        max_pending = max(self.settings.engine.max_num_seqs, api.max_ongoing_requests * MAX_CHOICES)
        # The engine runs in a child process unless LLMRAY_ENGINE_IN_PROCESS=1 (see engine_process).
        in_process = os.environ.get(IN_PROCESS_ENV) == "1"
        engine_class = TransformersEngine if in_process else ProcessEngine
        self.engine = engine_class.load(self.settings.engine, max_pending=max_pending)
        # The pod's Ray token (RAY_AUTH_TOKEN, set by the operator) also opens the stats route.
        self.server = OpenAIServer(
            self.engine, api, self.api_key, stats_token=os.environ.get("RAY_AUTH_TOKEN")
        )
        replica, app_name = replica_identity()
        self.reporter = ReplicaReporter(
            replica, app_name, api.served_model_name, self.engine.counters, self.server.requests, self._load
        )
        self.server.stats = self.reporter.stats
        self.reporter.start()

    def _load(self) -> dict[str, float]:
        running, waiting, cache = self.engine.current_load()
        return {RUNNING: running, WAITING: waiting, CACHE: cache}

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply the deployment's ``user_config`` (:class:`ServeUserConfig`): the LoRA adapters.

        Serve calls this after ``__init__`` and again on the *running* replica whenever the
        user_config changes, so adapters come and go without a restart. An adapter that fails to
        load is logged and left out (requests for it get 404); it never fails the replica, which
        would take the base model and the other adapters down with it.
        """
        config = ServeUserConfig.model_validate(user_config or {})
        wanted = {a.name: a.source for a in config.adapters}
        errors = await asyncio.to_thread(self.engine.set_adapters, wanted)
        for message in errors.values():
            logger.error("%s", message)
        logger.info("serving adapters %s", self.engine.adapters())

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.server)

    def check_health(self) -> None:
        self.engine.check_health()

    def __del__(self) -> None:
        reporter = getattr(self, "reporter", None)
        if reporter is not None:
            reporter.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def build_transformers_app(
    settings: ServerSettings, options: dict[str, Any], runtime_env: dict[str, Any] | None = None
) -> Application:
    """Bind the deployment with Serve ``options`` (see :func:`.config.deployment_options`).

    ``runtime_env`` is merged into the replica's actor options (tests use it to hand replicas an
    API key variable; in clusters the operator sets it on the pods instead).
    """
    opts = dict(options)
    if runtime_env:
        opts["ray_actor_options"] = {**opts.get("ray_actor_options", {}), "runtime_env": runtime_env}
    deployment: Any = LLMServer
    app: Application = deployment.options(**opts).bind(settings.model_dump(mode="json"))
    return app
