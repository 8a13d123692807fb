"""Pod templates through the operator against the real control plane: the fields land on the Ray
pods (shared template plus each role's), the pods still pass Pod Security 'restricted', and a
template change recreates the pods."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.kube import Kube, wait_for

from .test_operator_fixtures import (
    Operator,
    apply,
    example,
    pods_of,
    running_ready,
    wait_cluster_ready,
)

pytestmark = pytest.mark.cluster

NAME = "tiny-train"
TOKEN = {"path": "t", "audience": "sts"}


@pytest.fixture
def priority_class(kube: Kube) -> Iterator[str]:
    """A PriorityClass (cluster-scoped, so named per test and deleted after)."""
    name = f"ml-high-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "priorityclass", name, "--value=1000", "--description=llmray test")
    try:
        yield name
    finally:
        kube.kubectl("delete", "priorityclass", name, "--ignore-not-found", check=False)


def test_template_fields_land_on_restricted_pods_and_changes_recreate_them(
    kube: Kube, namespace: str, operator: Operator, pvc: Any, priority_class: str
) -> None:
    kube.kubectl(
        "label", "namespace", namespace,
        "pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/enforce-version=latest",
    )  # fmt: skip
    kube.kubectl("create", "serviceaccount", "trainer", "-n", namespace)
    registry = ["--docker-server=registry.example.com", "--docker-username=u", "--docker-password=p"]
    kube.kubectl("create", "secret", "docker-registry", "registry", "-n", namespace, *registry)
    kube.kubectl("create", "secret", "generic", "s3", "-n", namespace, "--from-literal=key=k")
    kube.kubectl("create", "configmap", "ca-bundle", "-n", namespace, "--from-literal=ca.crt=x")
    pvc("datasets")
    (job,) = example("training-tiny-cpu.yaml")
    job["spec"]["podTemplate"] = {
        "labels": {"team": "nlp"},
        "annotations": {"example.com/owner": "nlp"},
        "serviceAccountName": "trainer",
        "imagePullSecrets": [{"name": "registry"}],
        "priorityClassName": priority_class,
        "schedulerName": "default-scheduler",
        "env": [
            {"name": "WANDB_MODE", "value": "offline"},
            {"name": "S3_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "key"}}},
        ],
        "envFrom": [{"configMapRef": {"name": "ca-bundle"}, "prefix": "CA_"}],
        "volumes": [
            {"name": "ca", "configMap": {"name": "ca-bundle"}},
            {"name": "token", "projected": {"sources": [{"serviceAccountToken": TOKEN}]}},
        ],
        "volumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/certs/corp", "readOnly": True},
                         {"name": "token", "mountPath": "/mnt/cloud"}],
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
             "labelSelector": {"matchLabels": {"ray.io/cluster": NAME}}}
        ],
    }  # fmt: skip
    job["spec"]["workers"]["podTemplate"] = {
        "labels": {"role": "worker"},
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    apply(kube, [job], namespace)
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, NAME, 2, timeout=90)

    pods = pods_of(kube, namespace, NAME)
    assert len(pods) == 3
    for pod in pods:
        spec, container = pod.spec, pod.spec.containers[0]
        is_worker = pod.metadata.labels["ray.io/node-type"] == "worker"
        assert pod.metadata.labels["team"] == "nlp" and pod.metadata.labels["ray.io/cluster"] == NAME
        assert (pod.metadata.labels.get("role") == "worker") == is_worker
        assert pod.metadata.annotations["example.com/owner"] == "nlp"
        assert spec.service_account_name == "trainer" and spec.automount_service_account_token is False
        assert [s.name for s in spec.image_pull_secrets] == ["registry"]
        assert spec.priority_class_name == priority_class and spec.priority == 1000
        assert spec.topology_spread_constraints[0].topology_key == "kubernetes.io/hostname"
        env = {e.name: e for e in container.env}
        assert env["WANDB_MODE"].value == "offline"
        assert env["S3_KEY"].value_from.secret_key_ref.name == "s3"
        assert env["RAY_AUTH_TOKEN"].value_from.secret_key_ref.name == f"{NAME}-ray-auth"
        assert container.env_from[0].config_map_ref.name == "ca-bundle"
        mounts = {m.mount_path: m.name for m in container.volume_mounts}
        assert mounts["/etc/ssl/certs/corp"] == "ca" and mounts["/mnt/cloud"] == "token"
        assert ("/data" in mounts) == is_worker
        volumes = {v.name: v for v in spec.volumes}
        assert volumes["token"].projected.sources[0].service_account_token.audience == "sts"
        if is_worker:
            assert volumes["data"].persistent_volume_claim.claim_name == "datasets"

    # A template change (a label) recreates every pod with it.
    before = {p.metadata.uid for p in pods}
    template = copy.deepcopy(job["spec"]["podTemplate"])
    template["labels"] = {"team": "vision"}
    client.CustomObjectsApi(kube.api_client).patch_namespaced_custom_object(
        "llmray.io", "v1alpha1", namespace, "llmtrainingjobs", NAME, {"spec": {"podTemplate": template}}
    )

    def relabelled() -> bool:
        now = pods_of(kube, namespace, NAME)
        return (
            len(now) == 3
            and not ({p.metadata.uid for p in now} & before)
            and all(p.metadata.labels.get("team") == "vision" and running_ready(p) for p in now)
        )

    wait_for(relabelled, timeout=90, what="every pod recreated with the new label")
