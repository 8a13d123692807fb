"""Pod templates against the real API server: the CRD refuses what breaks Pod Security 'restricted'
or the operator's reserved names (naming the field), accepts the documented example, and
``kubectl explain`` describes the fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import Kube

from .test_crd_validation import TRAINING, _t
from .test_operator_fixtures import assert_refused, dry_run, with_field

pytestmark = pytest.mark.cluster

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "training-pod-template.yaml"
SCRATCH = [{"name": "v", "emptyDir": {}}]

# (id, manifest, text the error must contain)
REFUSED: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "host-path",
        _t("spec.podTemplate", {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}),
        ["unknown field", "spec.podTemplate.volumes[0].hostPath"],
    ),
    (
        "privileged",
        _t("spec.workers.podTemplate", {"securityContext": {"privileged": True}}),
        ["unknown field", "spec.workers.podTemplate.securityContext"],
    ),
    (
        "host-network",
        _t("spec.head.podTemplate", {"hostNetwork": True}),
        ["unknown field", "spec.head.podTemplate.hostNetwork"],
    ),
    (
        "volume-without-source",
        _t("spec.podTemplate", {"volumes": [{"name": "v"}]}),
        ["spec.podTemplate.volumes[0]", "set exactly one of configMap, secret, emptyDir"],
    ),
    (
        "reserved-label",
        _t("spec.workers.podTemplate", {"labels": {"ray.io/node-type": "head"}}),
        ["spec.workers.podTemplate.labels", "reserved"],
    ),
    (
        "reserved-annotation",
        _t("spec.podTemplate", {"annotations": {"llmray.io/template-hash": "x"}}),
        ["spec.podTemplate.annotations", "reserved"],
    ),
    (
        "reserved-env",
        _t("spec.podTemplate", {"env": [{"name": "RAY_AUTH_TOKEN", "value": "mine"}]}),
        ["spec.podTemplate.env", "set by the operator"],
    ),
    (
        "reserved-volume",
        _t("spec.head.podTemplate", {"volumes": [{"name": "dshm", "emptyDir": {}}]}),
        ["spec.head.podTemplate.volumes", "operator's volumes"],
    ),
    (
        "reserved-mount",
        _t(
            "spec.podTemplate", {"volumes": SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/tmp/ray"}]}
        ),
        ["spec.podTemplate.volumeMounts", "operator's mount paths"],
    ),
    (
        "gpu-visibility-env",
        _t("spec.workers.podTemplate", {"env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]}),
        ["spec.workers.podTemplate.env", "NVIDIA_"],
    ),
    (
        "code-loading-env",
        _t("spec.podTemplate", {"env": [{"name": "LD_PRELOAD", "value": "/x.so"}]}),
        ["spec.podTemplate.env", "set by the operator"],
    ),
    (
        "env-from-prefix-completing-a-loader-name",
        _t("spec.podTemplate", {"envFrom": [{"prefix": "LD_", "configMapRef": {"name": "c"}}]}),
        ["spec.podTemplate.envFrom[0]", "use a prefix of your own"],
    ),
    (
        "mount-over-code",
        _t(
            "spec.podTemplate",
            {"volumes": SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/usr/local/lib"}]},
        ),
        ["spec.podTemplate.volumeMounts", "hold the pod's code"],
    ),
    (
        "mount-path-not-normalised",
        _t(
            "spec.podTemplate",
            {"volumes": SCRATCH, "volumeMounts": [{"name": "v", "mountPath": "/x/../usr"}]},
        ),
        ["spec.podTemplate.volumeMounts[0].mountPath"],
    ),
    (
        "sub-path-climbing",
        _t(
            "spec.podTemplate",
            {
                "volumes": SCRATCH,
                "volumeMounts": [{"name": "v", "mountPath": "/data", "subPath": "a/../../x"}],
            },
        ),
        ["spec.podTemplate.volumeMounts[0].subPath", "must not contain '..'"],
    ),
    (
        "mount-without-volume",
        _t("spec.podTemplate", {"volumeMounts": [{"name": "ghost", "mountPath": "/x"}]}),
        ["spec.podTemplate.volumeMounts", "same podTemplate"],
    ),
    (
        "duplicate-env",
        _t("spec.podTemplate", {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}),
        ["spec.podTemplate.env[1]", "Duplicate value"],
    ),
    (
        "env-value-and-source",
        _t(
            "spec.podTemplate",
            {"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
        ),
        ["spec.podTemplate.env[0].valueFrom", "not both"],
    ),
]


@pytest.mark.parametrize(("manifest", "expected"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_unsafe_or_reserved_template_is_refused_naming_the_field(
    kube: Kube, crds: None, manifest: dict[str, Any], expected: list[str]
) -> None:
    assert_refused(kube, manifest, expected)


def test_a_pruned_volume_source_is_still_refused(kube: Kube, crds: None) -> None:
    """A client that skips field validation gets hostPath pruned, and the empty volume refused."""
    manifest = _t("spec.podTemplate", {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]})
    proc = kube.kubectl(
        "create", "--dry-run=server", "--validate=false", "-n", "default", "-f", "-",
        input=yaml.safe_dump(manifest), check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "set exactly one of configMap" in proc.stderr, proc.stderr


def test_the_example_template_is_accepted_as_written(kube: Kube, crds: None) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    proc = dry_run(kube, doc)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["spec"]
    assert spec["podTemplate"] == doc["spec"]["podTemplate"]  # nothing pruned
    full = with_field(TRAINING, "spec.podTemplate", doc["spec"]["podTemplate"])
    assert dry_run(kube, full).returncode == 0


def test_kubectl_explain_describes_the_template(kube: Kube, crds: None) -> None:
    out = kube.kubectl("explain", "llmtrainingjob.spec.podTemplate").stdout
    for field in (
        "imagePullSecrets",
        "priorityClassName",
        "serviceAccountName",
        "volumes",
        "topologySpreadConstraints",
    ):
        assert field in out, out
    out = kube.kubectl("explain", "llmdeployment.spec.workers.podTemplate.volumes").stdout
    assert "restricted" in out and "persistentVolumeClaim" in out
