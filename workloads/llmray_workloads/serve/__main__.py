"""Serve a local model by hand: ``python -m llmray_workloads.serve --model DIR [--port 8000]``.

Connects to the Ray cluster in ``--address`` / ``RAY_ADDRESS`` if given, else starts a local one,
then deploys the same application the operator deploys and blocks until interrupted.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from llmray.api.runtime import API_KEY_ENV, ServeAppArgs


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmray_workloads.serve", description=__doc__)
    parser.add_argument("--model", required=True, help="Hugging Face model folder (or hf://org/name).")
    parser.add_argument("--name", default="llm", help="Application name and default served model id.")
    parser.add_argument("--served-model-name", default=None, help="Model id clients send (default: --name).")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else local).")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=1)
    parser.add_argument("--target-ongoing-requests", type=float, default=8.0)
    parser.add_argument("--num-cpus", default="1", help="CPUs per replica (Kubernetes quantity).")
    parser.add_argument("--num-gpus", type=int, default=0, help="GPUs per replica.")
    parser.add_argument("--memory", default="2Gi", help="Memory per replica (Kubernetes quantity).")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="Sequences batched per replica.")
    parser.add_argument("--max-ongoing-requests", type=int, default=64)
    parser.add_argument("--max-queued-requests", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--api-key-file", default=None, help="File holding the API key clients must send.")
    return parser.parse_args(argv)


def app_args(ns: argparse.Namespace) -> ServeAppArgs:
    """The ServeAppArgs the operator would send for the same settings."""
    uri = ns.model if "://" in ns.model else f"file://{Path(ns.model).resolve()}"
    spec: dict[str, Any] = {
        "model": {"uri": uri, "name": ns.served_model_name or ns.name},
        "engine": ns.engine,
        "engineArgs": {"maxNumSeqs": ns.max_num_seqs},
        "autoscaling": {
            "minReplicas": ns.min_replicas,
            "maxReplicas": ns.max_replicas,
            "targetOngoingRequests": ns.target_ongoing_requests,
        },
        "resourcesPerReplica": {"cpu": ns.num_cpus, "gpu": ns.num_gpus, "memory": ns.memory},
        "workers": {"resources": {"gpu": ns.num_gpus}},
        "limits": {
            "maxPromptTokens": ns.max_prompt_tokens,
            "maxTokens": ns.max_tokens,
            "maxOngoingRequests": ns.max_ongoing_requests,
            "maxQueuedRequests": ns.max_queued_requests,
        },
    }
    return ServeAppArgs.model_validate(
        {"name": ns.name, "spec": spec, "apiKeyEnv": API_KEY_ENV if ns.api_key_file else None}
    )


def main(argv: list[str] | None = None) -> int:
    ns = parse_cli(argv)
    import ray
    from ray import serve

    from .app import build_app_from

    args = app_args(ns)
    runtime_env = None
    if ns.api_key_file:  # the key stays in its file; replicas read it via <VAR>_FILE
        runtime_env = {"env_vars": {f"{API_KEY_ENV}_FILE": str(Path(ns.api_key_file).resolve())}}
    ray.init(address=ns.address or os.environ.get("RAY_ADDRESS") or None)
    serve.start(http_options={"host": ns.host, "port": ns.port})
    app = build_app_from(args, runtime_env=runtime_env)
    print(f"serving {args.spec.model.name} at http://{ns.host}:{ns.port}/v1", flush=True)
    serve.run(app, name=ns.name, route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
