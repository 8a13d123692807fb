"""Least privilege: the operator, authenticated as the chart's ServiceAccount with only the chart's
RBAC, does its whole job -- and that identity can do nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.kube import Kube, wait_for

from .test_operator_fixtures import (
    REPO,
    apply,
    events_for,
    example,
    pods_of,
    running_ready,
    status_of,
    wait_cluster_ready,
)

pytestmark = [pytest.mark.cluster, pytest.mark.helm]

RELEASE = "llmray"
SA = "llmray"  # the chart's ServiceAccount for release "llmray" (fullname == release name)


def _chart_rbac(
    kube: Kube, namespace: str, release: str = RELEASE, cluster: bool = False
) -> list[dict[str, Any]]:
    scope = [] if cluster else ["--set", f"watchNamespaces={{{namespace}}}"]
    out = subprocess_run(
        [
            str(kube.bin_dir / "helm"), "template", release, str(REPO / "charts" / "llmray"),
            "--namespace", namespace, *scope,
            "--show-only", "templates/serviceaccount.yaml",
            "--show-only", "templates/rbac.yaml",
        ]
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


def subprocess_run(cmd: list[str]) -> str:
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _token_kubeconfig(kube: Kube, namespace: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (a TokenRequest token), nothing more."""
    token = kube.kubectl("create", "token", SA, "-n", namespace, "--duration=1h").stdout.strip()
    admin = json.loads(kube.kubectl("config", "view", "--minify", "--raw", "-o", "json").stdout)
    cluster = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": "sa", "namespace": namespace}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _can(kube: Kube, namespace: str, verb: str, resource: str, ns: str | None = None, sa: str = SA) -> bool:
    resource, _, sub = resource.partition("/")
    extra = [f"--subresource={sub}"] if sub else []
    proc = kube.kubectl(
        "auth", "can-i", verb, resource, *extra,
        "--as", f"system:serviceaccount:{namespace}:{sa}",
        "-n", ns or namespace,
        check=False,
    )  # fmt: skip
    return proc.stdout.strip() == "yes"


def test_operator_works_with_exactly_the_charts_permissions(
    kube: Kube, namespace: str, operator_factory: Any, tmp_path: Path
) -> None:
    apply(kube, _chart_rbac(kube, namespace), namespace)
    kubeconfig = _token_kubeconfig(kube, namespace, tmp_path / "sa.kubeconfig")
    # with leader election as the chart runs it: the Lease rules suffice
    election = ("--leader-elect", "--lease-name", RELEASE, "--lease-namespace", namespace)
    op = operator_factory(namespace, *election, kubeconfig=kubeconfig).start()

    # the whole job: training + deployment (with an API key Secret), repair, in-place Service change
    apply(kube, example("training-tiny-cpu.yaml"), namespace)
    (dep,) = example("deployment-tiny-cpu.yaml")
    dep["spec"]["apiKeySecretRef"] = {"name": "chat-key", "key": "key"}
    kube.kubectl("create", "secret", "generic", "chat-key", "-n", namespace, "--from-literal=key=k")
    apply(kube, dep, namespace)
    wait_cluster_ready(kube, "LLMTrainingJob", namespace, "tiny-train", 2)
    wait_cluster_ready(kube, "LLMDeployment", namespace, "tiny-chat", 1)
    victim = pods_of(kube, namespace, "tiny-train", "worker")[0]
    client.CoreV1Api(kube.api_client).delete_namespaced_pod(victim.metadata.name, namespace)
    wait_for(
        lambda: (
            victim.metadata.uid
            not in {p.metadata.uid for p in pods_of(kube, namespace, "tiny-train", "worker")}
            and len(pods_of(kube, namespace, "tiny-train", "worker")) == 2
            and all(running_ready(p) for p in pods_of(kube, namespace, "tiny-train", "worker"))
        ),
        timeout=60,
        what="worker replaced",
    )
    dep["spec"]["service"] = {"type": "NodePort", "port": 8000}
    apply(kube, dep, namespace)
    wait_for(
        lambda: (
            client.CoreV1Api(kube.api_client).read_namespaced_service("tiny-chat-serve", namespace).spec.type
            == "NodePort"
        ),
        timeout=60,
        what="serve Service patched to NodePort",
    )
    wait_for(
        lambda: (
            any(e.reporting_component == "llmray-operator" for e in events_for(kube, namespace, "tiny-train"))
            or any(
                e.source and e.source.component == "llmray-operator"
                for e in events_for(kube, namespace, "tiny-train")
            )
        ),
        timeout=30,
        what="events posted by the operator",
    )
    for kind, name in (("LLMTrainingJob", "tiny-train"), ("LLMDeployment", "tiny-chat")):
        reconciled = next(
            c for c in status_of(kube, kind, namespace, name)["conditions"] if c["type"] == "Reconciled"
        )
        assert reconciled["status"] == "True", reconciled
    log = op.log_path.read_text()
    assert " 403" not in log and "Forbidden" not in log, op.log_tail()


@pytest.mark.parametrize(
    ("verb", "resource", "allowed"),
    [
        ("list", "llmtrainingjobs.llmray.io", True),
        ("watch", "llmdeployments.llmray.io", True),
        ("patch", "llmtrainingjobs.llmray.io/status", True),
        ("create", "pods", True),
        ("delete", "pods", True),
        ("create", "services", True),
        ("patch", "services", True),
        ("create", "secrets", True),
        ("create", "networkpolicies.networking.k8s.io", True),
        ("patch", "networkpolicies.networking.k8s.io", True),
        ("create", "events", True),
        # nothing more
        ("patch", "llmtrainingjobs.llmray.io", False),
        ("delete", "llmdeployments.llmray.io", False),
        ("create", "llmtrainingjobs.llmray.io", False),
        ("update", "pods", False),
        ("delete", "services", False),
        # Secrets: create only (the Ray token is derived, users' Secrets are read by the kubelet)
        ("get", "secrets", False),
        ("list", "secrets", False),
        ("watch", "secrets", False),
        ("delete", "secrets", False),
        ("update", "secrets", False),
        ("delete", "networkpolicies.networking.k8s.io", False),
        ("get", "configmaps", False),
        ("create", "deployments.apps", False),
        ("create", "pods/exec", False),
        ("create", "serviceaccounts/token", False),
        ("create", "roles.rbac.authorization.k8s.io", False),
        ("list", "nodes", False),
        ("list", "namespaces", False),
        ("list", "customresourcedefinitions.apiextensions.k8s.io", False),
    ],
)
def test_chart_role_allows_exactly_what_is_used(
    kube: Kube, namespace: str, crds: None, verb: str, resource: str, allowed: bool
) -> None:
    apply(kube, _chart_rbac(kube, namespace), namespace)
    assert _can(kube, namespace, verb, resource) is allowed


def _review(kube: Kube, namespace: str, verb: str, resource: str, ns: str | None) -> bool:
    """A SubjectAccessReview for the chart's ServiceAccount (``kubectl auth can-i`` answers "no"
    for resource types the API server does not serve, and Kueue's CRDs may not be installed)."""
    resource, _, sub = resource.partition("/")
    plural, _, group = resource.partition(".")
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=f"system:serviceaccount:{namespace}:{SA}",
            groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, group=group, resource=plural, subresource=sub or None, namespace=ns
            ),
        )
    )
    answer = client.AuthorizationV1Api(kube.api_client).create_subject_access_review(review)
    return bool(answer.status.allowed)


@pytest.mark.parametrize(
    ("verb", "resource", "allowed"),
    [
        # the jobs' Workloads and their status; flavors and priority classes read by name
        ("create", "workloads.kueue.x-k8s.io", True),
        ("watch", "workloads.kueue.x-k8s.io", True),
        ("delete", "workloads.kueue.x-k8s.io", True),
        ("patch", "workloads.kueue.x-k8s.io/status", True),
        ("get", "resourceflavors.kueue.x-k8s.io", True),
        ("get", "workloadpriorityclasses.kueue.x-k8s.io", True),
        ("get", "localqueues.kueue.x-k8s.io", True),
        # nothing more
        ("update", "workloads.kueue.x-k8s.io", False),
        ("update", "workloads.kueue.x-k8s.io/status", False),
        ("list", "resourceflavors.kueue.x-k8s.io", False),
        ("patch", "resourceflavors.kueue.x-k8s.io", False),
        ("create", "clusterqueues.kueue.x-k8s.io", False),
        ("patch", "localqueues.kueue.x-k8s.io", False),
    ],
)
def test_chart_role_kueue_rules(
    kube: Kube, namespace: str, crds: None, verb: str, resource: str, allowed: bool
) -> None:
    """Namespaced mode: Workloads through the Role, flavors and priority classes through the small
    cluster-wide ``<release>-kueue`` ClusterRole (they are cluster-scoped)."""
    apply(kube, _chart_rbac(kube, namespace), namespace)
    cluster_scoped = resource.split(".")[0] in ("resourceflavors", "workloadpriorityclasses", "clusterqueues")
    assert _review(kube, namespace, verb, resource, None if cluster_scoped else namespace) is allowed


def test_chart_role_does_not_reach_other_namespaces(kube: Kube, namespace: str, crds: None) -> None:
    apply(kube, _chart_rbac(kube, namespace), namespace)
    assert _can(kube, namespace, "create", "pods")
    assert not _can(kube, namespace, "create", "pods", ns="default")
    assert not _can(kube, namespace, "list", "secrets", ns="kube-system")


@pytest.mark.parametrize("mode", ["namespaced", "cluster"])
def test_operator_cannot_read_secrets_in_either_chart_mode(
    kube: Kube, namespace: str, crds: None, mode: str
) -> None:
    """``kubectl auth can-i get secrets -n kube-system`` is no for the chart's ServiceAccount, and
    in cluster mode it cannot read (get, list or watch) a Secret of any namespace either."""
    import uuid

    release = f"llmray-{uuid.uuid4().hex[:6]}"  # fullname == release: SA, ClusterRole and binding
    docs = _chart_rbac(kube, namespace, release=release, cluster=mode == "cluster")
    cluster_roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    assert (release in cluster_roles) is (mode == "cluster")
    # in both modes the only other cluster-wide grant: get on Kueue's flavors and priority classes
    assert [r for n, d in cluster_roles.items() if n != release for r in d["rules"]] == [
        {
            "apiGroups": ["kueue.x-k8s.io"],
            "resources": ["resourceflavors", "workloadpriorityclasses"],
            "verbs": ["get"],
        }
    ]
    apply(kube, docs, namespace)
    try:
        assert _can(kube, namespace, "create", "pods", sa=release)
        for ns in ("kube-system", "default", namespace):
            for verb in ("get", "list", "watch"):
                assert not _can(kube, namespace, verb, "secrets", ns=ns, sa=release), (verb, ns)
        assert _can(kube, namespace, "create", "secrets", sa=release)
        assert _can(kube, namespace, "create", "pods", ns="default", sa=release) is (mode == "cluster")
    finally:
        kube.kubectl(
            "delete", "clusterrole,clusterrolebinding", release, f"{release}-kueue", "--ignore-not-found",
            check=False,
        )  # fmt: skip
