"""Pod, Service and Secret builders: names, labels, ray start args, security, placement, volumes."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmray.api import LLMDeploymentSpec, LLMTrainingJobSpec, local_path
from llmray.builders import cluster as b
from llmray.builders.common import (
    ANNOTATION_TEMPLATE_HASH,
    Owner,
    cpu_count,
    memory_bytes,
    worker_name,
    worker_suffix,
)

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TRAIN_OWNER = Owner("LLMTrainingJob", "qwen-lora", "ml", "0d5e5c2a-1111-2222-3333-444455556666")
DEPLOY_OWNER = Owner("LLMDeployment", "qwen-chat", "ml", "9c1b7e43-aaaa-bbbb-cccc-ddddeeeeffff")


def _example(name: str, kind: str) -> dict[str, Any]:
    docs = yaml.safe_load_all((EXAMPLES / name).read_text())
    return next(d for d in docs if d and d["kind"] == kind)["spec"]


def _training(**overrides: Any) -> b.ClusterSpec:
    spec = _example("training-qwen-lora.yaml", "LLMTrainingJob")
    spec.update(overrides)
    return b.training_cluster(TRAIN_OWNER, LLMTrainingJobSpec.model_validate(spec))


def _deployment(**overrides: Any) -> b.ClusterSpec:
    spec = _example("deployment-vllm.yaml", "LLMDeployment")
    spec.update(overrides)
    parsed = LLMDeploymentSpec.model_validate(spec)
    return b.deployment_cluster(DEPLOY_OWNER, parsed, parsed.model.uri)


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["spec"]["containers"]
    return container


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in _container(pod)["env"]}


# --- names, labels, owner references ---------------------------------------------------------------


def test_head_pod_name_labels_and_owner() -> None:
    pod = b.head_pod(_training(), "secret-uid")
    meta = pod["metadata"]
    assert meta["name"] == "qwen-lora-head"
    assert meta["namespace"] == "ml"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "llmray",
        "app.kubernetes.io/managed-by": "llmray-operator",
        "app.kubernetes.io/instance": "qwen-lora",
        "app.kubernetes.io/component": "ray-head",
        "llmray.io/kind": "LLMTrainingJob",
        "ray.io/cluster": "qwen-lora",
        "ray.io/node-type": "head",
        "ray.io/group": "headgroup",
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "llmray.io/v1alpha1",
            "kind": "LLMTrainingJob",
            "name": "qwen-lora",
            "uid": TRAIN_OWNER.uid,
            "controller": True,
        }
    ]


def test_worker_pod_name_and_labels() -> None:
    pod = b.worker_pod(_training(), 3, "secret-uid")
    name = pod["metadata"]["name"]
    assert re.fullmatch(r"qwen-lora-worker-gpu-[bcdfghjklmnpqrstvwxz2456789]{5}", name)
    assert name == worker_name("qwen-lora", "gpu", TRAIN_OWNER.uid, 3)
    labels = pod["metadata"]["labels"]
    assert labels["ray.io/node-type"] == "worker"
    assert labels["ray.io/group"] == "gpu"
    assert labels["llmray.io/worker-index"] == "3"


def test_worker_suffixes_are_unique_deterministic_and_owner_specific() -> None:
    suffixes = [worker_suffix("uid-a", "gpu", i) for i in range(5000)]
    assert len(set(suffixes)) == len(suffixes)
    assert suffixes[:10] == [worker_suffix("uid-a", "gpu", i) for i in range(10)]
    assert suffixes[:10] != [worker_suffix("uid-b", "gpu", i) for i in range(10)]
    assert all(re.fullmatch(r"[bcdfghjklmnpqrstvwxz2456789]{5}", s) for s in suffixes)


def test_cpu_workers_are_in_group_cpu() -> None:
    cluster = b.training_cluster(
        TRAIN_OWNER,
        LLMTrainingJobSpec.model_validate(_example("training-tiny-cpu.yaml", "LLMTrainingJob")),
    )
    assert cluster.worker_group == "cpu"
    assert "-worker-cpu-" in b.worker_pod(cluster, 0, "u")["metadata"]["name"]


# --- ray start ------------------------------------------------------------------------------------


def test_quantities() -> None:
    assert cpu_count("500m") == 1
    assert cpu_count("8") == 8
    assert cpu_count(2) == 2
    assert cpu_count("1500m") == 2
    assert memory_bytes("64Gi") == 64 * 2**30
    assert memory_bytes("512Mi") == 512 * 2**20
    assert memory_bytes("1G") == 10**9


def test_head_ray_start_args() -> None:
    cmd = _container(b.head_pod(_training(), "u"))["command"]
    assert cmd[:3] == ["ray", "start", "--head"]
    for arg in (
        "--port=6379",
        "--dashboard-host=0.0.0.0",
        "--dashboard-port=8265",
        "--ray-client-server-port=10001",
        "--metrics-export-port=8080",
        "--num-cpus=0",
        "--num-gpus=0",
        f"--memory={8 * 2**30}",
        "--block",
    ):
        assert arg in cmd


def test_worker_ray_start_args_follow_resources() -> None:
    cmd = _container(b.worker_pod(_training(), 0, "u"))["command"]
    assert cmd[:2] == ["ray", "start"]
    assert "--address=qwen-lora-head.ml.svc.cluster.local:6379" in cmd
    assert "--num-cpus=8" in cmd
    assert "--num-gpus=1" in cmd
    assert f"--memory={48 * 2**30}" in cmd
    assert "--head" not in cmd


def test_resources_requests_equal_limits_with_gpu() -> None:
    res = _container(b.worker_pod(_training(), 0, "u"))["resources"]
    assert res["requests"] == {
        "cpu": "8",
        "memory": "48Gi",
        "nvidia.com/gpu": "1",
        "ephemeral-storage": "1Gi",
    }
    assert res["limits"] == {**res["requests"], "ephemeral-storage": "64Gi"}
    head = _container(b.head_pod(_training(), "u"))["resources"]
    assert "nvidia.com/gpu" not in head["limits"]


# --- ports, probes, env ----------------------------------------------------------------------------


def test_head_ports_and_probes() -> None:
    container = _container(b.head_pod(_training(), "u"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"gcs": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080}
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert probe["httpGet"] == {"path": "/api/gcs_healthz", "port": 8265}
    assert container["livenessProbe"]["failureThreshold"] * container["livenessProbe"]["periodSeconds"] >= 60


def test_worker_probes_use_raylet_health() -> None:
    container = _container(b.worker_pod(_training(), 0, "u"))
    assert container["readinessProbe"]["httpGet"] == {"path": "/api/local_raylet_healthz", "port": 52365}
    assert "--dashboard-agent-listen-port=52365" in container["command"]


@pytest.mark.parametrize("which", ["head", "worker"])
def test_token_auth_env_on_every_container(which: str) -> None:
    cluster = _deployment()
    pod = b.head_pod(cluster, "u") if which == "head" else b.worker_pod(cluster, 0, "u")
    env = _env(pod)
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "qwen-chat-ray-auth", "key": "auth_token"}
    }
    assert env["LLMRAY_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "qwen-chat-api-key", "key": "key"}}
    assert "value" not in env["RAY_AUTH_TOKEN"]  # never the token itself


def test_hf_token_from_model_secret_ref() -> None:
    cluster = _training(model={"uri": "hf://meta-llama/Llama-3.2-1B", "secretRef": {"name": "hf-token"}})
    env = _env(b.worker_pod(cluster, 0, "u"))
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert cluster.secret_refs()[0].name == "hf-token"
    assert "HF_TOKEN" not in _env(b.worker_pod(_training(), 0, "u"))


S3_STORAGE = {"secretRef": {"name": "s3-creds"}, "endpoint": "http://minio.minio.svc:9000", "region": "eu-1"}


@pytest.mark.parametrize("which", ["head", "worker"])
def test_object_storage_credentials_endpoint_and_region(which: str) -> None:
    cluster = _training(
        model={"uri": "s3://models/base"},
        output={"uri": "s3://models/out"},
        objectStorage=S3_STORAGE,
    )
    pod = b.head_pod(cluster, "u") if which == "head" else b.worker_pod(cluster, 0, "u")
    env = _env(pod)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": key}}
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["AWS_ENDPOINT_URL_S3"] == {
        "name": "AWS_ENDPOINT_URL_S3",
        "value": "http://minio.minio.svc:9000",
    }
    assert env["AWS_REGION"]["value"] == "eu-1"
    # the creator's keys only: no fall-back to the node's role through instance metadata
    assert env["AWS_EC2_METADATA_DISABLED"]["value"] == "true"
    # never the whole Secret: it could set any variable (the Ray token among them)
    assert "envFrom" not in _container(pod)
    # nothing to mount for object stores
    assert not [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert "s3-creds" in [ref.name for ref in cluster.secret_refs()]


def test_object_storage_without_secret_uses_workload_identity() -> None:
    cluster = _deployment(model={"uri": "s3://models/base"}, objectStorage={"region": "us-west-2"})
    env = _env(b.head_pod(cluster, "u"))
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["AWS_REGION"]["value"] == "us-west-2" and "AWS_ENDPOINT_URL_S3" not in env
    assert "AWS_EC2_METADATA_DISABLED" not in env  # workload identity may be the node's role
    assert not [n for n in _env(b.head_pod(_deployment(), "u")) if n.startswith("AWS_")]


def test_object_storage_changes_the_pod_template() -> None:
    plain = b.pod_template_hash(_training(), "worker", "u")
    assert b.pod_template_hash(_training(objectStorage=S3_STORAGE), "worker", "u") != plain


# --- security, volumes, placement ------------------------------------------------------------------


@pytest.mark.parametrize("which", ["head", "worker"])
def test_restricted_pod_security(which: str) -> None:
    cluster = _training()
    pod = b.head_pod(cluster, "u") if which == "head" else b.worker_pod(cluster, 0, "u")
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 1000
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = _container(pod)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    for volume in spec["volumes"]:
        assert set(volume) - {"name"} <= {"emptyDir", "persistentVolumeClaim"}


def test_shm_is_a_memory_emptydir() -> None:
    pod = b.worker_pod(_training(), 0, "u")
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "48Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in _container(pod)["volumeMounts"]


def test_pvc_uris_are_mounted_at_their_local_path() -> None:
    cluster = _training(
        model={"uri": "pvc://models/base/qwen"},
        dataset={"uri": "pvc://data/train.jsonl"},
        output={"uri": "pvc://models/out"},
    )
    pod = b.worker_pod(cluster, 0, "u")
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert set(claims) == {"models", "data"}
    mounts = {m["mountPath"]: m for m in _container(pod)["volumeMounts"]}
    assert local_path("pvc://models/out") == "/mnt/pvc/models/out"
    assert mounts["/mnt/pvc/models"]["readOnly"] is False  # output is written there
    assert mounts["/mnt/pvc/data"]["readOnly"] is True  # only read
    assert claims["data"]["persistentVolumeClaim"]["readOnly"] is True


def test_deployment_model_pvc_is_read_only() -> None:
    spec = LLMDeploymentSpec.model_validate(_example("deployment-tiny-cpu.yaml", "LLMDeployment"))
    cluster = b.deployment_cluster(DEPLOY_OWNER, spec, "pvc://trained/run-1")
    (pvc,) = cluster.pvcs
    assert (pvc.claim, pvc.read_only, pvc.mount_path) == ("trained", True, "/mnt/pvc/trained")


def test_gpu_toleration_added_and_user_placement_passed_through() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    }
    cluster = _training(
        workers={
            "replicas": 2,
            "resources": {"gpu": 2, "cpu": "8", "memory": "64Gi"},
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            "affinity": affinity,
        }
    )
    spec = b.worker_pod(cluster, 0, "u")["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["affinity"] == affinity
    head = b.head_pod(cluster, "u")["spec"]
    assert "tolerations" not in head  # the head has no GPUs and no user tolerations here


def test_cpu_pods_get_no_gpu_toleration() -> None:
    spec = LLMTrainingJobSpec.model_validate(_example("training-tiny-cpu.yaml", "LLMTrainingJob"))
    pod = b.worker_pod(b.training_cluster(TRAIN_OWNER, spec), 0, "u")
    assert "tolerations" not in pod["spec"]


# --- services and secret ----------------------------------------------------------------------------


def test_head_service() -> None:
    svc = b.head_service(_training())
    assert svc["metadata"]["name"] == "qwen-lora-head"
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "gcs": 6379,
        "dashboard": 8265,
        "client": 10001,
        "serve": 8000,
        "metrics": 8080,
    }
    assert svc["spec"]["selector"] == {
        "ray.io/cluster": "qwen-lora",
        "llmray.io/kind": "LLMTrainingJob",
        "ray.io/node-type": "head",
    }
    assert svc["spec"]["publishNotReadyAddresses"] is True


def test_serve_service_follows_spec_service() -> None:
    svc = b.serve_service(_deployment(service={"type": "LoadBalancer", "port": 443}))
    assert svc["metadata"]["name"] == "qwen-chat-serve"
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [{"name": "serve", "port": 443, "targetPort": 8000, "protocol": "TCP"}]
    # Every Ray pod of the deployment (head and workers); Kubernetes keeps the ones whose proxy is Ready.
    assert svc["spec"]["selector"] == {"ray.io/cluster": "qwen-chat", "llmray.io/kind": "LLMDeployment"}
    assert b.serve_endpoint(_deployment()) == "http://qwen-chat-serve.ml.svc.cluster.local:8000/v1"


def _selects(selector: dict[str, str], pod: dict[str, Any]) -> bool:
    labels = pod["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def test_serve_service_and_network_policy_cover_head_and_workers_alike() -> None:
    cluster = _deployment()
    selector = b.serve_service(cluster)["spec"]["selector"]
    policy = b.network_policy(cluster, OPERATOR)
    guarded = policy["spec"]["podSelector"]["matchLabels"]
    serve_rule = next(
        r for r in policy["spec"]["ingress"] if r.get("ports") == [{"port": 8000, "protocol": "TCP"}]
    )
    for pod in (b.head_pod(cluster, "u"), b.worker_pod(cluster, 0, "u"), b.worker_pod(cluster, 3, "u")):
        assert _selects(selector, pod) and _selects(guarded, pod)  # an endpoint, under the same rules
        ports = {p["name"]: p["containerPort"] for p in _container(pod)["ports"]}
        assert ports["serve"] == 8000
    assert serve_rule["from"] == [{"podSelector": {}}]
    other = b.head_pod(_training(), "u")
    assert not _selects(selector, other)


@pytest.mark.parametrize("which", ["head", "worker"])
def test_serving_pods_are_ready_while_their_proxy_is(which: str) -> None:
    cluster = _deployment()
    pod = b.head_pod(cluster, "u") if which == "head" else b.worker_pod(cluster, 0, "u")
    container = _container(pod)
    ray_health = (
        {"path": "/api/gcs_healthz", "port": 8265}
        if which == "head"
        else {"path": "/api/local_raylet_healthz", "port": 52365}
    )
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}
    # a draining proxy leaves within 6s; one slow answer under load keeps the only endpoint
    assert container["readinessProbe"]["failureThreshold"] == 3
    assert container["startupProbe"]["httpGet"] == ray_health  # the operator waits for the Ray node
    assert container["livenessProbe"]["httpGet"] == ray_health  # a missing proxy never restarts a node
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 240


def test_training_pods_have_no_serve_probe() -> None:
    for pod in (b.head_pod(_training(), "u"), b.worker_pod(_training(), 0, "u")):
        container = _container(pod)
        assert "startupProbe" not in container
        assert container["readinessProbe"]["httpGet"]["port"] != 8000


def test_auth_secret() -> None:
    token = b.derive_auth_token(b"k" * 32, TRAIN_OWNER)
    assert len(token) >= 32
    secret = b.auth_secret(_training(), token)
    assert secret["metadata"]["name"] == "qwen-lora-ray-auth"
    assert secret["type"] == "Opaque"
    assert base64.b64decode(secret["data"]["auth_token"]).decode() == token
    assert secret["metadata"]["ownerReferences"][0]["uid"] == TRAIN_OWNER.uid


# --- template hash: what recreates pods -------------------------------------------------------------


def _hash(cluster: b.ClusterSpec, auth: str = "u") -> str:
    return str(b.worker_pod(cluster, 0, auth)["metadata"]["annotations"][ANNOTATION_TEMPLATE_HASH])


def test_template_hash_is_stable_and_ignores_worker_count() -> None:
    base = _training()
    assert _hash(base) == _hash(_training())
    assert _hash(base) == _hash(
        _training(workers={**_example("training-qwen-lora.yaml", "LLMTrainingJob")["workers"], "replicas": 7})
    )
    assert _hash(base) == str(b.worker_pod(base, 5, "u")["metadata"]["annotations"][ANNOTATION_TEMPLATE_HASH])


@pytest.mark.parametrize(
    "change",
    [
        {"image": "llmray/ray-runtime:0.2.0"},
        {"imagePullPolicy": "Always"},
        {"workers": {"replicas": 2, "resources": {"gpu": 1, "cpu": "16", "memory": "48Gi"}}},
        {
            "workers": {
                "replicas": 2,
                "resources": {"gpu": 1, "cpu": "8", "memory": "48Gi"},
                "nodeSelector": {"a": "b"},
            }
        },
        {"model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct", "secretRef": {"name": "hf"}}},
    ],
)
def test_template_hash_changes_with_pod_inputs(change: dict[str, Any]) -> None:
    assert _hash(_training(**change)) != _hash(_training())


def test_template_hash_changes_with_auth_secret() -> None:
    assert _hash(_training(), "secret-1") != _hash(_training(), "secret-2")


# --- tenant safety: derived tokens, storage limits, NetworkPolicy -----------------------------------


def test_auth_token_is_derived_per_incarnation_and_key() -> None:
    key = b"k" * 32
    token = b.derive_auth_token(key, TRAIN_OWNER)
    assert token == b.derive_auth_token(key, TRAIN_OWNER)  # recomputable after a restart
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)  # 256 bits, URL-safe, no padding
    recreated = Owner(TRAIN_OWNER.kind, TRAIN_OWNER.name, TRAIN_OWNER.namespace, "another-uid")
    others = {
        b.derive_auth_token(key, recreated),
        b.derive_auth_token(b"x" * 32, TRAIN_OWNER),
        b.derive_auth_token(
            key, Owner("LLMDeployment", TRAIN_OWNER.name, TRAIN_OWNER.namespace, TRAIN_OWNER.uid)
        ),
        b.derive_auth_token(key, Owner(TRAIN_OWNER.kind, TRAIN_OWNER.name, "other-ns", TRAIN_OWNER.uid)),
    }
    assert token not in others and len(others) == 4
    assert b.auth_fingerprint(token) != token and len(b.auth_fingerprint(token)) == 16


@pytest.mark.parametrize("which", ["head", "worker"])
def test_ephemeral_storage_and_size_limited_scratch_volumes(which: str) -> None:
    cluster = _training()
    pod = b.head_pod(cluster, "u") if which == "head" else b.worker_pod(cluster, 0, "u")
    container = _container(pod)
    assert container["resources"]["requests"]["ephemeral-storage"] == "1Gi"
    assert container["resources"]["limits"]["ephemeral-storage"] == "64Gi"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "4Gi"} and mounts["tmp"] == "/tmp/scratch"
    assert volumes["ray-session"]["emptyDir"] == {"sizeLimit": "8Gi"} and mounts["ray-session"] == "/tmp/ray"
    assert volumes["model-cache"]["emptyDir"] == {"sizeLimit": "40Gi"}
    assert mounts["model-cache"] == "/home/ray/.cache/huggingface"
    env = _env(pod)
    assert env["TMPDIR"]["value"] == "/tmp/scratch"
    assert env["RAY_TMPDIR"]["value"] == "/tmp/ray"
    assert env["HF_HOME"]["value"] == "/home/ray/.cache/huggingface"
    # every emptyDir is bounded
    assert all("sizeLimit" in v["emptyDir"] for v in volumes.values() if "emptyDir" in v)


def test_storage_follows_the_spec() -> None:
    workers = _example("training-qwen-lora.yaml", "LLMTrainingJob")["workers"]
    storage = {"modelCache": "200Gi", "ephemeralStorageRequest": "50Gi", "ephemeralStorageLimit": "300Gi"}
    cluster = _training(workers={**workers, "storage": storage})
    worker = b.worker_pod(cluster, 0, "u")
    volumes = {v["name"]: v for v in worker["spec"]["volumes"]}
    assert volumes["model-cache"]["emptyDir"] == {"sizeLimit": "200Gi"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "4Gi"}  # defaults for what is not set
    res = _container(worker)["resources"]
    assert (res["requests"]["ephemeral-storage"], res["limits"]["ephemeral-storage"]) == ("50Gi", "300Gi")
    # the head keeps its own (default) storage, and the change recreates workers only
    head = _container(b.head_pod(cluster, "u"))["resources"]
    assert head["limits"]["ephemeral-storage"] == "64Gi"
    assert _hash(cluster) != _hash(_training())


OPERATOR = b.operator_peer(
    "llmray-system", "app.kubernetes.io/name=llmray-operator,app.kubernetes.io/instance=r"
)


def _ingress_by_ports(policy: dict[str, Any]) -> dict[tuple[int, ...] | None, list[Any] | None]:
    out: dict[tuple[int, ...] | None, list[Any] | None] = {}
    for rule in policy["spec"]["ingress"]:
        ports = tuple(p["port"] for p in rule["ports"]) if "ports" in rule else None
        out[ports] = rule.get("from")
    return out


def test_operator_peer() -> None:
    assert OPERATOR == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llmray-system"}},
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/name": "llmray-operator", "app.kubernetes.io/instance": "r"}
        },
    }
    assert b.operator_peer("", "a=b") is None


def test_network_policy_of_a_training_cluster() -> None:
    policy = b.network_policy(_training(), OPERATOR)
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    assert policy["metadata"]["name"] == "qwen-lora-ray"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == TRAIN_OWNER.uid
    own = {"matchLabels": {"ray.io/cluster": "qwen-lora", "llmray.io/kind": "LLMTrainingJob"}}
    assert policy["spec"]["podSelector"] == own
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = _ingress_by_ports(policy)
    # every port from the cluster's own pods; only dashboard/serve from the operator; nothing else
    assert rules == {None: [{"podSelector": own}], (8265, 8000): [OPERATOR]}
    assert ANNOTATION_TEMPLATE_HASH in policy["metadata"]["annotations"]


def test_network_policy_without_an_in_cluster_operator() -> None:
    rules = _ingress_by_ports(b.network_policy(_training(), None))
    assert list(rules) == [None]


def test_network_policy_serve_port_follows_the_service() -> None:
    default = _ingress_by_ports(b.network_policy(_deployment(), OPERATOR))
    assert default[(8000,)] == [{"podSelector": {}}]  # ClusterIP: pods of the namespace
    assert not any(p and set(p) & {6379, 10001, 8080} for p in default)
    peers = [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]
    narrowed = _ingress_by_ports(
        b.network_policy(_deployment(service={"type": "ClusterIP", "allowFrom": peers}), OPERATOR)
    )
    assert narrowed[(8000,)] == peers
    closed = _ingress_by_ports(b.network_policy(_deployment(service={"allowFrom": []}), OPERATOR))
    assert (8000,) not in closed
    exposed = b.network_policy(_deployment(service={"type": "LoadBalancer", "port": 443}), OPERATOR)
    open_rule = next(
        r for r in exposed["spec"]["ingress"] if r.get("ports") == [{"port": 8000, "protocol": "TCP"}]
    )
    assert "from" not in open_rule  # exposed outside the cluster: from everywhere
    assert b.network_policy(_deployment(), OPERATOR) != exposed
