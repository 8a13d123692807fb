"""Spec -> Serve options and replica settings (pure), and the vLLM config dict."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from llmray.api.runtime import ServeAppArgs
from llmray_workloads.serve.app import parse_args
from llmray_workloads.serve.config import (
    ApiKeyMissingError,
    autoscaling_config,
    deployment_options,
    model_source,
    parse_quantity,
    ray_actor_options,
    resolve_api_key,
    served_model_name,
    server_settings,
)
from llmray_workloads.serve.vllm import build_vllm_app, vllm_available, vllm_llm_config

pytestmark = pytest.mark.unit


def args(spec: dict[str, Any] | None = None, **extra: Any) -> ServeAppArgs:
    base: dict[str, Any] = {"model": {"uri": "file:///models/tiny"}}
    return ServeAppArgs.model_validate({"name": "demo", "spec": {**base, **(spec or {})}, **extra})


@pytest.mark.parametrize(
    ("quantity", "value"),
    [
        ("1", 1.0),
        ("500m", 0.5),
        ("2.5", 2.5),
        ("4Gi", 4 * 2**30),
        ("1G", 1e9),
        ("512Mi", 512 * 2**20),
        (3, 3.0),
    ],
)
def test_parse_quantity(quantity: str | int, value: float) -> None:
    assert parse_quantity(quantity) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["", "1.2.3", "-1", "4GB", "lots"])
def test_parse_quantity_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity(bad)


def test_ray_actor_options_from_resources() -> None:
    spec = args({"resourcesPerReplica": {"cpu": "1500m", "gpu": 1, "memory": "8Gi"}}).spec
    assert ray_actor_options(spec.resources_per_replica) == {
        "num_cpus": 1.5,
        "num_gpus": 1,
        "memory": 8 * 2**30,
    }


def test_autoscaling_config_maps_the_spec() -> None:
    spec = args(
        {
            "autoscaling": {
                "minReplicas": 2,
                "maxReplicas": 5,
                "targetOngoingRequests": 3,
                "upscaleDelaySeconds": 4,
                "downscaleDelaySeconds": 30,
            }
        }
    ).spec
    config = autoscaling_config(spec.autoscaling)
    assert {k: config[k] for k in ("min_replicas", "max_replicas", "target_ongoing_requests")} == {
        "min_replicas": 2,
        "max_replicas": 5,
        "target_ongoing_requests": 3,
    }
    assert (config["upscale_delay_s"], config["downscale_delay_s"]) == (4, 30)
    assert config["metrics_interval_s"] == 2
    assert config["look_back_period_s"] == 4


@pytest.mark.parametrize(("up", "down"), [(0, 0), (1, 2), (10, 60), (3600, 86400)])
def test_autoscaling_windows_stay_in_serve_bounds(up: float, down: float) -> None:
    """Serve wants look_back_period_s > metrics_interval_s (checked against Serve in tests/ray)."""
    spec = args({"autoscaling": {"upscaleDelaySeconds": up, "downscaleDelaySeconds": down}}).spec
    config = autoscaling_config(spec.autoscaling)
    assert 0.5 <= config["metrics_interval_s"] <= 10
    assert config["metrics_interval_s"] < config["look_back_period_s"] <= 30


def test_deployment_options_limits_and_backpressure() -> None:
    spec = args({"limits": {"maxOngoingRequests": 7, "maxQueuedRequests": 0}}).spec
    options = deployment_options(spec)
    assert options["max_ongoing_requests"] == 7
    assert options["max_queued_requests"] == 1  # Serve cannot express an empty queue
    assert options["backpressure_config"] == {"status_code": 503, "retry_after_s": 1.0}
    assert options["ray_actor_options"]["num_cpus"] == 1.0
    # A new model version rolls over with new replicas up before the old ones stop.
    assert options["max_surge_percent"] == 100


@pytest.mark.parametrize(
    ("uri", "source"),
    [
        ("file:///models/x", "/models/x"),
        ("pvc://models/run-1/final", "/mnt/pvc/models/run-1/final"),
        ("hf://Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
    ],
)
def test_model_source(uri: str, source: str) -> None:
    assert model_source(args({"model": {"uri": uri}})) == source


def test_model_path_overrides_uri() -> None:
    assert model_source(args(modelPath="/out/final")) == "/out/final"


def test_training_job_model_needs_a_resolved_path() -> None:
    with pytest.raises(ValueError, match="modelPath"):
        model_source(args({"model": {"fromTrainingJob": "train-1"}}))
    assert model_source(args({"model": {"fromTrainingJob": "train-1"}}, modelPath="/o")) == "/o"


def test_object_store_models_are_downloaded_by_the_replica() -> None:
    spec = {"model": {"uri": "s3://bucket/model"}, "objectStorage": {"endpoint": "http://s3.local:9000"}}
    assert model_source(args(spec)) == "s3://bucket/model"
    engine = server_settings(args(spec)).engine
    assert (engine.model_source, engine.store_endpoint) == ("s3://bucket/model", "http://s3.local:9000")
    # a training job's object-store output, resolved by the operator
    assert model_source(args({"model": {"fromTrainingJob": "t"}}, modelPath="gs://b/out")) == "gs://b/out"
    # vLLM: Ray Serve LLM downloads bucket models itself
    gpu = {"resourcesPerReplica": {"gpu": 1}, "workers": {"resources": {"gpu": 1}}}
    loading = vllm_llm_config(args({**spec, **gpu, "engine": "vllm"}))["model_loading_config"]
    assert loading["model_source"] == {"bucket_uri": "s3://bucket/model"}


def test_served_model_name_defaults_to_resource_name() -> None:
    assert served_model_name(args()) == "demo"
    assert served_model_name(args({"model": {"uri": "file:///m", "name": "org/model:v1"}})) == "org/model:v1"


def test_server_settings() -> None:
    a = args(
        {
            "engineArgs": {"maxModelLen": 256, "maxNumSeqs": 8, "batchWaitTimeoutMs": 3, "dtype": "float32"},
            "resourcesPerReplica": {"cpu": "2500m", "memory": "1Gi"},
            "limits": {"maxPromptTokens": 100, "maxTokens": 50, "maxOngoingRequests": 9},
        },
        apiKeyEnv="LLMRAY_API_KEY",
    )
    settings = server_settings(a)
    assert settings.engine.model_source == "/models/tiny"
    assert settings.engine.device == "cpu"
    assert (settings.engine.max_model_len, settings.engine.max_num_seqs) == (256, 8)
    assert settings.engine.batch_wait_timeout_ms == 3
    assert settings.engine.torch_threads == 3
    assert settings.api.served_model_name == "demo"
    assert (settings.api.max_prompt_tokens, settings.api.max_tokens, settings.api.max_ongoing_requests) == (
        100,
        50,
        9,
    )
    assert settings.api.api_key_env == "LLMRAY_API_KEY"
    assert settings.api.model_version == ""
    assert type(settings).model_validate(settings.model_dump(mode="json")) == settings
    assert server_settings(a.model_copy(update={"model_version": "v7"})).api.model_version == "v7"


def test_gpu_replicas_use_cuda() -> None:
    spec = {"resourcesPerReplica": {"gpu": 1, "cpu": "4", "memory": "16Gi"}}
    assert server_settings(args(spec)).engine.device == "cuda"


def test_parse_args_accepts_operator_wire_format() -> None:
    wire = args({"engineArgs": {"maxNumSeqs": 4}}).to_wire()
    assert parse_args(wire).spec.engine_args.max_num_seqs == 4


def test_api_key_sources(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key(None, None, {}) is None
    assert resolve_api_key("K", None, {"K": " s3cret "}) == "s3cret"
    assert resolve_api_key("K", None, {"K_FILE": str(key_file)}) == "from-file"
    assert resolve_api_key(None, str(key_file), {}) == "from-file"


@pytest.mark.parametrize("environ", [{}, {"K": ""}, {"K": "  "}, {"K_FILE": "/nonexistent/key"}])
def test_configured_but_missing_api_key_fails_closed(environ: dict[str, str]) -> None:
    with pytest.raises(ApiKeyMissingError, match=r"\$K"):
        resolve_api_key("K", None, environ)


def test_vllm_llm_config() -> None:
    a = args(
        {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B", "name": "qwen"},
            "engine": "vllm",
            "engineArgs": {
                "tensorParallelSize": 2,
                "maxModelLen": 4096,
                "dtype": "bfloat16",
                "gpuMemoryUtilization": 0.8,
                "maxNumSeqs": 128,
                "extra": {"enable_prefix_caching": True, "enforce_eager": True},
            },
            "resourcesPerReplica": {"gpu": 2, "cpu": "8", "memory": "64Gi"},
            "workers": {"resources": {"gpu": 2}},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 3},
            "limits": {"maxOngoingRequests": 64, "maxQueuedRequests": 128},
        }
    )
    config = vllm_llm_config(a)
    assert config["model_loading_config"] == {"model_id": "qwen", "model_source": "Qwen/Qwen2.5-0.5B"}
    assert config["engine_kwargs"] == {
        "tensor_parallel_size": 2,
        "dtype": "bfloat16",
        "gpu_memory_utilization": 0.8,
        "max_num_seqs": 128,
        "max_model_len": 4096,
        "enable_prefix_caching": True,  # allowlisted extra keys are passed through
        "enforce_eager": True,
    }
    deployment = config["deployment_config"]
    assert deployment["autoscaling_config"]["max_replicas"] == 3
    assert (deployment["max_ongoing_requests"], deployment["max_queued_requests"]) == (64, 128)


def test_vllm_max_model_len_is_capped_by_the_request_limits() -> None:
    def max_model_len(engine_args: dict[str, Any]) -> Any:
        spec = {"engine": "vllm", "resourcesPerReplica": {"gpu": 1}, "engineArgs": engine_args}
        spec["limits"] = {"maxPromptTokens": 1000, "maxTokens": 200}
        return vllm_llm_config(args(spec))["engine_kwargs"]["max_model_len"]

    assert max_model_len({}) == 1200  # a prompt over maxPromptTokens cannot fit
    assert max_model_len({"maxModelLen": 800}) == 800
    assert max_model_len({"maxModelLen": 32768}) == 1200


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_without_vllm_says_what_is_missing() -> None:
    assert not vllm_available()
    with pytest.raises(RuntimeError, match="vLLM"):
        build_vllm_app(args({"engine": "vllm", "resourcesPerReplica": {"gpu": 1}}))
