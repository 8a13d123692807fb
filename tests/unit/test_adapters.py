"""spec.adapters (multi-LoRA): validation, resolution, status, and what the operator sends to Serve."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from llmray.api.crd import deployment_crd
from llmray.api.deployment import AdapterStatus, LLMDeploymentSpec
from llmray.api.runtime import SERVE_DEPLOYMENT_NAME, AdapterSource, ServeAppArgs, ServeUserConfig
from llmray.builders.cluster import deployment_cluster
from llmray.builders.model import (
    HOLD_OVER_RESOLUTION,
    HOLD_WITHOUT_LISTING,
    adapter_source,
    adapter_statuses,
    hold_verdicts,
    resolve_adapters,
)
from llmray.controllers.decisions import deployed_adapters, serve_app_config
from llmray.ray.serve import ServeApplication

pytestmark = pytest.mark.unit


def spec(adapters: list[dict[str, Any]], **extra: Any) -> LLMDeploymentSpec:
    model = extra.pop("model", {"uri": "file:///m", "name": "base"})
    return LLMDeploymentSpec.model_validate({"model": model, "adapters": adapters, **extra})


def lora_job(phase: str = "Succeeded", **spec_extra: Any) -> dict[str, Any]:
    return {
        "spec": {"method": "lora", "output": {"uri": "pvc://out/sql"}, **spec_extra},
        "status": {"phase": phase, "output": {"uri": "pvc://out/sql"} if phase == "Succeeded" else {}},
    }


# ---- API ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        ([{"name": "a"}], "exactly one of spec.adapters\\[\\].uri and spec.adapters\\[\\].fromTrainingJob"),
        ([{"name": "a", "uri": "file:///a", "fromTrainingJob": "j"}], "exactly one"),
        ([{"name": "Bad_Name!", "uri": "file:///a"}], "pattern"),
        ([{"name": "a", "uri": "ftp://x/a"}], "pattern"),
        ([{"name": "a", "uri": "file:///a"}, {"name": "a", "uri": "file:///b"}], "must be unique: a"),
        ([{"name": "base", "uri": "file:///a"}], "must differ from spec.model.name"),
        ([{"name": f"a{i}", "uri": "file:///a"} for i in range(17)], "at most 16"),
    ],
)
def test_adapter_rules(adapters: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(adapters)


def test_adapter_crd_schema_names_fields_and_keys_the_list_by_name() -> None:
    """The API server enforces the same rules: unique names (list map), at most 16, one source,
    and (a root rule, it needs metadata.name) no clash with the base's default served name."""
    crd = deployment_crd()
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    adapters = schema["properties"]["spec"]["properties"]["adapters"]
    assert adapters["maxItems"] == 16
    assert adapters["x-kubernetes-list-type"] == "map" and adapters["x-kubernetes-list-map-keys"] == ["name"]
    item = adapters["items"]
    assert item["required"] == ["name"] and item["properties"]["name"]["maxLength"] == 63
    assert any("spec.adapters[].fromTrainingJob" in r["message"] for r in item["x-kubernetes-validations"])
    root_rules = [r for r in schema["x-kubernetes-validations"] if r.get("fieldPath") == ".spec.adapters"]
    assert root_rules and "self.metadata.name" in root_rules[0]["rule"]
    status = schema["properties"]["status"]["properties"]["adapters"]
    assert set(status["items"]["properties"]) == {"name", "uri", "state", "message"}


# ---- resolution ---------------------------------------------------------------------------------


def test_resolution_states_and_semantic_errors() -> None:
    s = spec(
        [
            {"name": "plain", "uri": "hf://org/lora"},
            {"name": "sql", "fromTrainingJob": "sql-job"},
            {"name": "later", "fromTrainingJob": "running-job"},
            {"name": "missing", "fromTrainingJob": "nope"},
            {"name": "full", "fromTrainingJob": "full-job"},
            {"name": "merged", "fromTrainingJob": "merged-job"},
            {"name": "s3", "uri": "s3://bucket/a"},
        ]
    )
    jobs = {
        "sql-job": lora_job(),
        "running-job": lora_job("Running"),
        "nope": None,
        "full-job": {"spec": {"method": "full"}, "status": {"phase": "Succeeded"}},
        "merged-job": lora_job(lora={"mergeOnExport": True}),
    }
    got = {a.name: a for a in resolve_adapters(s, jobs, [], "base")}
    assert (got["plain"].uri, got["plain"].state) == ("hf://org/lora", "Loading")
    assert (got["sql"].uri, got["sql"].state) == ("pvc://out/sql", "Loading")
    assert (got["later"].uri, got["later"].state) == (None, "Pending") and "Running" in got["later"].message
    assert got["missing"].state == "Pending" and "to exist" in got["missing"].message
    assert got["full"].state == "Failed" and "full fine-tune" in got["full"].message
    assert got["merged"].state == "Failed" and "mergeOnExport" in got["merged"].message
    assert got["s3"].state == "Failed" and "engine transformers" in got["s3"].message


def test_a_retraining_adapter_keeps_serving_its_previous_output_but_a_full_job_does_not() -> None:
    s = spec([{"name": "sql", "fromTrainingJob": "j"}])
    before = [AdapterStatus(name="sql", uri="pvc://out/sql", state="Ready")]
    [again] = resolve_adapters(s, {"j": lora_job("Running")}, before, "base")
    assert (again.uri, again.state) == ("pvc://out/sql", "Loading") and "still serving" in again.message
    [full] = resolve_adapters(s, {"j": {"spec": {"method": "full"}, "status": {}}}, before, "base")
    assert (full.uri, full.state) == (None, "Failed")


def test_adapter_named_like_the_default_served_name_fails() -> None:
    """Without spec.model.name the base is served as the resource name: CEL cannot see it in spec."""
    s = spec([{"name": "chat", "uri": "file:///a"}], model={"uri": "file:///m"})
    [adapter] = resolve_adapters(s, {}, [], "chat")
    assert adapter.state == "Failed" and "served name" in adapter.message


def test_vllm_takes_object_store_adapters_only() -> None:
    s = spec(
        [
            {"name": "a", "uri": "s3://b/loras/a"},
            {"name": "f", "uri": "file:///a"},
            {"name": "c", "uri": "s3://b/loras/c"},
            {"name": "elsewhere", "uri": "gs://x/y/z"},
        ],
        engine="vllm",
        resourcesPerReplica={"gpu": 1},
    )
    got = {a.name: a for a in resolve_adapters(s, {}, [], "base")}
    assert {n: a.state for n, a in got.items()} == {
        "a": "Loading",
        "f": "Failed",
        "c": "Loading",
        "elsewhere": "Failed",
    }
    assert "one folder" in got["elsewhere"].message


def test_status_ready_only_once_serve_runs_a_config_with_the_adapter() -> None:
    resolved = resolve_adapters(
        spec([{"name": "a", "uri": "file:///a"}, {"name": "b", "uri": "file:///b"}]), {}, [], "base"
    )
    deployed = {"a": "/a", "b": "/old-b"}
    states = {a.name: a.state for a in adapter_statuses(resolved, deployed, running=True)}
    assert states == {"a": "Ready", "b": "Loading"}
    assert {a.state for a in adapter_statuses(resolved, deployed, running=False)} == {"Loading"}
    assert {a.state for a in adapter_statuses(resolved, None, running=True)} == {"Loading"}


def test_adapter_source() -> None:
    assert adapter_source("hf://org/lora") == "org/lora"
    assert adapter_source("file:///x/y") == "/x/y"
    assert adapter_source("pvc://claim/a") == "/mnt/pvc/claim/a"
    assert adapter_source("s3://b/a") == "s3://b/a"


def test_adapter_claims_are_mounted_read_only() -> None:
    from llmray.builders.common import Owner

    owner = Owner(kind="LLMDeployment", name="d", namespace="ns", uid="u")
    s = spec([{"name": "a", "uri": "pvc://loras/a"}])
    cluster = deployment_cluster(owner, s, "file:///m", ("pvc://loras/a", "pvc://loras/b"))
    assert [(p.claim, p.read_only) for p in cluster.pvcs] == [("loras", True)]


# ---- what Serve gets ----------------------------------------------------------------------------


def config(s: LLMDeploymentSpec, adapters: list[AdapterSource]) -> dict[str, Any]:
    return serve_app_config(
        app_name="x", route_prefix="/", resource_name="x", spec=s,
        model_path=None, api_key=None, api_key_in_pods=True, adapters=adapters,
    )  # fmt: skip


def test_adapters_go_to_user_config_not_args_so_a_change_does_not_restart_replicas() -> None:
    one = config(spec([{"name": "a", "uri": "file:///a"}]), [AdapterSource(name="a", source="/a")])
    two = config(
        spec([{"name": "a", "uri": "file:///a"}, {"name": "b", "uri": "file:///b"}]),
        [AdapterSource(name="a", source="/a"), AdapterSource(name="b", source="/b")],
    )
    none = config(spec([]), [])
    assert one["args"] == two["args"] == none["args"]  # args unchanged: Serve does not rebuild the app
    assert ServeAppArgs.model_validate(one["args"]).spec.adapters == []
    [entry] = two["deployments"]
    assert entry["name"] == SERVE_DEPLOYMENT_NAME
    user = ServeUserConfig.model_validate(entry["user_config"])
    assert [(a.name, a.source) for a in user.adapters] == [("a", "/a"), ("b", "/b")]
    assert none["deployments"][0]["user_config"] == {"adapters": []}  # removing the last one is a change


def test_vllm_adapters_go_to_args() -> None:
    s = spec([{"name": "a", "uri": "s3://b/l/a"}], engine="vllm", resourcesPerReplica={"gpu": 1})
    cfg = config(s, [AdapterSource(name="a", source="s3://b/l/a")])
    assert "deployments" not in cfg
    assert [a.name for a in ServeAppArgs.model_validate(cfg["args"]).adapters] == ["a"]


def test_deployed_adapters_read_defensively() -> None:
    def app(cfg: Any) -> ServeApplication:
        return ServeApplication(name="x", status="RUNNING", deployed_config=cfg)

    good = {
        "deployments": [
            {"name": SERVE_DEPLOYMENT_NAME, "user_config": {"adapters": [{"name": "a", "source": "/a"}]}}
        ]
    }
    assert deployed_adapters(app(good)) == {"a": "/a"}
    assert deployed_adapters(app({})) is None
    assert deployed_adapters(None) is None
    assert deployed_adapters(app({"deployments": "junk"})) is None
    junk = {"deployments": [{"name": SERVE_DEPLOYMENT_NAME, "user_config": {"adapters": [1, {"name": 2}]}}]}
    assert deployed_adapters(app(junk)) == {}


def test_jobs_of_adapters_wake_their_deployment() -> None:
    """The index that maps a training job to the deployments it feeds includes adapter jobs."""
    import asyncio

    from llmray.operator_main import llmray_deployments_by_job

    spec_ = {"model": {"uri": "file:///m"}, "adapters": [{"name": "a", "fromTrainingJob": "j1"}]}
    handler: Any = llmray_deployments_by_job
    fn = getattr(handler, "__wrapped__", handler)
    got = asyncio.run(fn(namespace="ns", name="d", spec=spec_))
    assert got == {("ns", "j1"): "d"}


def test_a_replica_that_does_not_list_a_deployed_adapter_failed_to_load_it() -> None:
    resolved = resolve_adapters(
        spec([{"name": "a", "uri": "file:///a"}, {"name": "b", "uri": "file:///b"}]), {}, [], "base"
    )
    deployed = {"a": "/a", "b": "/b"}
    states = adapter_statuses(resolved, deployed, running=True, listed=frozenset({"base", "a"}))
    assert [(s.name, s.state) for s in states] == [("a", "Ready"), ("b", "Failed")]
    assert "could not load" in states[1].message
    loading = adapter_statuses(resolved, {"a": "/a"}, running=True, listed=frozenset({"base", "a"}))
    assert [s.state for s in loading] == ["Ready", "Loading"]  # not deployed yet: not a failure


def _st(name: str, state: Any, uri: str = "file:///a", message: str = "") -> AdapterStatus:
    return AdapterStatus(name=name, uri=uri, state=state, message=message or state.lower())


def test_the_last_verdict_holds_where_a_pass_knows_less() -> None:
    """Resolution alone (Loading) keeps Ready/Failed; a pass without a model listing keeps Failed
    over Ready; a moved uri or any other pair takes the new state."""
    before = [_st("a", "Ready"), _st("b", "Failed", message="not listed"), _st("c", "Ready", uri="file:///c")]
    resolved = [_st("a", "Loading"), _st("b", "Loading"), _st("c", "Loading", uri="file:///c2")]
    got = hold_verdicts(resolved, before, HOLD_OVER_RESOLUTION)
    assert [(s.state, s.message) for s in got] == [
        ("Ready", "ready"),
        ("Failed", "not listed"),
        ("Loading", "loading"),
    ]
    unlisted = [
        _st("a", "Ready"),
        _st("b", "Ready"),
        _st("c", "Loading", uri="file:///c"),
        _st("new", "Ready"),
    ]
    got = hold_verdicts(unlisted, before, HOLD_WITHOUT_LISTING)
    assert [s.state for s in got] == ["Ready", "Failed", "Loading", "Ready"]
    assert got[1].message == "not listed" and unlisted[1].state == "Ready"  # inputs are not changed


def test_model_listing_is_read_defensively() -> None:
    from llmray.ray.serving import parse_model_ids

    assert parse_model_ids({"data": [{"id": "a"}, {"id": 3}, "junk", {"id": "b" * 999}]}) == ["a", "b" * 256]
    assert parse_model_ids({"data": "x"}) == [] and parse_model_ids([]) == []
