"""The ``vllm`` engine: Ray Serve LLM (``LLMConfig`` + ``build_openai_app``) on GPUs.

Ray Serve LLM brings vLLM's batching, paged KV cache and its own OpenAI ingress; we only translate
the spec. The config is built as a plain dict (pure, testable without vLLM) and validated by
``LLMConfig`` only where ``ray.serve.llm`` imports (it needs vLLM installed).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from llmray.api.runtime import ServeAppArgs

from .config import autoscaling_config, model_source, served_model_name


def vllm_engine_kwargs(args: ServeAppArgs) -> dict[str, Any]:
    """vLLM engine arguments from ``spec.engineArgs``; ``extra`` is passed through and wins."""
    engine = args.spec.engine_args
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": engine.tensor_parallel_size,
        "dtype": engine.dtype,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "max_num_seqs": engine.max_num_seqs,
    }
    if engine.max_model_len is not None:
        kwargs["max_model_len"] = engine.max_model_len
    kwargs.update(engine.extra)
    return kwargs


def vllm_llm_config(args: ServeAppArgs) -> dict[str, Any]:
    """The ``LLMConfig`` (as a dict) for one model served by Ray Serve LLM."""
    spec = args.spec
    return {
        "model_loading_config": {"model_id": served_model_name(args), "model_source": model_source(args)},
        "engine_kwargs": vllm_engine_kwargs(args),
        "deployment_config": {
            "autoscaling_config": autoscaling_config(spec.autoscaling),
            "max_ongoing_requests": spec.limits.max_ongoing_requests,
            "max_queued_requests": max(1, spec.limits.max_queued_requests),
        },
    }


def vllm_available() -> bool:
    """Whether vLLM is installed (``ray.serve.llm`` needs it); checked without importing either."""
    return importlib.util.find_spec("vllm") is not None


def build_vllm_app(args: ServeAppArgs) -> Any:
    """The Ray Serve LLM OpenAI application for ``args``.

    Ray Serve LLM's ingress has no API-key check we can hook, so a configured key fails closed
    here rather than serving an open endpoint.
    """
    if args.api_key_env:
        raise ValueError(
            "engine vllm does not support spec.apiKeySecretRef yet; use engine transformers or "
            "remove the API key"
        )
    if not vllm_available():
        raise RuntimeError("engine vllm needs vLLM in the runtime image (ray.serve.llm requires it)")
    from ray.serve.llm import LLMConfig, build_openai_app

    config = LLMConfig(**vllm_llm_config(args))
    return build_openai_app({"llm_configs": [config]})
