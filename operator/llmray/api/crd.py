"""Generate the CustomResourceDefinitions from the pydantic models.

Pydantic's JSON Schema is close to what Kubernetes wants but not structural: it uses ``$ref``,
``anyOf`` for optionals and ``title`` noise. :func:`structural` rewrites it into the OpenAPI v3
subset the API server accepts, keeping descriptions, defaults, enums, bounds and CEL rules.
"""

from __future__ import annotations

import copy
from types import ModuleType
from typing import Any

import yaml
from pydantic import BaseModel

from . import deployment, training
from .common import GROUP, NAME_RULES, VERSION

_DROP = {"title", "discriminator"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every ``$ref`` and turn ``anyOf [X, null]`` into plain X (optional = not required)."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        # A field's own description beats the referenced model's docstring.
        merged = {**target, **extra}
        return _resolve(merged, defs)
    if "anyOf" in node:
        options = [opt for opt in node["anyOf"] if opt.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            if rest.get("default", "absent") is None:
                rest.pop("default")
            return {**_resolve({**options[0], **rest}, defs), "x-llmray-optional": True}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "properties":
            out[key] = {name: _resolve(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = {**_resolve(value, defs), "x-llmray-optional": True}
        else:
            out[key] = _resolve(value, defs)
    return out


def _finish(node: Any) -> Any:
    """Post-pass: object defaults so nested defaults apply, int-or-string cleanup, formats."""
    if isinstance(node, list):
        return [_finish(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: _finish(v) for k, v in node.items()}
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.pop("anyOf", None)
        if "default" in node:
            node["default"] = str(node["default"])
    optional = node.pop("x-llmray-optional", False)
    if node.get("type") == "object" and "properties" in node:
        if node.get("additionalProperties") is False:
            node.pop("additionalProperties")  # structural schemas prune unknown fields instead
        if "default" not in node and not optional and not node.get("required"):
            # Without a default an absent parent object hides its children's defaults. The default
            # is spelled out in full (not {}): the API server checks defaults against CEL rules
            # without defaulting inside them, so a rule like minReplicas <= maxReplicas needs both.
            node["default"] = copy.deepcopy(
                {k: v["default"] for k, v in node["properties"].items() if "default" in v}
            )  # a copy: a shared object would be written as a YAML alias
    if (
        node.get("type") == "object"
        and "additionalProperties" in node
        and node["additionalProperties"] is True
    ):
        node.pop("additionalProperties")
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" in node:
        node.pop("additionalProperties")
    if node.get("format") == "date-time":
        node["type"] = "string"
    # JSON Schema 2020-12 (pydantic) writes exclusive bounds as numbers; OpenAPI v3.0 (Kubernetes)
    # wants the bound in minimum/maximum and a boolean flag.
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(node.get(flag), int | float) and not isinstance(node.get(flag), bool):
            node[bound] = node.pop(flag)
            node[flag] = True
    if isinstance(node.get("properties"), dict):
        for name in node.get("required") or []:
            # A required field never gets a server-side default: absent must be an error.
            node["properties"].get(name, {}).pop("default", None)
    return node


def structural(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model, as a CRD wants it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _finish(_resolve(raw, defs))


def _strip_defaults(node: Any) -> Any:
    """Status is written by the operator only: no server-side defaults there."""
    if isinstance(node, list):
        return [_strip_defaults(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}


def _crd(api: ModuleType, spec_model: type[BaseModel], status_model: type[BaseModel]) -> dict[str, Any]:
    """The CRD of the kind an API module defines (KIND, PLURAL, SHORT_NAME, DESCRIPTION, PRINTER_COLUMNS)."""
    kind: str = api.KIND
    plural: str = api.PLURAL
    spec_schema = structural(spec_model)
    spec_schema.pop("default", None)
    status_schema = _strip_defaults(structural(status_model))
    schema = {
        "type": "object",
        "description": api.DESCRIPTION,
        "required": ["spec"],
        "x-kubernetes-validations": [*NAME_RULES, *getattr(api, "ROOT_RULES", [])],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion of this object (llmray.io/v1alpha1).",
            },
            "kind": {"type": "string", "description": f"Kind of this object ({kind})."},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "llmray", "app.kubernetes.io/part-of": "llmray"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [api.SHORT_NAME],
                "categories": ["llmray"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": api.PRINTER_COLUMNS,
                }
            ],
        },
    }


def training_crd() -> dict[str, Any]:
    """The LLMTrainingJob CustomResourceDefinition."""
    return _crd(training, training.LLMTrainingJobSpec, training.LLMTrainingJobStatus)


def deployment_crd() -> dict[str, Any]:
    """The LLMDeployment CustomResourceDefinition."""
    return _crd(deployment, deployment.LLMDeploymentSpec, deployment.LLMDeploymentStatus)


def render_crds() -> dict[str, str]:
    """File name -> YAML text of every CRD, as committed under crds/."""
    header = "# Generated by `llmray crds` from llmray.api; do not edit by hand.\n"
    return {
        f"{crd['metadata']['name']}.yaml": header + yaml.safe_dump(crd, sort_keys=False, width=120)
        for crd in (training_crd(), deployment_crd())
    }
