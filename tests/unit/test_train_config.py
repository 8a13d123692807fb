"""TrainingRun parsing and plan resolution: pure rules, every error naming its field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmray.builders.common import cpu_count
from llmray_workloads.train.config import (
    ConfigError,
    check_capacity,
    cpu_quantity,
    parse_run,
    read_config,
    resolve_plan,
    resolve_precision,
    workers_that_fit,
)

pytestmark = pytest.mark.unit


def run_dict(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": "file:///models/tiny"},
        "dataset": {"uri": "pvc://data/sets/train.jsonl"},
        "output": {"uri": "pvc://models/out/run"},
    }
    return {"name": "job", "namespace": "team", "spec": {**base, **spec}}


def test_parse_json_and_yaml() -> None:
    as_json = parse_run(json.dumps(run_dict()))
    as_yaml = parse_run(
        "name: job\nnamespace: team\nspec:\n  model: {uri: 'file:///models/tiny'}\n"
        "  dataset: {uri: 'pvc://data/sets/train.jsonl'}\n  output: {uri: 'pvc://models/out/run'}\n"
    )
    assert as_json == as_yaml


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "expected a TrainingRun object"),
        ("name: [unclosed", "neither valid JSON nor YAML"),
        (json.dumps({"spec": run_dict()["spec"]}), "name: Field required"),
        (json.dumps(run_dict(hyperparameters={"maxSeqLength": 4})), "spec.hyperparameters.maxSeqLength"),
        (json.dumps(run_dict(method="full", lora={"r": 4})), "spec.lora may only be set"),
        (json.dumps(run_dict(bogus=1)), "spec.bogus: Extra inputs are not permitted"),
    ],
)
def test_parse_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"invalid TrainingRun|TrainingRun object|JSON nor YAML") as err:
        parse_run(text)
    assert message in str(err.value)


def test_read_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config: cannot read"):
        read_config(str(tmp_path / "nope.json"))
    assert read_config("-", json.dumps(run_dict())).name == "job"


def test_plan_paths_run_name_and_resources() -> None:
    spec_extra = {
        "workers": {"replicas": 3, "resources": {"cpu": "500m", "gpu": 2}},
        "failurePolicy": {"maxRestarts": 3},
    }
    run = parse_run(json.dumps({**run_dict(**spec_extra), "attempt": 1}))
    plan = resolve_plan(run)
    assert plan.run_name == "team.job"
    assert plan.model_ref == "/models/tiny" and not plan.model_is_hub
    assert plan.dataset_ref == "/mnt/pvc/data/sets/train.jsonl"
    assert plan.output_dir == "/mnt/pvc/models/out/run"
    assert plan.storage_path == "/mnt/pvc/models/out/run/checkpoints"  # default: output + /checkpoints
    assert plan.run_dir == "/mnt/pvc/models/out/run/checkpoints/team.job"
    assert plan.checkpoint_path("checkpoint-000010").endswith("team.job/checkpoint-000010")
    # One Train worker per GPU: 3 pods x 2 GPUs; the pod's one CPU (500m -> 1) split in two.
    assert plan.resources_per_worker == {"CPU": 0.5, "GPU": 1.0} and plan.use_gpu
    assert plan.num_workers == 6
    assert plan.max_failures == 0  # retries are the operator's (status.restarts)


@pytest.mark.parametrize(
    ("pods", "cpu", "gpu", "workers", "per_worker"),
    [
        (2, "4", 0, 2, {"CPU": 4.0}),  # CPU pods: one worker per pod, all its CPUs
        (1, "500m", 0, 1, {"CPU": 1.0}),
        (1, "8", 1, 1, {"CPU": 8.0, "GPU": 1.0}),
        (2, "32", 8, 16, {"CPU": 4.0, "GPU": 1.0}),  # 8-GPU pods: 8 workers each, CPUs split
        (3, "10", 4, 12, {"CPU": 2.0, "GPU": 1.0}),  # 10 // 4: whole CPUs, the rest unused
        (1, "2", 4, 4, {"CPU": 0.5, "GPU": 1.0}),  # fewer CPUs than GPUs: fractional shares
    ],
)
def test_one_train_worker_per_gpu_with_an_equal_cpu_share(
    pods: int, cpu: str, gpu: int, workers: int, per_worker: dict[str, float]
) -> None:
    run = parse_run(json.dumps(run_dict(workers={"replicas": pods, "resources": {"cpu": cpu, "gpu": gpu}})))
    plan = resolve_plan(run)
    assert (plan.num_workers, plan.resources_per_worker) == (workers, per_worker)
    # The pod's workers fit it exactly: what Ray sees on one worker pod holds all of them.
    node = {"CPU": float(cpu_count(cpu)), "GPU": float(gpu)}  # what `ray start` advertises
    assert workers_that_fit([node] * pods, plan.resources_per_worker) >= workers
    if gpu:
        assert workers_that_fit([node], plan.resources_per_worker) == gpu


def test_checkpoints_belong_to_one_resource_incarnation() -> None:
    """A deleted and recreated job (same namespace and name, new uid) never sees the old checkpoints."""
    from datetime import UTC, datetime

    from llmray.api.training import LLMTrainingJobSpec
    from llmray.controllers.cluster import Pass
    from llmray.controllers.training import _training_run

    spec = LLMTrainingJobSpec.model_validate(run_dict()["spec"])

    def submitted(uid: str) -> str:
        body = {"metadata": {"name": "job", "namespace": "team", "uid": uid}}
        p = Pass(
            key=("LLMTrainingJob", "team", "job"), body=body, status=None, at=datetime.now(UTC), spec=spec
        )
        return resolve_plan(parse_run(_training_run(p, 0).model_dump_json(by_alias=True))).run_dir

    first, again, recreated = submitted("uid-1"), submitted("uid-1"), submitted("uid-2")
    assert first == again == "/mnt/pvc/models/out/run/checkpoints/team.job.uid-1"  # every attempt
    assert recreated == "/mnt/pvc/models/out/run/checkpoints/team.job.uid-2"
    assert (
        resolve_plan(parse_run(json.dumps({**run_dict(), "name": "a.b", "uid": "u"}))).run_name
        == "team.a.b.u"
    )


def test_plan_hub_and_object_store_uris() -> None:
    run = parse_run(
        json.dumps(
            run_dict(
                model={"uri": "hf://Qwen/Qwen2.5-0.5B"},
                dataset={"uri": "hf://org/set"},
                checkpoint={"storageUri": "s3://bucket/ckpt"},
            )
        )
    )
    plan = resolve_plan(run)
    assert (plan.model_ref, plan.model_is_hub) == ("Qwen/Qwen2.5-0.5B", True)
    assert (plan.dataset_ref, plan.dataset_is_hub) == ("org/set", True)
    assert plan.storage_path == "s3://bucket/ckpt"  # Ray Train writes object stores itself
    assert plan.storage_is_remote and plan.run_dir == "s3://bucket/ckpt/team.job"
    assert (plan.model_uri, plan.dataset_uri, plan.output_uri) == (None, None, None)


def test_plan_object_store_model_dataset_output() -> None:
    run = parse_run(
        json.dumps(
            run_dict(
                model={"uri": "s3://models/base/"},
                dataset={"uri": "gs://data/train.jsonl"},
                output={"uri": "s3://models/out/run/"},
                objectStorage={"endpoint": "http://minio.minio.svc:9000", "region": "eu-1"},
            )
        )
    )
    plan = resolve_plan(run, environ={})
    assert (plan.model_uri, plan.model_is_hub) == ("s3://models/base/", False)
    assert plan.dataset_uri == "gs://data/train.jsonl"
    assert plan.output_uri == "s3://models/out/run" and plan.output_location == plan.output_uri
    assert not plan.output_dir.startswith("s3:")  # local scratch where rank 0 stages the model
    # the default checkpoint location follows the output into the bucket
    assert plan.storage_path == "s3://models/out/run/checkpoints" and plan.storage_is_remote
    assert (plan.store.endpoint, plan.store.region) == ("http://minio.minio.svc:9000", "eu-1")


def test_plan_store_settings_fall_back_to_the_pod_environment() -> None:
    run = parse_run(json.dumps(run_dict(output={"uri": "s3://b/out"})))
    env = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000", "AWS_REGION": "us-west-2"}
    plan = resolve_plan(run, environ=env)
    assert (plan.store.endpoint, plan.store.region) == ("http://127.0.0.1:9000", "us-west-2")
    assert resolve_plan(run, environ={}).store.endpoint is None


def test_overrides_win() -> None:
    run = parse_run(json.dumps({**run_dict(), "storagePath": "/ckpt", "outputPath": "/out"}))
    plan = resolve_plan(run)
    assert (plan.storage_path, plan.output_dir) == ("/ckpt", "/out")


@pytest.mark.parametrize(("value", "cores"), [("4", 4.0), ("500m", 0.5), ("1.5", 1.5)])
def test_cpu_quantity(value: str, cores: float) -> None:
    assert cpu_quantity(value) == cores


@pytest.mark.parametrize("value", ["2Gi", "0", "0m"])
def test_cpu_quantity_rejects(value: str) -> None:
    with pytest.raises(ConfigError, match=r"spec.workers.resources.cpu"):
        cpu_quantity(value)


@pytest.mark.parametrize(
    ("requested", "cuda", "bf16", "expected"),
    [
        ("auto", True, True, "bf16"),
        ("auto", True, False, "fp32"),
        ("auto", False, False, "fp32"),
        ("bf16", False, False, "fp32"),
        ("bf16", True, True, "bf16"),
        ("fp16", True, False, "fp16"),
        ("fp32", True, True, "fp32"),
    ],
)
def test_precision(requested: str, cuda: bool, bf16: bool, expected: str) -> None:
    assert resolve_precision(requested, cuda, bf16) == expected


def test_precision_errors() -> None:
    with pytest.raises(ConfigError, match=r"fp16 needs GPU"):
        resolve_precision("fp16", False, False)
    with pytest.raises(ConfigError, match=r"bf16 is not supported"):
        resolve_precision("bf16", True, False)


def test_capacity() -> None:
    nodes = [{"CPU": 8.0}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 2.0}]
    assert workers_that_fit(nodes, {"CPU": 4.0}) == 2 + 1 + 4
    assert workers_that_fit(nodes, {"CPU": 4.0, "GPU": 1.0}) == 1 + 2
    assert workers_that_fit(nodes, {"CPU": 1.0, "GPU": 4.0}) == 0
    plan = resolve_plan(
        parse_run(json.dumps(run_dict(workers={"replicas": 4, "resources": {"cpu": "4", "gpu": 1}})))
    )
    with pytest.raises(
        ConfigError, match=r"spec.workers: 4 worker\(s\) of \{CPU 4, GPU 1\}.*GPU 3.*room for 3"
    ):
        check_capacity(nodes, plan)
    check_capacity([*nodes, {"CPU": 4.0, "GPU": 1.0}], plan)
