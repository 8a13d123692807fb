"""Tenant safety against the real API server: the chart's ValidatingAdmissionPolicy refuses an
LLMTrainingJob/LLMDeployment that would grant its creator more than the creator already has
(a Secret or claim they may not read; an image, a catch-all toleration, an object store reached with
the ambient cloud identity, an unprefixed envFrom, a ServiceAccount token or a scheduling class that
needs the right to create pods), naming the field; the same manifests pass for a user who has those rights."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.kube import Kube, wait_for

from .test_operator_fixtures import REPO
from .test_operator_fixtures import with_field as _with

pytestmark = [pytest.mark.cluster, pytest.mark.helm]

CHART = REPO / "charts" / "llmray"
ALICE = "alice@example.com"  # may create/get the two kinds and read her own Secret, nothing else
BOB = "bob@example.com"  # may also get every Secret and claim and create pods in the namespace

TRAINING: dict[str, Any] = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "LLMTrainingJob",
    "metadata": {"name": "job"},
    "spec": {
        "model": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
        "dataset": {"uri": "file:///data/train.jsonl"},
        "output": {"uri": "file:///out"},
    },
}
DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": "dep"},
    "spec": {"model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}},
}


# (id, manifest, the field the refusal must name)
ESCALATIONS: list[tuple[str, dict[str, Any], str]] = [
    (
        "api-key-secret",
        _with(DEPLOYMENT, "spec.apiKeySecretRef", {"name": "db-password"}),
        "spec.apiKeySecretRef",
    ),
    (
        "another-clusters-ray-token",
        _with(TRAINING, "spec.model.secretRef", {"name": "victim-ray-auth", "key": "auth_token"}),
        "spec.model.secretRef",
    ),
    (
        "deployment-hub-token",
        _with(DEPLOYMENT, "spec.model.secretRef", {"name": "db-password"}),
        "spec.model.secretRef",
    ),
    (
        "training-s3-credentials",
        _with(TRAINING, "spec.objectStorage", {"secretRef": {"name": "db-password"}}),
        "spec.objectStorage.secretRef",
    ),
    (
        "deployment-s3-credentials",
        _with(DEPLOYMENT, "spec.objectStorage", {"secretRef": {"name": "victim-ray-auth"}}),
        "spec.objectStorage.secretRef",
    ),
    ("model-pvc", _with(TRAINING, "spec.model.uri", "pvc://team-models/base"), "spec.model.uri"),
    ("dataset-pvc", _with(TRAINING, "spec.dataset.uri", "pvc://finance-data/x.jsonl"), "spec.dataset.uri"),
    ("output-pvc", _with(TRAINING, "spec.output.uri", "pvc://shared/out"), "spec.output.uri"),
    (
        "checkpoint-pvc",
        _with(TRAINING, "spec.checkpoint", {"storageUri": "pvc://shared/ckpt"}),
        "spec.checkpoint.storageUri",
    ),
    ("served-model-pvc", _with(DEPLOYMENT, "spec.model.uri", "pvc://team-models/chat"), "spec.model.uri"),
    (
        "adapter-pvc",
        _with(
            DEPLOYMENT,
            "spec.adapters",
            [{"name": "ok", "uri": "file:///models/a"}, {"name": "x", "uri": "pvc://team-models/lora"}],
        ),
        "spec.adapters[].uri",
    ),
    ("image", _with(TRAINING, "spec.image", "docker.io/evil/miner:1"), "spec.image"),
    ("image-lookalike", _with(DEPLOYMENT, "spec.image", "llmray-evil/ray-runtime:0.1.0"), "spec.image"),
    (
        "worker-tolerate-everything",
        _with(TRAINING, "spec.workers.tolerations", [{"operator": "Exists"}]),
        "spec.workers.tolerations",
    ),
    (
        "head-tolerate-everything",
        _with(DEPLOYMENT, "spec.head.tolerations", [{"operator": "Exists", "effect": "NoSchedule"}]),
        "spec.head.tolerations",
    ),
]


def _secret_volume(name: str) -> dict[str, Any]:
    return {
        "volumes": [{"name": "v", "secret": {"secretName": name}}],
        "volumeMounts": [{"name": "v", "mountPath": "/s"}],
    }


DB, DB_KEY = {"name": "db-password"}, {"name": "db-password", "key": "key"}
CLAIM, CSI = {"claimName": "finance-data"}, {"driver": "secrets-store.csi.k8s.io"}

# Pod templates (issue 13): every Secret and claim they reference, the ServiceAccount, csi volumes.
ESCALATIONS += [
    (
        "template-env-secret",
        _with(TRAINING, "spec.podTemplate", {"env": [{"name": "DB", "valueFrom": {"secretKeyRef": DB_KEY}}]}),
        "spec.podTemplate.env",
    ),
    (
        "worker-envfrom-secret",
        _with(
            TRAINING, "spec.workers.podTemplate", {"envFrom": [{"secretRef": {"name": "victim-ray-auth"}}]}
        ),
        "spec.workers.podTemplate.envFrom",
    ),
    (
        "head-secret-volume",
        _with(DEPLOYMENT, "spec.head.podTemplate", _secret_volume("db-password")),
        "spec.head.podTemplate.volumes",
    ),
    (
        "projected-secret",
        _with(
            TRAINING,
            "spec.podTemplate",
            {"volumes": [{"name": "p", "projected": {"sources": [{"secret": DB}]}}]},
        ),
        "spec.podTemplate.volumes",
    ),
    (
        "image-pull-secret",
        _with(DEPLOYMENT, "spec.podTemplate", {"imagePullSecrets": [{"name": "db-password"}]}),
        "spec.podTemplate.imagePullSecrets",
    ),
    (
        "template-claim",
        _with(
            TRAINING, "spec.workers.podTemplate", {"volumes": [{"name": "d", "persistentVolumeClaim": CLAIM}]}
        ),
        "spec.workers.podTemplate.volumes",
    ),
    (
        "service-account",
        _with(TRAINING, "spec.podTemplate", {"serviceAccountName": "deploy-bot"}),
        "spec.podTemplate.serviceAccountName",
    ),
    (
        "csi-volume",
        _with(DEPLOYMENT, "spec.head.podTemplate", {"volumes": [{"name": "c", "csi": CSI}]}),
        "spec.head.podTemplate.volumes",
    ),
]

# Object stores without spec.objectStorage.secretRef (the node's / ServiceAccount's cloud identity),
# and pod-template fields only a user who may create pods gets.
ESCALATIONS += [
    ("ambient-output", _with(TRAINING, "spec.output.uri", "s3://bucket/out"), "spec.output.uri"),
    ("ambient-model", _with(TRAINING, "spec.model.uri", "gs://bucket/base"), "spec.model.uri"),
    ("ambient-dataset", _with(TRAINING, "spec.dataset.uri", "s3://bucket/d.jsonl"), "spec.dataset.uri"),
    (
        "ambient-checkpoint",
        _with(TRAINING, "spec.checkpoint", {"storageUri": "gs://bucket/ckpt"}),
        "spec.checkpoint.storageUri",
    ),
    (
        "ambient-with-endpoint-only",
        _with(
            _with(DEPLOYMENT, "spec.model.uri", "s3://bucket/chat"),
            "spec.objectStorage",
            {"endpoint": "http://minio:9000", "region": "eu-1"},
        ),
        "spec.model.uri",
    ),
    (
        "ambient-adapter",
        _with(
            DEPLOYMENT,
            "spec.adapters",
            [{"name": "ok", "uri": "file:///models/a"}, {"name": "x", "uri": "s3://bucket/lora"}],
        ),
        "spec.adapters[].uri",
    ),
    (
        "envfrom-without-prefix",
        _with(TRAINING, "spec.podTemplate", {"envFrom": [{"configMapRef": {"name": "settings"}}]}),
        "spec.podTemplate.envFrom",
    ),
    (
        "own-secret-envfrom-without-prefix",
        _with(
            DEPLOYMENT,
            "spec.workers.podTemplate",
            {
                "envFrom": [
                    {"prefix": "APP_", "configMapRef": {"name": "a"}},
                    {"secretRef": {"name": "alice-key"}},
                ]
            },
        ),
        "spec.workers.podTemplate.envFrom",
    ),
    (
        "service-account-token",
        _with(
            TRAINING,
            "spec.workers.podTemplate",
            {"volumes": [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}]},
        ),
        "spec.workers.podTemplate.volumes",
    ),
    (
        "priority-class",
        _with(TRAINING, "spec.podTemplate", {"priorityClassName": "system-cluster-critical"}),
        "spec.podTemplate.priorityClassName",
    ),
    (
        "runtime-class",
        _with(DEPLOYMENT, "spec.head.podTemplate", {"runtimeClassName": "runc-privileged"}),
        "spec.head.podTemplate.runtimeClassName",
    ),
    (
        "scheduler",
        _with(TRAINING, "spec.workers.podTemplate", {"schedulerName": "my-scheduler"}),
        "spec.workers.podTemplate.schedulerName",
    ),
]

# Allowed for Alice too: her own Secret, the project's image, a toleration that names its taint.
HARMLESS: list[tuple[str, dict[str, Any]]] = [
    ("plain-training", TRAINING),
    ("plain-deployment", DEPLOYMENT),
    ("own-secret", _with(DEPLOYMENT, "spec.apiKeySecretRef", {"name": "alice-key", "key": "key"})),
    ("project-image", _with(TRAINING, "spec.image", "llmray/ray-runtime:0.2.0")),
    ("file-adapter", _with(DEPLOYMENT, "spec.adapters", [{"name": "a", "uri": "file:///models/a"}])),
    (
        "own-s3-credentials",
        _with(
            _with(TRAINING, "spec.output.uri", "s3://bucket/out"),
            "spec.objectStorage",
            {"secretRef": {"name": "alice-key"}, "region": "eu-1"},
        ),
    ),
    (
        "own-gs-credentials-for-adapters",
        _with(
            _with(DEPLOYMENT, "spec.adapters", [{"name": "a", "uri": "gs://bucket/lora"}]),
            "spec.objectStorage",
            {"secretRef": {"name": "alice-key"}},
        ),
    ),
    ("workload-identity", _with(DEPLOYMENT, "spec.objectStorage", {"endpoint": "http://minio:9000"})),
    (
        "keyed-toleration",
        _with(TRAINING, "spec.workers.tolerations", [{"key": "dedicated", "operator": "Exists"}]),
    ),
    (
        "own-template-refs",
        _with(
            TRAINING,
            "spec.podTemplate",
            {
                "labels": {"team": "nlp"},
                "serviceAccountName": "default",
                "imagePullSecrets": [{"name": "alice-key"}],
                "env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "alice-key", "key": "key"}}}],
                "envFrom": [
                    {"prefix": "KEY_", "secretRef": {"name": "alice-key"}},
                    {"prefix": "SETTINGS_", "configMapRef": {"name": "settings"}},
                ],
                "volumes": [
                    {"name": "k", "secret": {"secretName": "alice-key"}},
                    {"name": "s", "emptyDir": {"sizeLimit": "1Gi"}},
                    {
                        "name": "t",
                        "projected": {"sources": [{"secret": {"name": "alice-key"}}]},
                    },
                ],
            },
        ),
    ),
]


def _helm(kube: Kube, *args: str) -> str:
    proc = subprocess.run(
        [str(kube.bin_dir / "helm"), "--kubeconfig", str(kube.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def policy(kube: Kube, crds: None) -> Iterator[str]:
    """The chart's admission policy and binding, applied for this module (cluster-scoped)."""
    release = f"safety-{uuid.uuid4().hex[:6]}"
    rendered = _helm(kube, "template", release, str(CHART), "--show-only", "templates/admission.yaml")
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    kube.kubectl("apply", "-f", "-", input=rendered)
    name = docs[0]["metadata"]["name"]
    try:
        yield name
    finally:
        kube.kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)


ROLES = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: llm-user}
rules:
- apiGroups: [llmray.io]
  resources: [llmtrainingjobs, llmdeployments]
  verbs: [create, get, patch]
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [alice-key]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: alice}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: llm-user}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "alice@example.com"}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: llm-power-user}
rules:
- apiGroups: [llmray.io]
  resources: [llmtrainingjobs, llmdeployments]
  verbs: [create, get]
- apiGroups: [""]
  resources: [secrets, persistentvolumeclaims]
  verbs: [get]
- apiGroups: [""]
  resources: [pods]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: bob}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: llm-power-user}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "bob@example.com"}]
"""


@pytest.fixture
def tenants(kube: Kube, namespace: str, policy: str) -> str:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=ROLES)
    for name in ("alice-key", "db-password", "victim-ray-auth"):
        kube.kubectl("create", "secret", "generic", name, "-n", namespace, "--from-literal=key=x")
    # the policy is enforced once the API server has loaded it: wait on a refusal
    wait_for(
        lambda: (
            _create_as(kube, namespace, ALICE, next(m for i, m, _ in ESCALATIONS if i == "image")).returncode
            != 0
        ),
        timeout=30,
        what="the admission policy to be enforced",
    )
    return namespace


def _create_as(
    kube: Kube, namespace: str, user: str, manifest: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    return kube.kubectl(
        "create", "--dry-run=server", "--as", user, "-n", namespace, "-o", "json", "-f", "-",
        input=yaml.safe_dump(manifest), check=False,
    )  # fmt: skip


def test_policy_type_checks_against_the_crds(kube: Kube, policy: str) -> None:
    def checked() -> dict[str, Any] | None:
        obj = json.loads(kube.kubectl("get", "validatingadmissionpolicy", policy, "-o", "json").stdout)
        status = obj.get("status") or {}
        return status if status.get("observedGeneration") == obj["metadata"]["generation"] else None

    status = wait_for(checked, timeout=30, what="the policy's type checking")
    assert not (status.get("typeChecking") or {}).get("expressionWarnings"), status


@pytest.mark.parametrize(("manifest", "field"), [c[1:] for c in ESCALATIONS], ids=[c[0] for c in ESCALATIONS])
def test_escalation_is_refused_naming_the_field_and_allowed_with_the_rights(
    kube: Kube, tenants: str, manifest: dict[str, Any], field: str
) -> None:
    refused = _create_as(kube, tenants, ALICE, manifest)
    assert refused.returncode != 0, f"accepted for {ALICE}: {yaml.safe_dump(manifest)}"
    assert "ValidatingAdmissionPolicy" in refused.stderr, refused.stderr
    assert f"{field}:" in refused.stderr, refused.stderr
    accepted = _create_as(kube, tenants, BOB, manifest)
    assert accepted.returncode == 0, accepted.stderr


@pytest.mark.parametrize("manifest", [c[1] for c in HARMLESS], ids=[c[0] for c in HARMLESS])
def test_what_the_creator_may_do_anyway_is_accepted(
    kube: Kube, tenants: str, manifest: dict[str, Any]
) -> None:
    proc = _create_as(kube, tenants, ALICE, manifest)
    assert proc.returncode == 0, proc.stderr


def test_image_prefixes_are_configurable(kube: Kube, crds: None, namespace: str) -> None:
    release = f"img-{uuid.uuid4().hex[:6]}"
    rendered = _helm(
        kube, "template", release, str(CHART), "--show-only", "templates/admission.yaml",
        "--set", "admission.allowedImagePrefixes={registry.example.com/ml/,llmray/}",
    )  # fmt: skip
    assert "'registry.example.com/ml/', 'llmray/'" in rendered
    kube.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)  # the CEL compiles
    off = _helm(kube, "template", release, str(CHART), "--set", "admission.enabled=false")
    assert "ValidatingAdmissionPolicy" not in off


def test_on_update_only_what_changed_is_checked(kube: Kube, tenants: str) -> None:
    """Bob's job uses rights Alice lacks; Alice may still edit other fields, not those."""
    job = _with(
        _with(TRAINING, "spec.output.uri", "s3://bucket/out"),
        "spec.podTemplate",
        {
            "priorityClassName": "training-high",
            "envFrom": [{"configMapRef": {"name": "settings"}}],
            "volumes": [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}],
        },
    )
    kube.kubectl("create", "--as", BOB, "-n", tenants, "-f", "-", input=yaml.safe_dump(job))

    def patch(spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return kube.kubectl(
            "patch", "llmtrainingjob", "job", "--as", ALICE, "-n", tenants, "--type", "merge",
            "--dry-run=server", "-p", json.dumps({"spec": spec}), check=False,
        )  # fmt: skip

    kept = patch({"podTemplate": {"labels": {"team": "nlp"}}, "dataset": {"uri": "file:///data/b.jsonl"}})
    assert kept.returncode == 0, kept.stderr
    for spec, field in [
        ({"output": {"uri": "gs://other/out"}}, "spec.output.uri"),
        (
            {"podTemplate": {"priorityClassName": "system-cluster-critical"}},
            "spec.podTemplate.priorityClassName",
        ),
        ({"podTemplate": {"envFrom": [{"configMapRef": {"name": "other"}}]}}, "spec.podTemplate.envFrom"),
    ]:
        refused = patch(spec)
        assert refused.returncode != 0 and f"{field}:" in refused.stderr, (spec, refused.stderr)
