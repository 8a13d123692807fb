"""Pure parts of llmray.ray: payload parsers (samples captured from a real Ray 2.60 head),
the Serve read-modify-write merge, log tails, head addresses and submission ids."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from llmray.ray import (
    GangDemand,
    JobStatus,
    ResourceDemand,
    parse_cluster_status,
    parse_job,
    parse_nodes,
    parse_serve_details,
    remove_app_config,
    submission_id,
    tail_text,
    upsert_app_config,
)
from llmray.ray.serve import app_config_unchanged, current_deploy_config

pytestmark = pytest.mark.unit

# --- captured payloads (Ray 2.60, one local head, 2 CPUs; trimmed only where marked) ----------

CLUSTER_STATUS_WITH_DEMAND: dict[str, Any] = {
    "result": True,
    "msg": "Got cluster status.",
    "data": {
        "autoscalingStatus": "Cluster status: 0 nodes...",
        "autoscalingError": None,
        "clusterStatus": {
            "gcsRequestTime": 0.0027,
            "time": 1795776924.759,
            "monitorPid": 24167,
            "autoscalerUpdateTime": 0.0022,
            "autoscalerReport": {
                "activeNodes": {"nodeDc23A4E7": 1},
                "idleNodes": None,
                "pendingNodes": [],
                "pendingLaunches": {},
                "failedNodes": [],
                "nodeAvailabilitySummary": {"nodeAvailabilities": {}},
                "nodeActivities": None,
                "pendingResources": {},
                "nodeTypeMapping": {"dc23a4e7": "node_dc23a4e7"},
                "legacy": True,
            },
            "nonTerminatedNodesTime": 6.4e-06,
            "loadMetricsReport": {
                "usage": {
                    "node:192.0.2.2": [0.0, 1.0],
                    "memory": [0.0, 17152029082.0],
                    "CPU": [0.0, 2.0],
                    "objectStoreMemory": [221588.0, 7350869606.0],
                    "node:InternalHead": [0.0010000000000000009, 1.0],
                },
                "resourceDemand": [
                    [{"CPU": 64.0}, 2],
                    [{"CPU": 1.0, "custom_thing": 1.0}, 1],
                    [{"CPU": 0.5, "GPU": 1.0}, 1],
                ],
                "pgDemand": [
                    [{"bundles": [[{"CPU": 16.0}, 2]], "strategy": "STRICT_SPREAD"}, 1],
                    [{"bundles": [[{"CPU": 1.0, "GPU": 1.0}, 2]], "strategy": "PACK"}, 1],
                ],
                "requestDemand": [],
                "nodeTypes": [
                    [
                        {
                            "CPU": 2.0,
                            "object_store_memory": 7350869606.0,
                            "node:__internal_head__": 1.0,
                            "memory": 17152029082.0,
                            "node:192.0.2.2": 1.0,
                        },
                        1,
                    ]
                ],
                "headIp": None,
                "usageByNode": {"dc23a4e7": {"CPU": [0.0, 2.0]}},
                "nodeTypeMapping": None,
                "idleTimeMap": None,
            },
        },
    },
}

CLUSTER_STATUS_FRESH_HEAD: dict[str, Any] = {
    "result": True,
    "msg": "Got cluster status.",
    "data": {"autoscalingStatus": None, "autoscalingError": None, "clusterStatus": None},
}

NODES_SUMMARY: dict[str, Any] = {  # GET /nodes?view=summary, one node's raylet (other keys trimmed)
    "result": True,
    "msg": "Node summary fetched.",
    "data": {
        "summary": [
            {
                "hostname": "vm",
                "ip": "192.0.2.2",
                "raylet": {
                    "nodeId": "dc23a4e7cfe0a5d5c251b74192fedc9b89fa4963cc75b857add385d3",
                    "nodeManagerAddress": "192.0.2.2",
                    "isHeadNode": True,
                    "state": "ALIVE",
                    "labels": {"ray.io/node-id": "dc23a4e7cfe0a5d5c251b74192fedc9b89fa4963cc75b857add385d3"},
                    "stateSnapshot": {"state": "ACTIVE", "idleDurationMs": "0", "nodeActivity": []},
                    "resourcesTotal": {
                        "memory": 17152029082,
                        "node:InternalHead": 1,
                        "CPU": 2,
                        "objectStoreMemory": 7350869606,
                        "node:192.0.2.2": 1,
                    },
                    "startTimeMs": "1795776757291",
                },
            },
            {  # a worker as Ray reports an idle one (same format, values made up)
                "raylet": {
                    "nodeId": "ab12",
                    "nodeManagerAddress": "10.1.2.3",
                    "isHeadNode": False,
                    "state": "ALIVE",
                    "labels": {"llmray.io/pod": "demo-worker-gpu-abcde"},
                    "stateSnapshot": {"state": "IDLE", "idleDurationMs": "125000"},
                    "resourcesTotal": {"CPU": 8, "GPU": 1},
                    "startTimeMs": "1795776800000",
                }
            },
            {"hostname": "no-raylet-yet"},
        ]
    },
}

JOB_SUCCEEDED: dict[str, Any] = {
    "type": "SUBMISSION",
    "job_id": None,
    "submission_id": "exp-1",
    "driver_info": None,
    "status": "SUCCEEDED",
    "entrypoint": 'python -c "print(1); print(2)"',
    "message": "Job finished successfully.",
    "error_type": None,
    "start_time": 1795776821798,
    "end_time": 1795776823487,
    "metadata": {"a": "b"},
    "runtime_env": None,
    "driver_agent_http_address": "http://192.0.2.2:52365",
    "driver_node_id": "dc23a4e7cfe0a5d5c251b74192fedc9b89fa4963cc75b857add385d3",
    "driver_exit_code": 0,
}

APP_A_CONFIG = {
    "name": "a",
    "route_prefix": "/a",
    "import_path": "tests.ray.serve_dummy:build",
    "runtime_env": {"env_vars": {"PYTHONPATH": "/work/main"}},
    "args": {"message": "A"},
}

SERVE_DETAILS: dict[str, Any] = {  # GET /api/serve/applications/ (controller health metrics trimmed)
    "controller_info": {"node_id": "dc23a4e7", "actor_name": "SERVE_CONTROLLER_ACTOR"},
    "proxy_location": "HeadOnly",
    "http_options": {
        "host": "127.0.0.1",
        "port": 18123,
        "root_path": "",
        "request_timeout_s": None,
        "keep_alive_timeout_s": 90,
        "ssl_keyfile": None,
        "ssl_certfile": None,
        "ssl_keyfile_password": None,
        "ssl_ca_certs": None,
    },
    "grpc_options": {
        "port": 9000,
        "grpc_servicer_functions": [],
        "request_timeout_s": None,
        "enable_reflection": True,
    },
    "proxies": {"dc23a4e7": {"node_id": "dc23a4e7", "status": "HEALTHY"}},
    "applications": {
        "a": {
            "name": "a",
            "route_prefix": "/a",
            "docs_path": None,
            "status": "RUNNING",
            "message": "",
            "last_deployed_time_s": 1795776850.78,
            "deployed_app_config": APP_A_CONFIG,
            "source": "declarative",
            "deployments": {
                "Echo": {
                    "name": "Echo",
                    "status": "HEALTHY",
                    "status_trigger": "CONFIG_UPDATE_COMPLETED",
                    "message": "",
                    "deployment_config": {"name": "Echo", "num_replicas": 1},
                    "target_num_replicas": 1,
                    "required_resources": {"CPU": 0},
                    "replicas": [{"replica_id": "7nu775nu", "state": "RUNNING", "pid": 27120}],
                    "recent_dead_replicas": [],
                }
            },
            "external_scaler_enabled": False,
        }
    },
    "target_capacity": None,
    "target_groups": [],
}

SERVE_NOT_RUNNING: dict[str, Any] = {
    "controller_info": {},
    "proxies": {},
    "applications": {},
    "target_capacity": None,
}


# --- cluster status ----------------------------------------------------------------------------


def test_cluster_status_demand_from_real_payload() -> None:
    status = parse_cluster_status(CLUSTER_STATUS_WITH_DEMAND)
    assert status.reported and status.has_demand
    assert status.demand == (
        ResourceDemand({"CPU": 64.0}, 2),
        ResourceDemand({"CPU": 1.0, "custom_thing": 1.0}, 1),
        ResourceDemand({"CPU": 0.5, "GPU": 1.0}, 1),
    )
    assert status.gang_demand == (
        GangDemand((ResourceDemand({"CPU": 16.0}, 2),), "STRICT_SPREAD", 1),
        GangDemand((ResourceDemand({"CPU": 1.0, "GPU": 1.0}, 2),), "PACK", 1),
    )
    assert status.requested == ()
    assert status.total["CPU"] == 2.0 and status.used["CPU"] == 0.0
    # camelCased keys from the dashboard are turned back into Ray's resource names
    assert status.total["object_store_memory"] == 7350869606.0
    assert "node:__internal_head__" in status.total
    assert status.idle_nodes is None  # no autoscaler on this head: idle comes from /nodes


def test_cluster_status_before_first_report() -> None:
    status = parse_cluster_status(CLUSTER_STATUS_FRESH_HEAD)
    assert not status.reported
    assert not status.has_demand


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"data": None},
        {"data": {"clusterStatus": {"loadMetricsReport": None}}},
        {"data": {"clusterStatus": {"loadMetricsReport": {"resourceDemand": "junk", "usage": [1, 2]}}}},
        {
            "data": {
                "clusterStatus": {
                    "loadMetricsReport": {"resourceDemand": [[{"CPU": "x"}, 1], [1, 2, 3], None]}
                }
            }
        },
        {"data": {"clusterStatus": {"loadMetricsReport": {"pgDemand": [[{"bundles": None}, 1], ["x"], 5]}}}},
    ],
)
def test_cluster_status_parser_is_defensive(payload: dict[str, Any]) -> None:
    status = parse_cluster_status(payload)
    assert status.demand == () and status.gang_demand == ()


def test_cluster_status_snake_case_and_request_demand() -> None:
    payload = {
        "cluster_status": {
            "load_metrics_report": {
                "resource_demand": [[{"GPU": 1, "CPU": 0}, "3"]],
                "request_demand": [[{"CPU": 4}, 2]],
            },
            "autoscaler_report": {"idle_nodes": ["n1"]},
        }
    }
    status = parse_cluster_status(payload)
    assert status.demand == (ResourceDemand({"GPU": 1.0}, 3),)  # zero amounts dropped
    assert status.requested == (ResourceDemand({"CPU": 4.0}, 2),)
    assert status.idle_nodes == ("n1",)


def test_nodes_summary() -> None:
    head, worker = parse_nodes(NODES_SUMMARY)
    assert head.is_head and head.alive and head.ip == "192.0.2.2"
    assert head.idle_seconds is None  # ACTIVE
    assert head.resources_total["object_store_memory"] == 7350869606
    assert head.start_time_s == pytest.approx(1795776757.291)
    assert not worker.is_head and worker.idle_seconds == 125.0
    assert worker.labels["llmray.io/pod"] == "demo-worker-gpu-abcde"
    assert parse_nodes({}) == []


# --- jobs --------------------------------------------------------------------------------------


def test_parse_job() -> None:
    job = parse_job(JOB_SUCCEEDED)
    assert job.status is JobStatus.SUCCEEDED and job.terminal
    assert job.submission_id == "exp-1"
    assert job.start_time == datetime.fromtimestamp(1795776821.798, tz=UTC)
    assert job.end_time is not None and job.end_time > job.start_time
    assert job.metadata == {"a": "b"}
    assert job.driver_exit_code == 0
    assert job.driver_node_id and job.driver_node_id.startswith("dc23")


def test_parse_job_pending_has_no_times() -> None:
    job = parse_job({"submission_id": "x", "status": "PENDING", "start_time": None})
    assert job.status is JobStatus.PENDING and not job.terminal
    assert job.start_time is None and job.end_time is None and job.message == ""


def test_parse_job_unknown_status() -> None:
    with pytest.raises(ValueError, match="unknown Ray job status"):
        parse_job({"submission_id": "x", "status": "EXPLODED"})


def test_tail_text_lines_and_bytes() -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    assert tail_text(text, max_lines=2) == "line 998\nline 999\n"
    tail = tail_text(text, max_lines=10_000, max_bytes=20)
    assert tail == "line 998\nline 999\n"  # the partial "ne 997" line is dropped
    assert tail_text("", max_lines=5) == ""
    assert tail_text("abc", max_lines=0) == ""
    assert tail_text("no newline at all", max_bytes=5) == ""


def test_tail_text_keeps_line_when_cut_is_on_a_boundary() -> None:
    assert tail_text("aaaa\nbbbb\n", max_bytes=5) == "bbbb\n"


def test_tail_text_multibyte() -> None:
    text = "é" * 10 + "\nok ✓\n"
    assert tail_text(text, max_bytes=8) == "ok ✓\n"


# --- serve -------------------------------------------------------------------------------------


def test_parse_serve_details() -> None:
    inst = parse_serve_details(SERVE_DETAILS)
    assert inst.running
    assert inst.http_options["port"] == 18123
    app = inst.applications["a"]
    assert app.running and app.source == "declarative" and app.route_prefix == "/a"
    assert app.deployments["Echo"].status == "HEALTHY"
    assert (app.running_replicas, app.target_replicas) == (1, 1)
    assert app.deployments["Echo"].replica_states == {"RUNNING": 1}


def test_parse_serve_not_running() -> None:
    inst = parse_serve_details(SERVE_NOT_RUNNING)
    assert not inst.running and inst.applications == {}


def test_current_deploy_config_round_trips_instance_options() -> None:
    body = current_deploy_config(SERVE_DETAILS)
    assert body["applications"] == [APP_A_CONFIG]
    assert body["http_options"]["host"] == "127.0.0.1"
    assert body["proxy_location"] == "HeadOnly"
    assert "target_capacity" not in body  # None is not sent
    assert "controller_info" not in body and "proxies" not in body


def test_upsert_adds_app_and_keeps_others() -> None:
    b = {"name": "b", "route_prefix": "/b", "import_path": "x:y", "args": {"message": "B"}}
    before = copy.deepcopy(SERVE_DETAILS)
    body = upsert_app_config(SERVE_DETAILS, b)
    assert [a["name"] for a in body["applications"]] == ["a", "b"]
    assert body["applications"][0] == APP_A_CONFIG
    assert before == SERVE_DETAILS  # the input is not mutated


def test_upsert_replaces_in_place() -> None:
    new_a = {**APP_A_CONFIG, "args": {"message": "A2"}}
    two = upsert_app_config(SERVE_DETAILS, {"name": "b", "import_path": "x:y", "route_prefix": "/b"})
    details = copy.deepcopy(SERVE_DETAILS)
    details["applications"]["b"] = {"status": "RUNNING", "deployed_app_config": two["applications"][1]}
    body = upsert_app_config(details, new_a)
    assert [a["name"] for a in body["applications"]] == ["a", "b"]
    assert body["applications"][0]["args"] == {"message": "A2"}


def test_upsert_on_stopped_serve_uses_instance_defaults() -> None:
    body = upsert_app_config(
        SERVE_NOT_RUNNING,
        {"name": "x", "import_path": "m:f"},
        instance_defaults={"http_options": {"host": "0.0.0.0", "port": 8000}},
    )
    assert body == {
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{"name": "x", "import_path": "m:f"}],
    }


def test_instance_defaults_do_not_override_a_running_serve() -> None:
    body = upsert_app_config(
        SERVE_DETAILS, {"name": "x", "import_path": "m:f"}, instance_defaults={"http_options": {}}
    )
    assert body["http_options"]["port"] == 18123


def test_upsert_requires_a_name() -> None:
    with pytest.raises(ValueError, match="name"):
        upsert_app_config(SERVE_DETAILS, {"import_path": "m:f"})


def test_remove_keeps_others_and_skips_deleting_and_imperative_apps() -> None:
    details = copy.deepcopy(SERVE_DETAILS)
    details["applications"]["b"] = {
        "status": "RUNNING",
        "deployed_app_config": {"name": "b", "import_path": "x:y"},
    }
    details["applications"]["gone"] = {"status": "DELETING", "deployed_app_config": {"name": "gone"}}
    details["applications"]["imp"] = {
        "status": "RUNNING",
        "source": "imperative",
        "deployed_app_config": None,
    }
    body = remove_app_config(details, "a")
    assert [a["name"] for a in body["applications"]] == ["b"]
    assert remove_app_config(details, "b")["applications"] == [APP_A_CONFIG]


def test_remove_last_app_leaves_an_empty_list() -> None:
    assert remove_app_config(SERVE_DETAILS, "a")["applications"] == []


def test_app_config_unchanged() -> None:
    assert app_config_unchanged(SERVE_DETAILS, APP_A_CONFIG)
    assert not app_config_unchanged(SERVE_DETAILS, {**APP_A_CONFIG, "args": {"message": "new"}})
    assert not app_config_unchanged(SERVE_DETAILS, {"name": "other"})
    assert not app_config_unchanged(SERVE_NOT_RUNNING, APP_A_CONFIG)


# --- head addresses and ids --------------------------------------------------------------------


DNS_SAFE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def test_submission_id_is_stable_and_dns_safe() -> None:
    sid = submission_id("team-a", "tiny-gpt", "0b6f-uid", 0)
    assert sid == submission_id("team-a", "tiny-gpt", "0b6f-uid", 0)
    assert sid.startswith("team-a-tiny-gpt-") and sid.endswith("-0")
    assert DNS_SAFE.match(sid) and len(sid) <= 63


def test_submission_id_differs_per_attempt_and_uid() -> None:
    ids = {
        submission_id("ns", "job", "uid-1", 0),
        submission_id("ns", "job", "uid-1", 1),
        submission_id("ns", "job", "uid-2", 0),
    }
    assert len(ids) == 3


def test_submission_id_long_names_are_truncated() -> None:
    sid = submission_id("n" * 63, "j" * 253, "uid", 12)
    assert len(sid) <= 63 and DNS_SAFE.match(sid) and sid.endswith("-12")
    odd = submission_id("ns", "Job.With_Odd--chars", "u", 0)
    assert DNS_SAFE.match(odd)
    with pytest.raises(ValueError):
        submission_id("ns", "job", "u", -1)


# --- untrusted numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (3, 3),
        ("3", 3),
        (1e18, 1_000_000),
        (10**30, 1_000_000),
        (float("inf"), 1_000_000),
        ("inf", 1_000_000),
        (float("nan"), 0),
        ("nan", 0),
        (-5, 0),
        (None, 1),
        ("junk", 1),
    ],
)
def test_demand_counts_are_bounded(count: Any, expected: int) -> None:
    payload = {"clusterStatus": {"loadMetricsReport": {"resourceDemand": [[{"CPU": 1}, count]]}}}
    demand = parse_cluster_status(payload).demand
    assert [d.count for d in demand] == ([expected] if expected else [])


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        (1, 1.0),
        ("0.5", 0.5),
        (float("inf"), 1e18),
        ("inf", 1e18),
        ("1e400", 1e18),
        (10**400, 1e18),
        (float("nan"), None),
        (-1, None),
        (0, None),
        (True, None),
    ],
)
def test_demand_amounts_are_finite_and_clamped(amount: Any, expected: float | None) -> None:
    payload = {"clusterStatus": {"loadMetricsReport": {"resourceDemand": [[{"GPU": amount, "CPU": 1}, 1]]}}}
    (demand,) = parse_cluster_status(payload).demand
    assert demand.shape.get("GPU") == expected and demand.shape["CPU"] == 1.0


def test_equal_shapes_are_merged_and_entries_capped() -> None:
    entries = [[{"CPU": 1}, 600_000], [{"CPU": 1}, 600_000]] + [[{f"r{i}": 1}, 1] for i in range(1000)]
    payload = {"clusterStatus": {"loadMetricsReport": {"resourceDemand": entries}}}
    demand = parse_cluster_status(payload).demand
    assert demand[0] == ResourceDemand({"CPU": 1.0}, 1_000_000)  # summed, capped
    assert len(demand) <= 256


def test_hostile_node_fields_are_ignored_not_raised() -> None:
    payload = {
        "data": {
            "summary": [
                {"raylet": {"nodeId": "a", "state": "ALIVE", "resourcesTotal": [1, 2], "labels": "x"}},
                {"raylet": {"nodeId": "b", "stateSnapshot": {"state": "IDLE", "idleDurationMs": -5}}},
                {"raylet": {"nodeId": "c", "startTimeMs": float("nan"), "stateSnapshot": "junk"}},
                "junk",
            ]
        }
    }
    nodes = parse_nodes(payload)
    assert [n.node_id for n in nodes] == ["a", "b", "c"]
    assert nodes[0].resources_total == {} and nodes[0].labels == {}
    assert nodes[1].idle_seconds is None and nodes[2].start_time_s is None
    assert parse_nodes({"data": {"summary": 5}}) == []


def test_hostile_serve_details_are_clamped_not_raised() -> None:
    payload = {
        "controller_info": {"node_id": "n"},
        "http_options": ["junk"],
        "applications": {
            "a": {
                "status": "RUNNING",
                "message": "m" * 10_000,
                "deployed_app_config": "junk",
                "deployments": {
                    "d1": {"target_num_replicas": float("inf"), "replicas": [{"state": "RUNNING"}, "junk"]},
                    "d2": {"target_num_replicas": 1e18, "replicas": {"not": "a list"}},
                    "d3": {"target_num_replicas": float("nan")},
                    "d4": "junk",
                },
            },
            "b": "junk",
        },
    }
    instance = parse_serve_details(payload)
    a = instance.applications["a"]
    assert a.deployments["d1"].target_replicas == 100_000 and a.deployments["d1"].running_replicas == 1
    assert a.deployments["d2"].target_replicas == 100_000 and a.deployments["d3"].target_replicas is None
    assert a.deployments["d4"].status == "UNKNOWN"
    assert len(a.message) == 2_000 and a.deployed_config is None
    assert instance.applications["b"].status == "UNKNOWN" and instance.http_options == {}
