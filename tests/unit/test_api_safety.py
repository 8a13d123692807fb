"""Tenant-safety rules that do not depend on the user live in the API (CRD CEL + pydantic mirror)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from llmray.api import LLMDeploymentSpec
from llmray.api.crd import deployment_crd
from llmray.api.deployment import ENGINE_EXTRA_ALLOWED

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {"model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}}


def _spec(**fields: Any) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate({**BASE, **fields})


@pytest.mark.parametrize("key", ["trust_remote_code", "worker_extension_cls", "load_format", "hf_overrides"])
def test_engine_extra_outside_the_allowlist_is_refused(key: str) -> None:
    with pytest.raises(ValidationError, match=rf"engineArgs\.extra\.{key}\n  Extra inputs are not permitted"):
        _spec(engineArgs={"extra": {key: True}})


def test_engine_extra_allowlisted_keys_pass() -> None:
    extra = _spec(engineArgs={"extra": {"enable_prefix_caching": True, "seed": 3}}).engine_args.extra
    assert extra.kwargs() == {"enable_prefix_caching": True, "seed": 3}  # vLLM's own names


@pytest.mark.parametrize("kind", ["NodePort", "LoadBalancer"])
def test_exposed_service_needs_a_key_or_an_explicit_opt_out(kind: str) -> None:
    with pytest.raises(
        ValidationError, match=r"spec\.apiKeySecretRef, or spec\.service\.allowUnauthenticated"
    ):
        _spec(service={"type": kind})
    assert _spec(service={"type": kind}, apiKeySecretRef={"name": "k"}).service.type == kind
    assert _spec(service={"type": kind, "allowUnauthenticated": True}).service.allow_unauthenticated
    assert _spec(service={"type": "ClusterIP"}).api_key_secret_ref is None


def test_allow_from_only_for_cluster_ip() -> None:
    with pytest.raises(ValidationError, match="allowFrom"):
        _spec(service={"type": "NodePort", "allowUnauthenticated": True, "allowFrom": [{"podSelector": {}}]})


def _rules(node: Any) -> list[str]:
    out: list[str] = []
    if isinstance(node, dict):
        out += [r["rule"] for r in node.get("x-kubernetes-validations", [])]
        for value in node.values():
            out += _rules(value)
    elif isinstance(node, list):
        for value in node:
            out += _rules(value)
    return out


def test_crd_carries_the_same_rules() -> None:
    spec = deployment_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = _rules(spec)
    assert any("allowUnauthenticated" in r and "has(self.apiKeySecretRef)" in r for r in rules)
    extra = spec["properties"]["engineArgs"]["properties"]["extra"]
    # a closed schema: the allowlist is its properties, anything else is an unknown field
    assert sorted(extra["properties"]) == sorted(ENGINE_EXTRA_ALLOWED)
    assert (
        "trust_remote_code" not in ENGINE_EXTRA_ALLOWED and "worker_extension_cls" not in ENGINE_EXTRA_ALLOWED
    )
    assert not extra.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in extra
