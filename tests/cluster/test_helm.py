"""The Helm chart: lints, renders manifests the API server accepts, installs and uninstalls."""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

import pytest
import yaml

from tests.kube import Kube

from .test_operator_fixtures import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.helm]

CHART = REPO / "charts" / "llmray"


def _helm(kube: Kube, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(kube.bin_dir / "helm"), "--kubeconfig", str(kube.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_lint(kube: Kube) -> None:
    _helm(kube, "lint", "--strict", str(CHART))
    _helm(kube, "lint", "--strict", str(CHART), "--set", "watchNamespaces={a,b}")


def test_values_schema_rejects_bad_values(kube: Kube) -> None:
    for bad in (
        "operator.logLevel=loud",
        "health.port=0",
        "watchNamespaces={Not_A_Namespace}",
        "unknownKey=1",
    ):
        proc = _helm(kube, "template", "x", str(CHART), "--set", bad, check=False)
        assert proc.returncode != 0, bad
        assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


def test_two_replicas_without_leader_election_are_refused(kube: Kube) -> None:
    proc = _helm(kube, "template", "x", str(CHART), "--set", "leaderElection.enabled=false", check=False)
    assert proc.returncode != 0 and "needs leaderElection.enabled" in proc.stderr, proc.stderr
    one = _helm(kube, "template", "x", str(CHART), "--set", "leaderElection.enabled=false,replicas=1").stdout
    deployment = next(d for d in _docs(one) if d["kind"] == "Deployment")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert "--leader-elect" not in deployment["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_rendered_manifests_are_accepted_by_the_api_server(kube: Kube, namespace: str, scope: str) -> None:
    args = ["template", f"r{uuid.uuid4().hex[:6]}", str(CHART), "--namespace", namespace, "--include-crds"]
    if scope == "namespaced":
        args += ["--set", f"watchNamespaces={{{namespace}}}"]
    rendered = _helm(kube, *args).stdout
    docs = _docs(rendered)
    kinds = sorted({d["kind"] for d in docs})
    expected = {"CustomResourceDefinition", "Deployment", "Service", "ServiceAccount", "Secret"}
    expected |= {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    expected |= {"Role", "RoleBinding"}  # the leader-election Lease, in the release namespace
    # cluster scope: the operator's ClusterRole; both: <release>-kueue (get on Kueue's flavors and
    # priority classes, which are cluster-scoped)
    expected |= {"ClusterRole", "ClusterRoleBinding"}
    assert set(kinds) == expected, kinds
    cluster_roles = sorted(d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole")
    assert len(cluster_roles) == (2 if scope == "cluster" else 1) and cluster_roles[-1].endswith("-kueue")
    assert (
        "--kueue-api=kueue.x-k8s.io/v1beta2"
        in next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]
    )
    kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered)

    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][0] == "operator"
    assert ("--all-namespaces" in container["args"]) is (scope == "cluster")
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["port"] == "health"
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    # two replicas, one leader: a rolling update is safe, replicas spread over nodes where possible
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "--leader-elect" in container["args"]
    assert f"--lease-namespace={namespace}" in container["args"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    election = next(
        d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-leader-election")
    )
    assert election["metadata"]["namespace"] == namespace
    lease_rules = [r for r in election["rules"] if "leases" in r["resources"]]
    assert sorted(v for r in lease_rules for v in r["verbs"]) == ["create", "get", "update"]
    assert all(r["apiGroups"] == ["coordination.k8s.io"] for r in election["rules"])
    # the key the Ray tokens derive from: mounted by the kubelet, never read through the API
    key = next(d for d in docs if d["kind"] == "Secret")
    assert key["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(key["data"]["key"]) >= 64
    volume = next(v for v in pod["volumes"] if v["name"] == "auth-key")
    assert volume["secret"]["secretName"] == key["metadata"]["name"]
    assert "--auth-key-file=/var/run/llmray/auth-key/key" in container["args"]
    assert f"--operator-namespace={namespace}" in container["args"]
    rules = next(
        d
        for d in docs
        if d["kind"] in ("Role", "ClusterRole")
        and not d["metadata"]["name"].endswith(("-election", "-kueue"))
    )["rules"]
    secrets = [r for r in rules if "secrets" in r["resources"]]
    assert [r["verbs"] for r in secrets] == [["create"]]


def test_chart_crds_match_the_generated_ones(kube: Kube) -> None:
    for path in (REPO / "crds").glob("*.yaml"):
        assert (CHART / "crds" / path.name).read_text() == path.read_text()


def test_install_and_uninstall(kube: Kube, namespace: str, crds: None) -> None:
    release = f"llmray-{uuid.uuid4().hex[:6]}"
    kube.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )  # the operator's own pod passes the restricted standard too
    try:
        _helm(
            kube, "install", release, str(CHART),
            "--namespace", namespace,
            "--set", f"watchNamespaces={{{namespace}}}",
            "--wait", "--timeout", "3m",
        )  # fmt: skip
        status = _helm(kube, "status", release, "--namespace", namespace, "-o", "yaml").stdout
        assert yaml.safe_load(status)["info"]["status"] == "deployed"
        out = kube.kubectl(
            "get", "deploy", release, "-n", namespace, "-o", "jsonpath={.status.readyReplicas}"
        ).stdout
        assert out == "2"
        notes = _helm(kube, "get", "notes", release, "--namespace", namespace).stdout
        assert "kubectl get llmray" in notes
    finally:
        _helm(kube, "uninstall", release, "--namespace", namespace, "--wait", check=False)
    assert not kube.kubectl("get", "deploy,sa,role,rolebinding", "-n", namespace, "-l",
                            f"app.kubernetes.io/instance={release}", "-o", "name").stdout.strip()  # fmt: skip
