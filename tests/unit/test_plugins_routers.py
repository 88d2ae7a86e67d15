"""The decision registry and the routers: pure functions, plain asserts."""

from __future__ import annotations

import random

import pytest

from cplane.orchestrator import plugins
from cplane.orchestrator.dispatch import DispatchConfig, dispatch_config, plan_dispatch
from cplane.orchestrator.fleet import FleetView, Registry, WorkerView
from cplane.orchestrator.plugin_types import PdDecider, Policy, Router
from cplane.orchestrator.route_context import RouteContext
from cplane.orchestrator.snapshot import DecisionTables, Pending, QueueSnapshot
from cplane.schemas.messages import Heartbeat, Role
from cplane.schemas.settings import OrchestratorSettings


def w(wid: str, held: int = 0, cap: int = 4) -> WorkerView:
    return WorkerView(wid, Role.UNIFIED, ("m",), cap, held, 0, 0, 0.0, 0.0)


def p(rid: str) -> Pending:
    return Pending(rid, 2, 0.0, 0.0, "m", 10)


def test_registry_names_every_builtin_and_refuses_typos() -> None:
    assert {"fifo", "priority"} <= set(plugins.names("policy"))
    assert {"pool", "round_robin", "random", "least_loaded"} <= set(plugins.names("router"))
    assert {"never", "always", "auto"} <= set(plugins.names("pd"))
    with pytest.raises(ValueError, match=r"unknown router 'least_laoded'.*least_loaded"):
        plugins.build_router("least_laoded")
    with pytest.raises(ValueError, match="aging_sec"):
        plugins.build_policy("priority", {"aging_sec": 3})
    with pytest.raises(ValueError, match="Expected `float`"):
        plugins.build_policy("priority", {"aging_s": "soon"})
    with pytest.raises(ValueError, match="unknown pd"):
        plugins.build_pd("sometimes")


def test_the_registry_builds_typed_plugins_and_a_policy_says_which_router_it_uses() -> None:
    assert all(isinstance(plugins.build_policy(n), Policy) for n in plugins.names("policy"))
    assert all(isinstance(plugins.build_router(n), Router) for n in plugins.names("router"))
    assert all(isinstance(plugins.build_pd(n), PdDecider) for n in plugins.names("pd"))
    assert {n: plugins.build_router(n).name for n in plugins.names("router")} == {
        n: n for n in plugins.names("router")}
    cfg = DispatchConfig.named(policy="priority", router="least_loaded")
    assert cfg.router_in_use.name == "least_loaded"
    # cost_optimized brings its own router: the configured one is not what runs.
    cfg = DispatchConfig.named(policy="cost_optimized", router="least_loaded")
    assert cfg.policy.router is not None and cfg.router_in_use.name == "cheapest"
    assert {plugins.build_policy("slo_aware").headroom, plugins.build_policy("fifo").headroom} \
        == {0.0, None}


def test_settings_name_the_plugins() -> None:
    cfg = dispatch_config(OrchestratorSettings(policy="fifo", router="round_robin"))
    ctx = RouteContext(DecisionTables(), random.Random(0))
    fleet = (w("a"), w("b"))
    assert [cfg.router(fleet, p("x"), ctx).worker_id for _ in range(3)] == ["a", "b", "a"]
    with pytest.raises(ValueError, match="unknown policy"):
        dispatch_config(OrchestratorSettings(policy="lottery"))


def route_all(router: str, n: int, state: DecisionTables, fleet: tuple[WorkerView, ...],
              seed: int = 0) -> list[str]:
    cfg = DispatchConfig.named(policy="fifo", router=router, pd="never", headroom=10.0)
    snap = QueueSnapshot(((), (), tuple(p(f"r{i}") for i in range(n)), (), ()), {})
    plan = plan_dispatch(snap, FleetView(fleet), cfg, now_ms=0.0, tables=state,
                         rng=random.Random(seed))
    order = {rid: b.target for b in plan.batches for rid in b.request_ids}
    assert sum(plan.sent.values()) == (n if router != "pool" else 0)
    return [order[f"r{i}"] for i in range(n)]


def test_pool_router_uses_the_pool_subject() -> None:
    assert set(route_all("pool", 5, DecisionTables(), (w("a"), w("b")))) == {"any"}


def test_round_robin_continues_where_the_last_plan_stopped() -> None:
    fleet = (w("a"), w("b"), w("c"))
    assert route_all("round_robin", 4, DecisionTables(), fleet) == ["a", "b", "c", "a"]
    assert route_all("round_robin", 2, DecisionTables(step=4), fleet) == ["b", "c"]


def test_random_router_replays_for_a_seed() -> None:
    fleet = tuple(w(x) for x in "abcdefgh")
    one = route_all("random", 40, DecisionTables(), fleet, seed=3)
    assert one == route_all("random", 40, DecisionTables(), fleet, seed=3)
    assert one != route_all("random", 40, DecisionTables(), fleet, seed=4)
    assert len(set(one)) > 4


def test_least_loaded_counts_heartbeat_load_plus_what_was_routed_since() -> None:
    fleet = (w("a", held=3), w("b", held=0), w("c", held=1))
    # a holds 3; b none; c 1 at its heartbeat plus 2 routed since (3): b while it
    # has the fewest, which it still has after taking two.
    got = route_all("least_loaded", 3, DecisionTables(sent_since={"c": 2}), fleet)
    assert got == ["b", "b", "b"]
    # capacity matters: per slot, not per worker
    big = (w("a", held=4, cap=16), w("b", held=2, cap=4))
    assert route_all("least_loaded", 1, DecisionTables(), big) == ["a"]


def test_registry_forgets_routed_counts_at_each_heartbeat() -> None:
    reg = Registry(timeout_ms=1000)
    reg.since.routed({"a": 2, "b": 1})
    reg.observe(Heartbeat(worker_id="a", role=Role.UNIFIED, models=["m"], capacity=4,
                          engine="sim"), 0.0)
    assert reg.since.sent == {"b": 1}


def test_a_burst_to_the_pool_is_cut_so_every_worker_gets_a_message() -> None:
    # A pool message goes whole to one worker; 24 requests onto 8 idle workers
    # as 16 + 8 would leave six of them idle.
    fleet = tuple(w(f"w{i}", cap=64) for i in range(8))
    cfg = DispatchConfig.named(policy="fifo", router="pool", pd="never", max_batch=16)
    snap = QueueSnapshot(((), (), tuple(p(f"r{i}") for i in range(24)), (), ()), {})
    plan = plan_dispatch(snap, FleetView(fleet), cfg, now_ms=0.0)
    assert [len(b.request_ids) for b in plan.batches] == [3] * 8
    deep = QueueSnapshot(((), (), tuple(p(f"r{i}") for i in range(400)), (), ()), {})
    plan = plan_dispatch(deep, FleetView(fleet), cfg, now_ms=0.0)
    assert max(len(b.request_ids) for b in plan.batches) == 16  # deep queues still batch
