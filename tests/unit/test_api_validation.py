"""The pydantic models: examples are valid, cross-field rules mirror the CRD's CEL rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from llmray.api import LLMDeploymentSpec, LLMTrainingJobSpec, local_path, pvc_claim

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODELS = {"LLMTrainingJob": LLMTrainingJobSpec, "LLMDeployment": LLMDeploymentSpec}


def _docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in MODELS:
                out.append((path.name, doc))
    return out


def test_every_example_kind_is_present() -> None:
    names = {name for name, _ in _docs()}
    assert {
        "training-qwen-lora.yaml",
        "deployment-vllm.yaml",
        "training-tiny-cpu.yaml",
        "deployment-tiny-cpu.yaml",
        "deployment-from-training.yaml",
    } <= names


@pytest.mark.parametrize(("name", "doc"), _docs(), ids=[f"{n}:{d['metadata']['name']}" for n, d in _docs()])
def test_examples_are_valid(name: str, doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "llmray.io/v1alpha1"
    MODELS[doc["kind"]].model_validate(doc["spec"])
    assert len(doc["metadata"]["name"]) <= 50


TRAIN = {"model": {"uri": "hf://a/b"}, "dataset": {"uri": "file:///d.jsonl"}, "output": {"uri": "file:///o"}}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"lora": {"r": 4}}, "spec.lora may only be set when spec.method is lora"),
        ({"dataset": {"uri": "file:///d", "format": "chat", "packing": True}}, "packing"),
        ({"distributed": {"strategy": "fsdp"}}, "fsdp"),
        ({"hyperparameters": {"precision": "fp16"}}, "fp16"),
        ({"workers": {"replicas": 0}}, "greater than or equal to 1"),
        ({"model": {"uri": "ftp://x"}}, "pattern"),
        ({"method": "qlora"}, "'full' or 'lora'"),
        ({"unknownField": 1}, "Extra inputs"),
        ({"objectStorage": {"endpoint": "minio:9000"}}, "pattern"),
        ({"objectStorage": {"region": "US East"}}, "pattern"),
        ({"objectStorage": {"secretRef": {"name": "s3", "key": "x"}}}, "Extra inputs"),
    ],
)
def test_training_rules(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LLMTrainingJobSpec.model_validate({**TRAIN, **patch})


def test_object_storage_spec() -> None:
    spec = LLMTrainingJobSpec.model_validate(
        {
            **TRAIN,
            "model": {"uri": "s3://models/base"},
            "output": {"uri": "s3://models/out"},
            "objectStorage": {"secretRef": {"name": "s3"}, "endpoint": "http://minio:9000", "region": "eu-1"},
        }
    )
    assert spec.checkpoint_uri() == "s3://models/out/checkpoints"
    assert spec.object_storage is not None and spec.object_storage.endpoint == "http://minio:9000"
    deploy = LLMDeploymentSpec.model_validate({"model": {"uri": "gs://b/m"}, "objectStorage": {}})
    assert deploy.object_storage is not None and deploy.object_storage.secret_ref is None


def test_training_defaults() -> None:
    spec = LLMTrainingJobSpec.model_validate({**TRAIN, "method": "lora"})
    assert spec.effective_lora() is not None
    assert spec.checkpoint_uri() == "file:///o/checkpoints"
    assert spec.workers.replicas == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"model": {}}, "exactly one of spec.model.uri and spec.model.fromTrainingJob"),
        ({"model": {"uri": "hf://a/b", "fromTrainingJob": "x"}}, "exactly one"),
        ({"model": {"uri": "hf://a/b"}, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas"),
        ({"model": {"uri": "hf://a/b"}, "workers": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas"),
        (
            {"model": {"uri": "hf://a/b"}, "engine": "vllm", "resourcesPerReplica": {"gpu": 0}},
            "tensorParallelSize",
        ),
        (
            {
                "model": {"uri": "hf://a/b"},
                "resourcesPerReplica": {"gpu": 2},
                "workers": {"resources": {"gpu": 1}},
            },
            "fit on one worker pod",
        ),
        ({"model": {"uri": "hf://a/b"}, "workers": {"maxReplicas": 0}}, "maxReplicas must be >= 1"),
    ],
)
def test_deployment_rules(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LLMDeploymentSpec.model_validate(spec)


def test_scale_to_zero_needs_no_workers() -> None:
    spec = LLMDeploymentSpec.model_validate(
        {"model": {"uri": "hf://a/b"}, "autoscaling": {"minReplicas": 0}, "workers": {"maxReplicas": 0}}
    )
    assert spec.autoscaling.min_replicas == 0


def test_uris() -> None:
    assert pvc_claim("pvc://models/a/b") == "models"
    assert local_path("pvc://models/a/b") == "/mnt/pvc/models/a/b"
    assert local_path("file:///x/y") == "/x/y"
    assert local_path("hf://a/b") is None
