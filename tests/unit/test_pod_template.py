"""Pod template overrides: the API refuses what breaks Pod Security 'restricted' or the operator's own
settings (naming the field), the merge of shared and per-role templates, and the pods built from them."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from llmray.api import LLMDeploymentSpec, LLMTrainingJobSpec
from llmray.api.podtemplate import (
    RESERVED_ENV,
    RESERVED_MOUNT_PATHS,
    RESERVED_VOLUMES,
    EnvFromSource,
    PodTemplate,
    merge_templates,
)
from llmray.builders import cluster as b
from llmray.builders.common import ANNOTATION_TEMPLATE_HASH, LABEL_RAY_CLUSTER, Owner

pytestmark = pytest.mark.unit

OWNER = Owner("LLMTrainingJob", "ft", "ml", "0d5e5c2a-1111-2222-3333-444455556666")
TRAIN: dict[str, Any] = {
    "model": {"uri": "hf://org/m"},
    "dataset": {"uri": "file:///d.jsonl"},
    "output": {"uri": "file:///o"},
    "workers": {"replicas": 2, "resources": {"gpu": 1, "cpu": "8", "memory": "32Gi"}},
}
TEMPLATE: dict[str, Any] = {
    "labels": {"team": "nlp", "cost-center": "42"},
    "annotations": {"example.com/owner": "nlp"},
    "serviceAccountName": "trainer",
    "imagePullSecrets": [{"name": "registry"}],
    "env": [
        {"name": "WANDB_MODE", "value": "offline"},
        {"name": "S3_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "key"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ],
    "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
    "volumes": [
        {"name": "ca", "configMap": {"name": "ca-bundle"}},
        {"name": "creds", "secret": {"secretName": "s3", "defaultMode": 0o440}},
        {
            "name": "cloud-token",
            "projected": {"sources": [{"serviceAccountToken": {"path": "t", "audience": "sts"}}]},
        },
        {"name": "data", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
    ],
    "volumeMounts": [
        {"name": "ca", "mountPath": "/etc/ssl/certs/custom", "readOnly": True},
        {"name": "creds", "mountPath": "/mnt/creds"},
        {"name": "cloud-token", "mountPath": "/mnt/cloud"},
        {"name": "data", "mountPath": "/data"},
    ],
    "priorityClassName": "ml-high",
    "runtimeClassName": "nvidia",
    "schedulerName": "volcano",
    "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
    ],
}


SCRATCH: dict[str, Any] = {"volumes": [{"name": "v", "emptyDir": {}}]}


def _spec(**changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(TRAIN)
    out.update(changes)
    return out


def _cluster(**changes: Any) -> b.ClusterSpec:
    return b.training_cluster(OWNER, LLMTrainingJobSpec.model_validate(_spec(**changes)))


def _with(template: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(template)
    out.update(changes)
    return out


# --- the API refuses, naming the field --------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ({"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}, "hostPath"),
        ({"volumes": [{"name": "v"}]}, "set exactly one of configMap, secret, emptyDir"),
        ({"volumes": [{"name": "v", "emptyDir": {}, "secret": {"secretName": "s"}}]}, "exactly one"),
        ({"volumes": [{"name": "dshm", "emptyDir": {}}]}, "podTemplate.volumes: the names dshm"),
        ({"volumes": [{"name": "pvc-data", "emptyDir": {}}]}, "pvc-\\*"),
        ({"labels": {"ray.io/node-type": "head"}}, "podTemplate.labels"),
        ({"labels": {"llmray.io/kind": "x"}}, "podTemplate.labels"),
        ({"labels": {"app.kubernetes.io/managed-by": "me"}}, "podTemplate.labels"),
        ({"annotations": {"llmray.io/template-hash": "x"}}, "podTemplate.annotations"),
        ({"env": [{"name": "RAY_AUTH_TOKEN", "value": "mine"}]}, "podTemplate.env"),
        ({"env": [{"name": "RAY_AUTH_TOKEN_PATH", "value": "/x"}]}, "podTemplate.env"),
        ({"env": [{"name": "LLMRAY_API_KEY", "value": "k"}]}, "podTemplate.env"),
        ({"env": [{"name": "HF_HOME", "value": "/x"}]}, "podTemplate.env"),
        ({"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]}, "not both"),
        ({"env": [{"name": "A", "valueFrom": {}}]}, "exactly one of secretKeyRef"),
        ({"env": [{"name": "A"}, {"name": "A"}]}, "duplicate"),
        ({"envFrom": [{"prefix": "X_"}]}, "exactly one of configMapRef, secretRef"),
        ({"volumeMounts": [{"name": "ghost", "mountPath": "/x"}]}, "must be a volume of the same"),
        (
            {**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/tmp/ray"}]},
            "podTemplate.volumeMounts: /dev/shm",
        ),
        ({**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/mnt/pvc/x"}]}, "podTemplate.volumeMounts"),
        ({"env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]}, "podTemplate.env: .*NVIDIA_"),
        ({"env": [{"name": "LD_PRELOAD", "value": "/x.so"}]}, "podTemplate.env"),
        ({"env": [{"name": "PYTHONPATH", "value": "/x"}]}, "podTemplate.env"),
        ({"env": [{"name": "PATH", "value": "/x"}]}, "podTemplate.env"),
        ({"env": [{"name": "BASH_ENV", "value": "/x"}]}, "podTemplate.env"),
        ({**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/usr/local/lib"}]}, "hold the pod's code"),
        ({**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/src"}]}, "hold the pod's code"),
        ({**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/home/ray/x"}]}, "hold the pod's code"),
        ({**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/etc/ssl"}]}, "hold the pod's code"),
        ({**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/var/lib/x"}]}, "hold the pod's code"),
        ({**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/"}]}, "mountPath"),
        ({**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "//usr"}]}, "mountPath"),
        ({**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/data/../usr"}]}, "mountPath"),
        ({**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/usr/"}]}, "mountPath"),
        (
            {**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/data", "subPath": "a/../../x"}]},
            "subPath: must not contain",
        ),
        ({"privileged": True}, "privileged"),
        ({"securityContext": {"runAsUser": 0}}, "securityContext"),
        ({"hostNetwork": True}, "hostNetwork"),
    ],
)
@pytest.mark.parametrize("where", ["podTemplate", "head", "workers"])
def test_unsafe_or_reserved_template_is_refused(template: dict[str, Any], message: str, where: str) -> None:
    spec = (
        _spec(podTemplate=template) if where == "podTemplate" else _spec(**{where: {"podTemplate": template}})
    )
    if where == "workers":
        spec["workers"].update(TRAIN["workers"])
    with pytest.raises(ValidationError, match=message) as info:
        LLMTrainingJobSpec.model_validate(spec)
    assert info.value.errors()[0]["loc"][0] == where  # the error names where it is


def test_the_full_template_is_accepted_by_both_kinds() -> None:
    LLMTrainingJobSpec.model_validate(_spec(podTemplate=TEMPLATE))
    LLMDeploymentSpec.model_validate(
        {
            "model": {"uri": "hf://org/m"},
            "podTemplate": TEMPLATE,
            "head": {"podTemplate": {"labels": {"a": "b"}}},
        }
    )


def test_reserved_names_cover_what_the_operator_builds() -> None:
    pod = b.worker_pod(_cluster(model={"uri": "pvc://models/m"}), 0, "auth")
    container = pod["spec"]["containers"][0]
    for env in container["env"]:
        name = env["name"]
        assert name in RESERVED_ENV or name.startswith(("LLMRAY_", "RAY_AUTH")), name
    for volume in pod["spec"]["volumes"]:
        assert volume["name"] in RESERVED_VOLUMES or volume["name"].startswith("pvc-"), volume
    for mount in container["volumeMounts"]:
        assert any(
            mount["mountPath"] == p or mount["mountPath"].startswith(p + "/") for p in RESERVED_MOUNT_PATHS
        )


# --- merging ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/etc/ssl/certs", "/etc/ssl/certs/corp", "/usr/local/share/ca-certificates/corp.crt", "/data"]
)
def test_ca_bundles_and_data_paths_may_be_mounted(path: str) -> None:
    PodTemplate.model_validate({**SCRATCH, "volumeMounts": [{"name": "v", "mountPath": path}]})


def test_merge_may_exceed_a_lists_limit_without_failing() -> None:
    """5 + 5 pull secrets (at most 8 each): both templates are valid, so is the role's pod."""
    shared = PodTemplate.model_validate({"imagePullSecrets": [{"name": f"shared-{i}"} for i in range(5)]})
    role = PodTemplate.model_validate({"imagePullSecrets": [{"name": f"role-{i}"} for i in range(5)]})
    merged = merge_templates(shared, role)
    assert merged is not None and len(merged.image_pull_secrets or []) == 10
    dumped = merged.model_dump(by_alias=True, exclude_none=True)
    assert [s["name"] for s in dumped["imagePullSecrets"]][-1] == "role-4"


def test_role_template_adds_to_the_shared_one_and_wins_a_clash() -> None:
    shared = PodTemplate.model_validate(TEMPLATE)
    role = PodTemplate.model_validate(
        {
            "labels": {"team": "vision", "role": "worker"},
            "env": [{"name": "WANDB_MODE", "value": "online"}, {"name": "EXTRA", "value": "1"}],
            "volumes": [{"name": "creds", "secret": {"secretName": "other"}}],
            "priorityClassName": "ml-low",
        }
    )
    merged = merge_templates(shared, role)
    assert merged is not None
    assert merged.labels == {"team": "vision", "cost-center": "42", "role": "worker"}
    env = {e.name: e for e in merged.env or []}
    assert env["WANDB_MODE"].value == "online" and "EXTRA" in env and "S3_KEY" in env
    assert [v.name for v in merged.volumes or []] == ["ca", "creds", "cloud-token", "data"]
    creds = next(v for v in merged.volumes or [] if v.name == "creds")
    assert creds.secret is not None and creds.secret.secret_name == "other"
    assert merged.priority_class_name == "ml-low" and merged.service_account_name == "trainer"
    assert merge_templates(None, role) is role and merge_templates(shared, None) is shared


# --- the pods -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["head", "worker"])
def test_template_fields_land_on_the_pods(which: str) -> None:
    cluster = _cluster(podTemplate=TEMPLATE)
    pod = b.head_pod(cluster, "auth") if which == "head" else b.worker_pod(cluster, 0, "auth")
    spec, meta = pod["spec"], pod["metadata"]
    container = spec["containers"][0]
    assert meta["labels"]["team"] == "nlp" and meta["labels"][LABEL_RAY_CLUSTER] == "ft"
    assert (
        meta["annotations"]["example.com/owner"] == "nlp" and ANNOTATION_TEMPLATE_HASH in meta["annotations"]
    )
    assert spec["serviceAccountName"] == "trainer"
    assert spec["automountServiceAccountToken"] is False  # a token only where a volume asks for one
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert (spec["priorityClassName"], spec["runtimeClassName"], spec["schedulerName"]) == (
        "ml-high",
        "nvidia",
        "volcano",
    )
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    env = {e["name"]: e for e in container["env"]}
    assert (
        env["WANDB_MODE"]["value"] == "offline" and env["S3_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3"
    )
    assert "RAY_AUTH_TOKEN" in env  # the operator's own env is still there
    assert container["envFrom"] == [{"prefix": "CFG_", "configMapRef": {"name": "settings"}}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert {"dshm", "tmp", "ray-session", "model-cache", "ca", "creds", "cloud-token", "data"} <= set(volumes)
    assert volumes["creds"]["secret"] == {"secretName": "s3", "defaultMode": 0o440}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "datasets", "readOnly": True}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/etc/ssl/certs/custom"] == "ca" and mounts["/dev/shm"] == "dshm"
    # Still restricted: the security contexts are the operator's.
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_per_role_templates_reach_only_their_role() -> None:
    cluster = _cluster(
        head={"podTemplate": {"labels": {"role": "head"}}},
        workers={**TRAIN["workers"], "podTemplate": {"priorityClassName": "gpu-batch"}},
    )
    head, worker = b.head_pod(cluster, "auth"), b.worker_pod(cluster, 0, "auth")
    assert head["metadata"]["labels"]["role"] == "head" and "role" not in worker["metadata"]["labels"]
    assert worker["spec"]["priorityClassName"] == "gpu-batch" and "priorityClassName" not in head["spec"]


def test_template_changes_recreate_pods_and_no_template_keeps_the_old_hash() -> None:
    plain = _cluster()
    labelled = _cluster(podTemplate={"labels": {"team": "nlp"}})
    empty = _cluster(podTemplate={})
    hashes = {
        name: b.pod_template_hash(cluster, "worker", "auth")
        for name, cluster in (("plain", plain), ("labelled", labelled), ("empty", empty))
    }
    assert hashes["labelled"] != hashes["plain"]  # a label change recreates the pods
    assert hashes["empty"] == hashes["plain"]  # an empty template changes nothing
    # The operator's own labels win even if validation was skipped.
    template = PodTemplate.model_construct(labels={LABEL_RAY_CLUSTER: "evil"})
    forced = b.ClusterSpec(**{**plain.__dict__, "pod_template": template})
    assert b.worker_pod(forced, 0, "auth")["metadata"]["labels"][LABEL_RAY_CLUSTER] == "ft"


def test_deployment_pods_get_their_templates_too() -> None:
    spec = LLMDeploymentSpec.model_validate(
        {
            "model": {"uri": "hf://org/m"},
            "podTemplate": {"imagePullSecrets": [{"name": "registry"}], "labels": {"team": "chat"}},
            "workers": {"podTemplate": {"priorityClassName": "serving-high"}},
        }
    )
    owner = Owner("LLMDeployment", "chat", "ml", "9c1b7e43-aaaa-bbbb-cccc-ddddeeeeffff")
    cluster = b.deployment_cluster(owner, spec, spec.model.uri)
    head, worker = b.head_pod(cluster, "auth"), b.worker_pod(cluster, 0, "auth")
    for pod in (head, worker):
        assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}]
        assert pod["metadata"]["labels"]["team"] == "chat"
    assert worker["spec"]["priorityClassName"] == "serving-high" and "priorityClassName" not in head["spec"]


@pytest.mark.parametrize(
    ("prefix", "ok"),
    [
        (None, True),
        ("APP_", True),
        ("WANDB_", True),
        ("LD_", False),  # + PRELOAD
        ("L", False),  # + D_PRELOAD
        ("P", False),  # + ATH / YTHONPATH
        ("PYTHONX_", False),
        ("NVIDIA_", False),  # + VISIBLE_DEVICES
        ("E", False),  # + NV
        ("RAY_AUTH_", False),
    ],
)
def test_an_env_from_prefix_cannot_complete_a_guarded_name(prefix: str | None, ok: bool) -> None:
    source = {"configMapRef": {"name": "cfg"}, **({"prefix": prefix} if prefix else {})}
    if ok:
        EnvFromSource.model_validate(source)
    else:
        with pytest.raises(ValidationError, match=r"envFrom\[\]\.prefix"):
            EnvFromSource.model_validate(source)
