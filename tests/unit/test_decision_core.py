"""The decision core (orchestrator/core.py): one step from a snapshot to effects, the
ledger and decision state changed together, TTFT misses measured, and a recorded
simulator run replayed to the very same plans. Plain asserts, no broker."""

from __future__ import annotations

import random

from cplane.fleetsim.sim import FleetSpec, simulate
from cplane.fleetsim.synthetic import LengthDist, SyntheticSpec, generate
from cplane.orchestrator.core import DecisionCore, Journal, replay
from cplane.orchestrator.decision_state import DecisionState
from cplane.orchestrator.dispatch import DispatchConfig
from cplane.orchestrator.fleet import FleetView, WorkerView
from cplane.orchestrator.ledger import Entry, RequestState
from cplane.orchestrator.snapshot import Pending
from cplane.schemas.messages import Role

CFG = DispatchConfig.named(policy="fifo", router="least_loaded", pd="never", headroom=0.0,
                           max_batch=4)


def fleet(*cap: int) -> FleetView:
    return FleetView(tuple(WorkerView(f"w{i}", Role.UNIFIED, ("m",), c, 0, 0, 0, 0.0, 0.0)
                           for i, c in enumerate(cap)))


def pend(rid: str, t: float = 0.0, tenant: str = "a", ttft: float = 1000.0) -> Pending:
    return Pending(rid, 2, t, t, "m", 100, output_tokens=50, tenant=tenant, ttft_target_ms=ttft)


def test_a_step_plans_applies_and_a_terminal_frees_the_slot() -> None:
    core: DecisionCore[str] = DecisionCore(CFG)
    entries = [Entry(pend(f"r{i}", float(i)), f"payload{i}") for i in range(3)]
    for e in entries:
        core.hold(e)
    step = core.step(fleet(2), now_ms=10.0, rng=random.Random(0), due=False)
    assert step is not None and not step.rejected
    sent = [e for out in step.publish for e in out.entries]
    assert [e.request_id for e in sent] == ["r0", "r1"]  # two slots, oldest first
    assert all(e.state is RequestState.DISPATCHING and e.target == "w0" for e in sent)
    assert core.ledger.held_count() == 1 and core.state.work["a"] > 0  # charged at dispatch
    # The work is stored; one terminal had already raced the acks.
    assert core.terminal("r1", 11.0, 5.0) is False  # DISPATCHING: remembered, not yet freed
    left = core.stored(sent, 12.0)
    assert [e.request_id for e in left] == ["r1"] and "r1" not in core.ledger
    assert core.ledger.in_flight(("unified", "m")) == 1
    assert core.step(fleet(2), now_ms=13.0, rng=random.Random(0), due=False) is not None
    assert core.ledger.held_count() == 0  # r2 took the freed slot
    assert core.terminal("r0", 20.0, 5.0) is True and core.terminal("r0", 21.0) is False
    assert core.state.since.done.get("w0") == 2  # finished on the worker it was routed to


def test_a_refused_publish_holds_the_requests_again_and_an_unknown_one_goes_alone() -> None:
    core: DecisionCore[None] = DecisionCore(CFG)
    for i in range(3):
        core.hold(Entry(pend(f"r{i}", float(i)), None))
    step = core.step(fleet(8), now_ms=0.0, rng=random.Random(0), due=False)
    assert step is not None and [len(o.entries) for o in step.publish] == [3]
    core.refused(step.publish[0].entries, redispatch=True)  # no answer: maybe stored
    assert core.ledger.held_count() == 3 and core.ledger.in_flight(("unified", "m")) == 0
    again = core.step(fleet(8), now_ms=1.0, rng=random.Random(0), due=False)
    assert again is not None and [len(o.entries) for o in again.publish] == [1, 1, 1]


def test_miss_rate_is_the_share_of_recent_terminals_over_their_ttft_target() -> None:
    core: DecisionCore[None] = DecisionCore(CFG)
    for i, ttft in enumerate((100.0, 300.0, 900.0, 2000.0)):
        core.hold(Entry(pend(f"r{i}", ttft=500.0), None))
        assert core.step(fleet(8), now_ms=0.0, rng=random.Random(0), due=False) is not None
        core.stored([e for e in core.ledger.entries(RequestState.DISPATCHING)], 0.0)
        core.terminal(f"r{i}", 1000.0, ttft)
    assert core.state.measured(fleet(8), 1000.0).miss_rate == 0.5  # 900 and 2000 > 500
    core.hold(Entry(pend("none"), None))  # a terminal with no token says nothing
    core.step(fleet(8), now_ms=1000.0, rng=random.Random(0), due=False)
    core.stored(list(core.ledger.entries(RequestState.DISPATCHING)), 1000.0)
    core.terminal("none", 1000.0, -1.0)
    assert core.state.measured(fleet(8), 1000.0).miss_rate == 0.5
    # Ten seconds on, the window holds none of them.
    assert core.state.measured(fleet(8), 11_500.0).miss_rate == 0.0


def test_finished_without_a_measure_leaves_the_miss_rate_alone() -> None:
    d = DecisionState(window_s=10.0)
    d.held("t")
    d.finished("t", 0.0, ran=False)
    d.held("t")
    d.finished("t", 0.0, ran=True, missed=True)
    assert d.measured(fleet(1), 100.0).miss_rate == 1.0


def test_a_recorded_simulator_run_replays_to_the_same_plans() -> None:
    reqs = generate(SyntheticSpec(rate_per_s=80.0, count=400, prompt=LengthDist(600, 0.8, 4000),
                                  output=LengthDist(120, 0.8, 600), levels={0: 1, 2: 2, 4: 1},
                                  tenants={"a": 3, "b": 1}), 3)
    cfg = DispatchConfig.named(policy="adaptive", policy_params={"fair": True},
                               router="least_loaded", pd="never")
    spec = FleetSpec(workers=3, capacity=8)
    journal = Journal()
    run = simulate(reqs, spec, cfg, seed=5, journal=journal)
    assert all(r.finished_ms is not None for r in run.records)
    assert len(journal.plans) > 50 and sum(p.dispatched for p in journal.plans) == len(reqs)
    again = replay(journal, cfg, tenant_weights=spec.tenant_weights,
                   prefill_tokens_per_s=1000 / spec.engine.prefill_b_ms)
    assert again == journal.plans
    # ...and a different policy over the same inputs plans differently: the check can fail.
    other = DispatchConfig.named(policy="priority", router="round_robin", pd="never")
    assert replay(journal, other, tenant_weights=spec.tenant_weights,
                  prefill_tokens_per_s=1000 / spec.engine.prefill_b_ms) != journal.plans


def test_a_router_switch_is_journaled_and_replayed() -> None:
    """A run-time router switch (cplane router set) is a core event: a replay of the
    journal routes the later steps by the new router too."""
    from cplane.orchestrator import plugins

    journal = Journal()
    core: DecisionCore[None] = DecisionCore(CFG, journal=journal)
    # w0 nearly full: least_loaded avoids it, round_robin does not.
    view = FleetView(tuple(WorkerView(f"w{i}", Role.UNIFIED, ("m",), 64, 60 if i == 0 else 0,
                                      0, 0, 0.0, 0.0) for i in range(4)))

    def round_of(start: int, now: float) -> None:
        for i in range(start, start + 8):
            core.hold(Entry(pend(f"r{i}", now), None))
        core.step(view, now_ms=now, rng=random.Random(1), due=False)

    round_of(0, 0.0)
    core.use_router(plugins.build_router("round_robin", {}))
    round_of(8, 1.0)
    assert {b.target for b in journal.plans[0].batches} == {"w1", "w2", "w3"}
    assert "w0" in {b.target for b in journal.plans[1].batches}
    assert replay(journal, CFG) == journal.plans
    # Without the switch in the journal the second round goes by least_loaded.
    kept = Journal()
    kept.events = [e for e in journal.events if e[0] != "use_router"]
    assert replay(kept, CFG) != journal.plans
