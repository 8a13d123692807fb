"""The generated CRDs: committed copies are fresh, schemas are structural, kubectl output reads well."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmray.api.crd import deployment_crd, render_crds, training_crd
from llmray.cli import main

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_committed_crds_are_not_stale(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds", "--check", "--out", str(REPO / "crds")]) == 0, capsys.readouterr().err


def test_check_reports_stale_files(tmp_path: Path) -> None:
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 1
    assert main(["crds", "--out", str(tmp_path)]) == 0
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 0


def test_chart_crds_are_identical_copies() -> None:
    for name, text in render_crds().items():
        assert (REPO / "charts" / "llmray" / "crds" / name).read_text() == text, (
            f"charts/llmray/crds/{name} differs from crds/{name}: run `make crds` (llmray crds && cp)"
        )


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, sub in (node.get("properties") or {}).items():
            out.extend(_walk(sub, f"{path}.{key}"))
        if isinstance(node.get("items"), dict):
            out.extend(_walk(node["items"], f"{path}[]"))
        if isinstance(node.get("additionalProperties"), dict):
            out.extend(_walk(node["additionalProperties"], f"{path}{{}}"))
    return out


@pytest.mark.parametrize("crd", [training_crd(), deployment_crd()], ids=["training", "deployment"])
def test_schema_is_structural_and_documented(crd: dict[str, Any]) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    for banned in ("$ref", "anyOf", "allOf", "oneOf", "$defs", "title:", "const:"):
        assert banned not in text, banned
    for path, node in _walk(schema["properties"]["spec"], "spec"):
        if not path.endswith(("[]", "{}")):  # list items and map values are explained by their parent
            assert node.get("description"), f"{path} has no description (kubectl explain would be blank)"
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"
        for flag in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(flag, False), bool), f"{path}.{flag} must be a boolean in OpenAPI v3.0"
        if node.get("type") == "object" and "properties" in node and "default" in node:
            assert "required" not in node, f"{path}: an object with required fields cannot default"
        for name in node.get("required") or []:
            assert "default" not in node["properties"][name], f"{path}.{name}: required and defaulted"


def test_names_printer_columns_and_status() -> None:
    t, d = training_crd(), deployment_crd()
    assert t["spec"]["names"]["shortNames"] == ["ltj"]
    assert d["spec"]["names"]["shortNames"] == ["llmd"]
    for crd in (t, d):
        assert crd["spec"]["names"]["categories"] == ["llmray"]
        assert crd["spec"]["scope"] == "Namespaced"
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        rules = version["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
        assert any("metadata.name" in r["rule"] for r in rules)
    t_cols = [
        c["name"] for c in t["spec"]["versions"][0]["additionalPrinterColumns"] if not c.get("priority")
    ]
    d_cols = [
        c["name"] for c in d["spec"]["versions"][0]["additionalPrinterColumns"] if not c.get("priority")
    ]
    assert {"Phase", "Progress", "Loss", "Age"} <= set(t_cols)
    assert {"Phase", "Ready", "Desired", "Endpoint", "Age"} <= set(d_cols)


def test_cel_rules_present() -> None:
    t = yaml.safe_dump(training_crd())
    d = yaml.safe_dump(deployment_crd())
    assert "self.method == 'lora' || !has(self.lora)" in t
    assert "has(self.uri) != has(self.fromTrainingJob)" in d
    assert "self.minReplicas <= self.maxReplicas" in d


def test_object_defaults_are_complete() -> None:
    # The API server checks defaults against CEL rules without defaulting inside them.
    spec = deployment_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["autoscaling"]["default"]["minReplicas"] == 1
    assert spec["properties"]["autoscaling"]["default"]["maxReplicas"] == 1
    assert spec["properties"]["workers"]["default"]["resources"]["gpu"] == 1
    assert "default" not in spec["properties"]["model"]
