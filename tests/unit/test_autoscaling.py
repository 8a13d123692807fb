"""Worker-pool scaling decisions: packing, limits, idle scale-down, pod <-> Ray node mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

import pytest

from llmray.autoscaling import (
    ScaleDecision,
    WorkerState,
    decide,
    worker_offer,
    worker_states,
)
from llmray.builders.common import quantity
from llmray.ray.cluster import GangDemand, ResourceDemand

pytestmark = pytest.mark.unit

GPU_WORKER = {"CPU": 8.0, "GPU": 1.0, "memory": 64 * 2**30}
CPU_WORKER = {"CPU": 4.0, "memory": 16 * 2**30}


def d(count: int = 1, **shape: float) -> ResourceDemand:
    return ResourceDemand(dict(shape), count)


def busy(name: str) -> WorkerState:
    return WorkerState(name, in_ray=True, idle_seconds=None)


def idle(name: str, seconds: float) -> WorkerState:
    return WorkerState(name, in_ray=True, idle_seconds=seconds)


def starting(name: str) -> WorkerState:
    return WorkerState(name, in_ray=False)


def run(
    demand: list[ResourceDemand],
    workers: list[WorkerState] | None = None,
    *,
    offer: dict[str, float] = GPU_WORKER,
    min_replicas: int = 0,
    max_replicas: int = 4,
    idle_timeout_s: float = 60,
    gangs: list[GangDemand] | None = None,
) -> ScaleDecision:
    return decide(
        demand,
        offer,
        workers or [],
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        idle_timeout_s=idle_timeout_s,
        gangs=gangs or [],
    )


# --- quantities and offers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8", Decimal(8)),
        ("500m", Decimal("0.5")),
        ("64Gi", Decimal(64 * 2**30)),
        ("1.5G", Decimal(1_500_000_000)),
        ("1e3", Decimal(1000)),
        (2, Decimal(2)),
    ],
)
def test_parse_quantity(text: str | int, value: Decimal) -> None:
    assert quantity(text) == value  # the one quantity parser (builders.common)


@pytest.mark.parametrize("bad", ["", "abc", "1x", "-1", "1 Gi", "inf", "nan", "1e400", True])
def test_parse_quantity_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        quantity(bad)


def test_worker_offer_rounds_up_like_kuberay() -> None:
    assert worker_offer("1500m", 1, "1.5Gi") == {"CPU": 2.0, "GPU": 1.0, "memory": float(3 * 2**29)}
    assert worker_offer("4", 0) == {"CPU": 4.0}  # no GPU key for CPU workers
    assert worker_offer("2", 0, None, {"accel": 1, "zero": 0}) == {"CPU": 2.0, "accel": 1.0}


# --- scale up ----------------------------------------------------------------------------------


def test_no_demand_no_workers_no_change() -> None:
    decision = run([])
    assert (decision.add, decision.remove, decision.changed) == (0, (), False)
    assert decision.reason == "no change"


def test_gpu_demand_adds_one_worker_per_gpu() -> None:
    decision = run([d(3, GPU=1, CPU=1)])
    assert decision.add == 3
    assert decision.desired == 3
    assert "adding 3" in decision.reason


def test_small_shapes_pack_into_one_worker() -> None:
    # 8 one-CPU tasks fill exactly one 8-CPU worker; the 9th needs a second.
    assert run([d(8, CPU=1)]).add == 1
    assert run([d(9, CPU=1)]).add == 2


def test_fractional_cpu_packs_exactly() -> None:
    # 0.1 is not exact in binary floating point; 80 x 0.1 must still fit 8 CPUs exactly.
    assert run([d(80, CPU=0.1)]).add == 1
    assert run([d(81, CPU=0.1)]).add == 2
    assert run([d(3, CPU=0.3)], offer={"CPU": 0.9}).add == 1


def test_mixed_shapes_first_fit_decreasing() -> None:
    # A GPU actor takes a GPU worker's GPU and 1 CPU; 7 one-CPU tasks fill the rest of it.
    assert run([d(7, CPU=1), d(1, GPU=1, CPU=1)]).add == 1


def test_memory_is_packed_too() -> None:
    assert run([d(3, CPU=1, memory=30 * 2**30)]).add == 2


def test_max_replicas_caps_and_reports_unmet() -> None:
    decision = run([d(6, GPU=1)], [busy("w1")], max_replicas=3)
    assert decision.add == 2
    assert decision.unmet == 4
    assert decision.desired == 3
    assert "cannot be placed within maxReplicas=3" in decision.reason


def test_max_reached_adds_nothing() -> None:
    decision = run([d(1, GPU=1)], [busy("w1"), busy("w2")], max_replicas=2)
    assert (decision.add, decision.unmet) == (0, 1)


def test_workers_not_in_ray_yet_absorb_demand() -> None:
    # Two pods are starting: the demand they will take must not add two more.
    decision = run([d(3, GPU=1)], [starting("w1"), starting("w2")])
    assert decision.add == 1


def test_starting_worker_capacity_is_shared_by_small_shapes() -> None:
    assert run([d(8, CPU=1)], [starting("w1")]).add == 0


# --- infeasible demand -------------------------------------------------------------------------


def test_shape_bigger_than_a_worker_is_infeasible_not_added() -> None:
    decision = run([d(2, GPU=8)])
    assert decision.add == 0
    assert decision.infeasible == ({"GPU": 8},)
    assert "no worker can hold" in decision.reason and "{GPU: 8}" in decision.reason


def test_gpu_demand_on_cpu_pool_is_infeasible() -> None:
    decision = run([d(1, GPU=1, CPU=1)], offer=CPU_WORKER)
    assert decision.add == 0 and decision.infeasible == ({"CPU": 1, "GPU": 1},)


def test_unknown_custom_resource_and_node_affinity_are_infeasible() -> None:
    demand = [ResourceDemand({"CPU": 1, "custom_thing": 1}), ResourceDemand({"node:10.0.0.1": 0.01})]
    decision = run(demand, offer=CPU_WORKER)
    assert decision.add == 0
    assert len(decision.infeasible) == 2


def test_infeasible_shapes_are_deduplicated_and_do_not_block_feasible_ones() -> None:
    decision = run([d(1, GPU=8), d(1, GPU=8), d(2, GPU=1)])
    assert decision.add == 2
    assert decision.infeasible == ({"GPU": 8},)


def test_custom_resource_offered_by_worker_fits() -> None:
    offer = {"CPU": 4.0, "custom_thing": 2.0}
    assert run([d(3, CPU=1, custom_thing=1)], offer=offer).add == 2


def test_zero_amounts_and_empty_shapes_are_ignored() -> None:
    decision = run([ResourceDemand({"CPU": 0.0}, 5), ResourceDemand({}, 1), d(0, CPU=1)])
    assert (decision.add, decision.infeasible, decision.unmet) == (0, (), 0)


# --- placement groups (gangs) ------------------------------------------------------------------


def gang(strategy: str, *bundles: tuple[dict[str, float], int], count: int = 1) -> GangDemand:
    return GangDemand(tuple(ResourceDemand(s, c) for s, c in bundles), strategy, count)


def test_pack_gang_of_gpu_bundles() -> None:
    # A Ray Train placement group: 4 workers of {GPU: 1, CPU: 1}.
    assert run([], gangs=[gang("PACK", ({"GPU": 1, "CPU": 1}, 4))]).add == 4


def test_gang_is_all_or_nothing_under_max() -> None:
    decision = run([], [busy("w1")], max_replicas=3, gangs=[gang("PACK", ({"GPU": 1}, 4))])
    assert decision.add == 0
    assert decision.unmet == 1


def test_strict_spread_needs_distinct_workers() -> None:
    # Two 1-CPU bundles would pack into one 4-CPU worker, but STRICT_SPREAD needs two nodes.
    g = gang("STRICT_SPREAD", ({"CPU": 1}, 2))
    assert run([], offer=CPU_WORKER, gangs=[g]).add == 2
    assert run([], offer=CPU_WORKER, gangs=[gang("PACK", ({"CPU": 1}, 2))]).add == 1


def test_strict_spread_uses_starting_workers() -> None:
    g = gang("STRICT_SPREAD", ({"CPU": 1}, 3))
    assert run([], [starting("w1")], offer=CPU_WORKER, gangs=[g]).add == 2


def test_strict_pack_sums_bundles_on_one_worker() -> None:
    fits = gang("STRICT_PACK", ({"CPU": 2}, 2))
    assert run([], offer=CPU_WORKER, gangs=[fits]).add == 1
    too_big = gang("STRICT_PACK", ({"CPU": 2}, 3))
    decision = run([], offer=CPU_WORKER, gangs=[too_big])
    assert decision.add == 0 and decision.infeasible == ({"CPU": 6.0},)


def test_gang_with_an_oversized_bundle_is_infeasible() -> None:
    decision = run([], gangs=[gang("PACK", ({"GPU": 1}, 1), ({"GPU": 2}, 1))])
    assert decision.add == 0
    assert decision.infeasible == ({"GPU": 2.0},)


def test_failed_gang_leaves_room_for_plain_demand() -> None:
    # The gang of 4 cannot fit under max=2 and must not reserve anything; the single task can.
    decision = run([d(1, GPU=1)], max_replicas=2, gangs=[gang("PACK", ({"GPU": 1}, 4))])
    assert (decision.add, decision.unmet) == (1, 1)


def test_gang_count_places_each_group() -> None:
    assert run([], gangs=[gang("PACK", ({"GPU": 1}, 2), count=2)]).add == 4


# --- scale down --------------------------------------------------------------------------------


def test_idle_past_cooldown_is_removed() -> None:
    decision = run([], [idle("w1", 120), busy("w2"), idle("w3", 30)], idle_timeout_s=60)
    assert decision.remove == ("w1",)
    assert decision.desired == 2
    assert "idle for >= 60s" in decision.reason


def test_longest_idle_removed_first_and_min_floor_respected() -> None:
    workers = [idle("a", 100), idle("b", 300), idle("c", 200)]
    assert run([], workers, min_replicas=1).remove == ("b", "c")
    assert run([], workers, min_replicas=3).remove == ()


def test_idle_ties_break_by_name() -> None:
    assert run([], [idle("b", 100), idle("a", 100)], min_replicas=1).remove == ("a",)


def test_no_scale_down_while_placeable_demand_is_pending() -> None:
    decision = run([d(1, GPU=1)], [idle("w1", 999), starting("w2")])
    assert decision.remove == ()
    assert decision.add == 0


def test_infeasible_demand_does_not_block_scale_down() -> None:
    decision = run([d(1, GPU=8)], [idle("w1", 999)])
    assert decision.remove == ("w1",)


def test_starting_and_unknown_workers_are_never_removed_as_idle() -> None:
    decision = run([], [starting("w1"), WorkerState("w2", in_ray=True, idle_seconds=None)])
    assert decision.remove == ()


# --- min / max bounds --------------------------------------------------------------------------


def test_min_replicas_floor_adds_workers() -> None:
    decision = run([], [busy("w1")], min_replicas=3)
    assert decision.add == 2
    assert "minReplicas=3" in decision.reason


def test_min_floor_counts_demand_workers() -> None:
    assert run([d(2, GPU=1)], min_replicas=1).add == 2


def test_over_max_removes_starting_then_idle_then_busy() -> None:
    workers = [busy("a"), idle("b", 10), starting("c"), busy("d")]
    decision = run([], workers, max_replicas=2, idle_timeout_s=3600)
    assert decision.remove == ("c", "b")
    assert decision.desired == 2
    assert decision.add == 0


def test_over_max_then_idle_removal_down_to_min() -> None:
    workers = [idle("a", 500), idle("b", 400), idle("c", 300)]
    decision = run([], workers, min_replicas=0, max_replicas=2)
    assert decision.remove == ("a", "b", "c")
    assert decision.desired == 0


def test_max_zero_pool_only_reports() -> None:
    decision = run([d(1, GPU=1)], max_replicas=0)
    assert (decision.add, decision.unmet) == (0, 1)


@pytest.mark.parametrize(("lo", "hi"), [(-1, 2), (3, 2)])
def test_invalid_bounds_raise(lo: int, hi: int) -> None:
    with pytest.raises(ValueError, match="min_replicas"):
        run([], min_replicas=lo, max_replicas=hi)


def test_large_counts_are_fast() -> None:
    decision = run([d(1_000_000, CPU=0.001)], offer=CPU_WORKER, max_replicas=1000)
    assert decision.add == 250


# --- pods <-> Ray nodes ------------------------------------------------------------------------


@dataclass
class Node:
    ip: str
    alive: bool = True
    is_head: bool = False
    idle_seconds: float | None = None
    labels: dict[str, str] = field(default_factory=dict)
    start_time_s: float | None = 0.0


def test_worker_states_match_by_ip() -> None:
    nodes = [
        Node("10.0.0.1", idle_seconds=5, labels={"llmray.io/pod": "w-a"}),  # labels play no part
        Node("10.0.0.2", idle_seconds=None),
        Node("10.0.0.9", is_head=True, idle_seconds=100),
    ]
    pods: list[tuple[str, str | None]] = [("w-a", "10.9.9.9"), ("w-b", "10.0.0.2"), ("w-c", None)]
    states = worker_states(pods, nodes, now=1000)
    assert states == [
        WorkerState("w-a", in_ray=False, idle_seconds=None),
        WorkerState("w-b", in_ray=True, idle_seconds=None),
        WorkerState("w-c", in_ray=False, idle_seconds=None),
    ]


def test_worker_states_ignore_dead_and_head_nodes() -> None:
    nodes = [Node("10.0.0.1", alive=False), Node("10.0.0.2", is_head=True)]
    states = worker_states([("w1", "10.0.0.1"), ("w2", "10.0.0.2")], nodes, now=1000)
    assert [s.in_ray for s in states] == [False, False]


def test_freshly_joined_node_counts_as_pending_until_settled() -> None:
    nodes = [Node("10.0.0.1", start_time_s=995)]
    assert not worker_states([("w1", "10.0.0.1")], nodes, now=1000, settle_s=15)[0].in_ray
    assert worker_states([("w1", "10.0.0.1")], nodes, now=1011, settle_s=15)[0].in_ray
