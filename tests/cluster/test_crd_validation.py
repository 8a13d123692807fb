"""The API server itself refuses bad resources (schema types, bounds, enums, CEL cross-field rules),
naming the field, and fills in defaults; kubectl explain and get read well."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.kube import Kube

from .test_operator_fixtures import assert_refused, dry_run, with_field

pytestmark = pytest.mark.cluster

TRAINING: dict[str, Any] = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "LLMTrainingJob",
    "metadata": {"name": "job"},
    "spec": {
        "model": {"uri": "file:///models/tiny"},
        "dataset": {"uri": "file:///data/train.jsonl"},
        "workers": {"replicas": 2, "resources": {"cpu": "1", "memory": "2Gi"}},
        "output": {"uri": "file:///out"},
    },
}
DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": "dep"},
    "spec": {"model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}},
}


def _t(path: str, value: Any) -> dict[str, Any]:
    return with_field(TRAINING, path, value)


def _d(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    return with_field(base or DEPLOYMENT, path, value)


# (id, manifest, text the error must contain: the field, and for CEL rules the rule's message)
INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    # wrong types
    ("replicas-string", _t("spec.workers.replicas", "two"), ["spec.workers.replicas", "integer"]),
    ("lr-string", _t("spec.hyperparameters.learningRate", "fast"), ["spec.hyperparameters.learningRate"]),
    ("suspend-string", _t("spec.suspend", "yes"), ["spec.suspend", "boolean"]),
    (
        "tolerations-object",
        _t("spec.workers.tolerations", {"key": "x"}),
        ["spec.workers.tolerations"],
    ),
    (
        "node-selector-int",
        _t("spec.workers.nodeSelector", {"a": 1}),
        ["spec.workers.nodeSelector.a", "string"],
    ),
    ("engine-args-list", _d("spec.engineArgs", ["a"]), ["spec.engineArgs", "object"]),
    # out of range
    (
        "replicas-zero",
        _t("spec.workers.replicas", 0),
        ["spec.workers.replicas", "greater than or equal to 1"],
    ),
    (
        "replicas-huge",
        _t("spec.workers.replicas", 5000),
        ["spec.workers.replicas", "less than or equal to 1024"],
    ),
    ("gpu-negative", _t("spec.workers.resources.gpu", -1), ["spec.workers.resources.gpu"]),
    ("lr-zero", _t("spec.hyperparameters.learningRate", 0), ["spec.hyperparameters.learningRate"]),
    ("dropout-one", _t("spec.lora", {"dropout": 1.0}), ["spec.lora.dropout"]),
    ("ttl-negative", _t("spec.ttlSecondsAfterFinished", -5), ["spec.ttlSecondsAfterFinished"]),
    ("every-steps-zero", _t("spec.checkpoint.everySteps", 0), ["spec.checkpoint.everySteps"]),
    ("port-too-big", _d("spec.service.port", 70000), ["spec.service.port", "65535"]),
    (
        "gpu-mem-util",
        _d("spec.engineArgs.gpuMemoryUtilization", 1.5),
        ["spec.engineArgs.gpuMemoryUtilization"],
    ),
    (
        "target-zero",
        _d("spec.autoscaling.targetOngoingRequests", 0),
        ["spec.autoscaling.targetOngoingRequests"],
    ),
    # patterns and required fields
    ("cpu-garbage", _t("spec.workers.resources.cpu", "lots"), ["spec.workers.resources.cpu"]),
    ("uri-scheme", _t("spec.model.uri", "ftp://models/x"), ["spec.model.uri"]),
    ("model-missing", _t("spec.model", None), ["spec.model", "Required value"]),
    ("output-missing", _t("spec.output", None), ["spec.output", "Required value"]),
    (
        "secret-ref-name",
        _d("spec.apiKeySecretRef", {"key": "k"}),
        ["spec.apiKeySecretRef.name", "Required value"],
    ),
    ("served-name", _d("spec.model.name", "my model"), ["spec.model.name"]),
    ("name-too-long", _t("metadata.name", "a" * 51), ["metadata.name must be at most 50 characters"]),
    ("name-digit", _t("metadata.name", "9job"), ["metadata.name must start with a letter"]),
    # unknown enum values
    ("method", _t("spec.method", "qlora"), ["spec.method", "Unsupported value"]),
    ("format", _t("spec.dataset.format", "csv"), ["spec.dataset.format", "Unsupported value"]),
    ("precision", _t("spec.hyperparameters.precision", "fp8"), ["spec.hyperparameters.precision"]),
    ("strategy", _t("spec.distributed.strategy", "deepspeed"), ["spec.distributed.strategy"]),
    ("pull-policy", _t("spec.imagePullPolicy", "Sometimes"), ["spec.imagePullPolicy"]),
    (
        "toleration-op",
        _t("spec.workers.tolerations", [{"key": "a", "operator": "Maybe"}]),
        ["spec.workers.tolerations[0].operator"],
    ),
    ("engine", _d("spec.engine", "tgi"), ["spec.engine", "Unsupported value"]),
    ("service-type", _d("spec.service.type", "ExternalName"), ["spec.service.type"]),
    # unknown fields (kubectl asks the server for strict field validation)
    ("unknown-field", _t("spec.epochs", 3), ["unknown field", "spec.epochs"]),
    # cross-field CEL rules
    ("lora-without-method", _t("spec.lora", {"r": 8}), ["spec.lora", "only be set when spec.method is lora"]),
    (
        "packing-needs-text",
        _t("spec.dataset", {"uri": "file:///d", "format": "chat", "packing": True}),
        ["spec.dataset.packing", "only supported with format text"],
    ),
    (
        "fsdp-one-worker",
        with_field(_t("spec.distributed.strategy", "fsdp"), "spec.workers.replicas", 1),
        ["spec.distributed.strategy", "fsdp needs at least 2 workers"],
    ),
    ("fp16-on-cpu", _t("spec.hyperparameters.precision", "fp16"), ["spec.hyperparameters.precision", "GPU"]),
    (
        "model-both",
        _d("spec.model", {"uri": "hf://a/b", "fromTrainingJob": "ft"}),
        ["spec.model", "exactly one of spec.model.uri and spec.model.fromTrainingJob"],
    ),
    ("model-neither", _d("spec.model", {"name": "x"}), ["spec.model", "exactly one"]),
    (
        "autoscaling-min-max",
        _d("spec.autoscaling", {"minReplicas": 3, "maxReplicas": 2}),
        ["spec.autoscaling.minReplicas", "must be <= spec.autoscaling.maxReplicas"],
    ),
    (
        "workers-min-max",
        _d("spec.workers", {"minReplicas": 5, "maxReplicas": 2}),
        ["spec.workers.minReplicas", "must be <= spec.workers.maxReplicas"],
    ),
    (
        "vllm-needs-gpu",
        _d("spec.engine", "vllm", _d("spec.resourcesPerReplica", {"gpu": 0})),
        ["spec.resourcesPerReplica.gpu", "tensorParallelSize"],
    ),
    (
        "replica-fits-worker",
        _d("spec.resourcesPerReplica", {"gpu": 2}, _d("spec.workers", {"resources": {"gpu": 1}})),
        ["spec.resourcesPerReplica.gpu", "fit on one worker pod"],
    ),
    (
        "replicas-need-workers",
        _d("spec.workers", {"maxReplicas": 0}),
        ["spec.workers.maxReplicas", "must be >= 1"],
    ),
    # tenant safety rules that do not depend on who asks (docs/operator.md, "Security model")
    (
        "engine-extra-trust-remote-code",
        _d("spec.engineArgs", {"extra": {"trust_remote_code": True}}),
        ["unknown field", "spec.engineArgs.extra.trust_remote_code"],
    ),
    (
        "engine-extra-worker-extension",
        _d("spec.engineArgs", {"extra": {"enforce_eager": True, "worker_extension_cls": "evil.X"}}),
        ["unknown field", "spec.engineArgs.extra.worker_extension_cls"],
    ),
    (
        "nodeport-without-key",
        _d("spec.service", {"type": "NodePort"}),
        ["spec.service.type", "spec.apiKeySecretRef, or spec.service.allowUnauthenticated: true"],
    ),
    (
        "loadbalancer-without-key",
        _d("spec.service", {"type": "LoadBalancer", "allowUnauthenticated": False}),
        ["spec.service.type", "exposes the endpoint outside the cluster"],
    ),
    (
        "allow-from-exposed",
        _d(
            "spec.service",
            {"type": "NodePort", "allowUnauthenticated": True, "allowFrom": [{"podSelector": {}}]},
        ),
        ["spec.service.allowFrom", "ClusterIP Service only"],
    ),
    (
        "storage-garbage",
        _t("spec.workers.storage", {"modelCache": "lots"}),
        ["spec.workers.storage.modelCache"],
    ),
    # spec.adapters (multi-LoRA)
    (
        "adapter-two-sources",
        _d("spec.adapters", [{"name": "a", "uri": "file:///a", "fromTrainingJob": "ft"}]),
        ["spec.adapters[0]", "exactly one of spec.adapters[].uri and spec.adapters[].fromTrainingJob"],
    ),
    (
        "adapter-bad-name",
        _d("spec.adapters", [{"name": "Bad_Name", "uri": "file:///a"}]),
        ["spec.adapters[0].name"],
    ),
    (
        "adapter-duplicate",
        _d("spec.adapters", [{"name": "a", "uri": "file:///a"}, {"name": "a", "uri": "file:///b"}]),
        ["spec.adapters[1]", "Duplicate value"],
    ),
    (
        "adapter-too-many",
        _d("spec.adapters", [{"name": f"a{i}", "uri": "file:///a"} for i in range(17)]),
        ["spec.adapters", "16"],
    ),
    (
        "adapter-is-base-name",
        _d("spec.adapters", [{"name": "chat", "uri": "file:///a"}], _d("spec.model.name", "chat")),
        ["spec.adapters", "must differ from spec.model.name"],
    ),
    (
        "adapter-is-resource-name",
        _d("spec.adapters", [{"name": "dep", "uri": "file:///a"}]),
        ["spec.adapters", "must differ from the base model's served name"],
    ),
]

# Accepted: the same exposure with a key or an explicit opt-out, allowlisted engine arguments.
VALID_SAFETY: list[tuple[str, dict[str, Any]]] = [
    (
        "nodeport-with-key",
        _d("spec.apiKeySecretRef", {"name": "k"}, _d("spec.service", {"type": "NodePort"})),
    ),
    ("nodeport-opt-out", _d("spec.service", {"type": "NodePort", "allowUnauthenticated": True})),
    ("engine-extra-allowed", _d("spec.engineArgs", {"extra": {"enable_prefix_caching": True, "seed": 1}})),
    ("allow-from", _d("spec.service", {"allowFrom": [{"namespaceSelector": {"matchLabels": {"a": "b"}}}]})),
    (
        "adapters",
        _d(
            "spec.adapters",
            [{"name": "sql", "uri": "pvc://loras/sql"}, {"name": "poet", "fromTrainingJob": "ft"}],
        ),
    ),
]


@pytest.mark.parametrize("manifest", [c[1] for c in VALID_SAFETY], ids=[c[0] for c in VALID_SAFETY])
def test_safe_variants_are_accepted(kube: Kube, crds: None, manifest: dict[str, Any]) -> None:
    proc = dry_run(kube, manifest)
    assert proc.returncode == 0, proc.stderr


def test_there_are_at_least_25_cases() -> None:
    assert len(INVALID) >= 25


@pytest.mark.parametrize(("manifest", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_resource_is_refused_naming_the_field(
    kube: Kube, crds: None, manifest: dict[str, Any], expected: list[str]
) -> None:
    assert_refused(kube, manifest, expected)


@pytest.mark.parametrize("manifest", [TRAINING, DEPLOYMENT], ids=["training", "deployment"])
def test_minimal_resources_are_accepted_with_defaults(
    kube: Kube, crds: None, manifest: dict[str, Any]
) -> None:
    proc = dry_run(kube, manifest)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["spec"]
    if manifest["kind"] == "LLMTrainingJob":
        assert spec["method"] == "full"
        assert spec["hyperparameters"]["epochs"] == 1
        assert spec["head"]["resources"] == {"gpu": 0, "cpu": "2", "memory": "8Gi"}
        assert spec["checkpoint"]["everySteps"] == 100
    else:
        assert spec["engine"] == "transformers"
        assert spec["autoscaling"]["minReplicas"] == 1 and spec["autoscaling"]["maxReplicas"] == 1
        assert spec["workers"]["resources"]["gpu"] == 1
        assert spec["service"] == {"type": "ClusterIP", "port": 8000, "allowUnauthenticated": False}
    storage = spec["workers"]["storage"]
    assert storage["ephemeralStorageLimit"] == "64Gi" and storage["modelCache"] == "40Gi"


def test_kubectl_explain_reads_well(kube: Kube, crds: None) -> None:
    out = kube.kubectl("explain", "llmtrainingjob.spec.workers.resources").stdout
    assert "NVIDIA GPUs" in out and "Kubernetes quantity" in out
    out = kube.kubectl("explain", "llmdeployment.spec.autoscaling").stdout
    assert "minReplicas" in out and "Fewest Serve replicas" in out


def test_short_names_category_and_columns(kube: Kube, crds: None, namespace: str) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([TRAINING, DEPLOYMENT]))
    out = kube.kubectl("get", "ltj,llmd", "-n", namespace).stdout
    header_t, header_d = [line for line in out.splitlines() if line.startswith("NAME")]
    for column in ("PHASE", "PROGRESS", "LOSS", "AGE"):
        assert column in header_t
    for column in ("PHASE", "READY", "DESIRED", "ENDPOINT", "AGE"):
        assert column in header_d
    names = kube.kubectl("get", "llmray", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(names) == ["llmdeployment.llmray.io/dep", "llmtrainingjob.llmray.io/job"]
    # status is a subresource: a spec update cannot write it
    kube.kubectl(
        "patch", "ltj", "job", "-n", namespace, "--type=merge", "-p", '{"status": {"phase": "Succeeded"}}'
    )
    status = json.loads(kube.kubectl("get", "ltj", "job", "-n", namespace, "-o", "json").stdout).get("status")
    assert not status or status.get("phase") != "Succeeded"
