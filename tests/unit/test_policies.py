"""The five policies, fairness, SLO classes and admission: pure, on hand-built snapshots."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from cplane.orchestrator import plugins
from cplane.orchestrator.adaptive_policy import FIFO, PRIORITY, SLO, AdaptiveParams, Signals, adapt
from cplane.orchestrator.decision_state import DecisionState
from cplane.orchestrator.dispatch import DispatchConfig, plan_dispatch
from cplane.orchestrator.fairness import FairParams, fair_merge
from cplane.orchestrator.fleet import FleetView, WorkerView
from cplane.orchestrator.slo import resolve
from cplane.orchestrator.slo_policy import edf_feasible, prefill_budget
from cplane.orchestrator.snapshot import Measured, Pending, PolicyContext, QueueSnapshot
from cplane.schemas.messages import ErrorCode, Role
from cplane.schemas.settings import DEFAULT_SLO_CLASSES

POLICIES = ("fifo", "priority", "slo_aware", "cost_optimized", "adaptive")


def w(wid: str, cap: int = 4, held: int = 0, price: tuple[float, float] = (0.0, 0.0)
      ) -> WorkerView:
    return WorkerView(wid, Role.UNIFIED, ("m",), cap, held, 0, 0, 0.0, 0.0,
                      price_in_per_1k=price[0], price_out_per_1k=price[1])


def p(rid: str, t: float = 0.0, level: int = 2, ttft: float = 1000.0, tenant: str = "",
      prompt: int = 100, out: int = 100, shed: bool = False, budget: float | None = None
      ) -> Pending:
    return Pending(rid, level, t, t, "m", prompt, output_tokens=out, tenant=tenant,
                   ttft_target_ms=ttft, sheddable=shed, cost_budget=budget)


def ctx(now: float = 0.0, room: int = 100, drain: float = 0.0, fleet: FleetView | None = None,
        **kw: object) -> PolicyContext:
    return PolicyContext(now, fleet or FleetView((w("a"),)), room,
                         measured=Measured(drain, 50_000.0, **kw))  # type: ignore[arg-type]


def levels_of(ps: list[Pending]) -> tuple[tuple[Pending, ...], ...]:
    return tuple(tuple(sorted((x for x in ps if x.level == lv), key=lambda x: x.arrival_ms))
                 for lv in range(5))


# -- every policy --------------------------------------------------------------------
pendings = st.lists(st.tuples(st.floats(0, 10_000), st.integers(0, 4), st.sampled_from(
    [250.0, 1000.0, 30_000.0]), st.sampled_from(["a", "b", "c"]), st.integers(1, 5000)),
    min_size=0, max_size=40)


@settings(max_examples=60, deadline=None)
@given(pendings, st.integers(0, 50), st.sampled_from(POLICIES), st.floats(0, 50))
def test_no_policy_loses_or_duplicates_a_request(raw: list[tuple[float, int, float, str, int]],
                                                 k: int, name: str, drain: float) -> None:
    ps = [p(f"r{i}", t, lv, ttft, ten, prompt) for i, (t, lv, ttft, ten, prompt) in enumerate(raw)]
    order = plugins.build_policy(name)(levels_of(ps), k, ctx(now=5000, room=k // 2,
                                                                drain=drain))
    ids = [x.request_id for x in order]
    assert len(ids) == len(set(ids)) == min(k, len(ps))
    assert set(ids) <= {x.request_id for x in ps}


# -- slo_aware ------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(pendings, st.floats(0.5, 50))
def test_edf_orders_feasible_requests_by_deadline_and_puts_late_ones_after(
        raw: list[tuple[float, int, float, str, int]], drain: float) -> None:
    ps = [p(f"r{i}", t, lv, ttft, ten, prompt) for i, (t, lv, ttft, ten, prompt) in enumerate(raw)]
    c = ctx(now=5000, room=3, drain=drain)
    order = edf_feasible(ps, len(ps), c)
    feasible = []
    for x in order:  # the feasible prefix: each meets its deadline at its position
        if c.now_ms + c.wait_ms(len(feasible)) + c.prefill_ms(x) > x.ttft_deadline_ms:
            break
        feasible.append(x)
    deadlines = [x.ttft_deadline_ms for x in feasible]
    assert deadlines == sorted(deadlines)
    # what follows was judged late where it stood in deadline order: oldest first by level
    rest = order[len(feasible):]
    assert [(x.level, x.arrival_ms) for x in rest] == sorted((x.level, x.arrival_ms) for x in rest)


def test_a_request_that_cannot_make_it_does_not_push_others_past_theirs() -> None:
    # 1 slot free, 1 request per second drains: 'late' (deadline passed) would
    # otherwise go first by deadline and push 'tight' a second later.
    late = p("late", t=0, ttft=250)  # deadline 250, now 1000: lost already
    tight = p("tight", t=900, ttft=250)  # deadline 1150: only if first
    loose = p("loose", t=0, ttft=30_000)
    order = edf_feasible([late, tight, loose], 3, ctx(now=1000, room=1, drain=1.0))
    assert [x.request_id for x in order] == ["tight", "loose", "late"]


def test_slo_aware_holds_work_while_the_prefill_backlog_is_long() -> None:
    c = ctx(prefill_backlog_tokens=0.0)  # one worker at 50k tokens/s
    many = [p(f"r{i}", prompt=1000) for i in range(10)]
    assert prefill_budget(many, c, max_backlog_ms=50.0) == 2  # 2000 tokens = 40 ms
    busy = ctx(prefill_backlog_tokens=5000.0)  # 100 ms queued already
    assert prefill_budget(many, busy, max_backlog_ms=50.0) == 0
    assert prefill_budget(many, ctx(), max_backlog_ms=1.0) == 1  # an empty fleet takes one


# -- admission ------------------------------------------------------------------------
def plan(ps: list[Pending], fleet: tuple[WorkerView, ...], policy: str = "fifo",
         in_flight: int = 0, drain: float = 0.0) -> tuple[list[str], dict[str, ErrorCode]]:
    cfg = DispatchConfig.named(policy=policy, router="pool", pd="never", headroom=0.0)
    snap = QueueSnapshot(levels_of(ps), {("unified", "m"): in_flight})
    pl = plan_dispatch(snap, FleetView(fleet), cfg, now_ms=1000.0,
                       measured=Measured(drain_per_s=drain))
    sent = [rid for b in pl.batches for rid in b.request_ids]
    return sent, {r.request_id: r.code for r in pl.rejections}


def test_sheddable_requests_that_would_wait_too_long_are_shed_at_once() -> None:
    # The pool is full; 2 requests finish per second: the 3rd waiting would start
    # 1.5 s from now, past a 250 ms target. Sheddable: refused; others: stay held.
    ps = [p(f"s{i}", t=900, ttft=250, shed=True) for i in range(3)] + [p("k", t=900, ttft=250)]
    sent, refused = plan(ps, (w("a", cap=4),), in_flight=4, drain=2.0)
    assert sent == [] and refused == {f"s{i}": ErrorCode.OVERLOADED for i in range(3)}
    # with a free slot the first goes; unknown drain rate: nobody is shed
    sent, refused = plan(ps, (w("a", cap=4),), in_flight=3, drain=0.0)
    assert sent == ["s0"] and refused == {}


def test_a_budget_below_the_cheapest_worker_is_refused_before_it_runs() -> None:
    fleet = (w("cheap", price=(1.0, 2.0)), w("dear", price=(10.0, 20.0)))
    # 100 in + 100 out at the cheap worker: 0.1 + 0.2 = 0.3
    sent, refused = plan([p("ok", budget=0.3), p("poor", budget=0.29)], fleet)
    assert sent == ["ok"] and refused == {"poor": ErrorCode.OVER_BUDGET}


# -- cost_optimized --------------------------------------------------------------------
def test_cost_optimized_fills_the_cheapest_worker_first() -> None:
    fleet = (w("dear", cap=2, price=(10.0, 20.0)), w("cheap", cap=2, price=(1.0, 2.0)))
    cfg = DispatchConfig.named(policy="cost_optimized", router="pool", pd="never", headroom=0.0)
    snap = QueueSnapshot(levels_of([p(f"r{i}", t=i) for i in range(4)]), {})
    pl = plan_dispatch(snap, FleetView(fleet), cfg, now_ms=10.0)
    targets = [b.target for b in pl.batches for _ in b.request_ids]
    assert sorted(targets) == ["cheap", "cheap", "dear", "dear"]  # cheap first, then spill
    assert pl.batches[0].target == "cheap"


# -- fairness ---------------------------------------------------------------------------
def test_a_flooding_tenant_gets_its_share_not_everything() -> None:
    flood = [p(f"a{i}", t=i, tenant="a") for i in range(100)]
    light = [p(f"b{i}", t=50 + i, tenant="b") for i in range(10)]
    cands = sorted(flood + light, key=lambda x: x.arrival_ms)
    first20 = fair_merge(cands, 20, {}, {}, FairParams(fair=True))
    assert sum(x.tenant == "b" for x in first20) == 10  # equal weights: half each
    weighted = fair_merge(cands, 20, {}, {"a": 4.0}, FairParams(fair=True))
    assert sum(x.tenant == "b" for x in weighted) == 4  # 4:1


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from("abcd"), st.floats(0.5, 8), min_size=2),
       st.integers(0, 2**31))
def test_weights_hold_over_a_window_while_everyone_is_backlogged(
        weights: dict[str, float], seed: int) -> None:
    rng = random.Random(seed)
    cands = sorted((p(f"{t}{i}", t=rng.random() * 1000, tenant=t, prompt=100, out=100)
                    for t in weights for i in range(200)), key=lambda x: x.arrival_ms)
    n = 100
    got = fair_merge(cands, n, {}, weights, FairParams(fair=True))
    total = sum(weights.values())
    for t, wt in weights.items():
        share = sum(x.tenant == t for x in got) / n
        assert abs(share - wt / total) <= 1.5 / n * len(weights) + 0.02


def test_a_tenant_back_from_idle_banks_no_credit() -> None:
    d = DecisionState()
    d.held("a")
    d.dispatched([p("a1", tenant="a", prompt=1000, out=0)], FairParams())
    assert d.work["a"] == 1000
    d.held("b")  # new while a is busy: starts level with a, not at 0
    assert d.work["b"] == 1000
    d.finished("b", 0.0)
    d.dispatched([p("a2", tenant="a", prompt=5000, out=0)], FairParams())
    d.held("b")
    assert d.work["b"] == 6000


# -- adaptive ---------------------------------------------------------------------------
def test_adaptive_switches_up_and_down_with_hysteresis() -> None:
    prm = AdaptiveParams(up_s=1.0, down_s=10.0)
    hot, cold, lost = Signals(0.95, 0.0), Signals(0.1, 0.0), Signals(1.5, 0.8)
    mode, since = FIFO, -1.0
    mode, since = adapt(mode, since, hot, 0.0, prm)
    assert (mode, since) == (FIFO, 0.0)  # the condition starts to hold
    mode, since = adapt(mode, since, cold, 500.0, prm)
    assert (mode, since) == (FIFO, -1.0)  # a break resets it: no flapping
    for t in (1000.0, 1500.0, 2100.0):
        mode, since = adapt(mode, since, hot, t, prm)
    assert mode == SLO
    for t in (3000.0, 3500.0, 4100.0):
        mode, since = adapt(mode, since, lost, t, prm)
    assert mode == PRIORITY
    for t in (5000.0, 10_000.0, 15_100.0):
        mode, since = adapt(mode, since, cold, t, prm)
    assert mode == SLO  # back down only after down_s of calm
    for t in (16_000.0, 20_000.0, 26_100.0):
        mode, since = adapt(mode, since, cold, t, prm)
    assert mode == FIFO


# -- SLO classes ------------------------------------------------------------------------
def test_slo_classes_resolve_with_a_documented_answer_for_unknown_names() -> None:
    c = DEFAULT_SLO_CLASSES
    r = resolve("interactive", c, "standard")
    assert (r.name, r.known, r.ttft_ms, r.sheddable) == ("interactive", True, 250.0, True)
    r = resolve("premium-typo", c, "standard")
    assert (r.name, r.known, r.ttft_ms) == ("standard", False, 1000.0)
    assert resolve(None, c, "batch").name == "batch"
    # own targets override within [1/4, 4] of the class's
    assert resolve("standard", c, "standard", ttft_ms=500).ttft_ms == 500
    assert resolve("standard", c, "standard", ttft_ms=1).ttft_ms == 250
    assert resolve("standard", c, "standard", tpot_ms=10_000).tpot_ms == 400
    assert resolve("standard", c, "standard", deadline_ms=9000).deadline_ms == 9000


def test_tenant_counters_stay_bounded_whatever_names_requests_carry(monkeypatch: object) -> None:
    import cplane.orchestrator.decision_state as ds

    monkeypatch.setattr(ds, "MAX_IDLE_TENANTS", 100)  # type: ignore[attr-defined]
    d = DecisionState()
    d.held("steady")
    for i in range(1000):  # a client inventing a tenant per request
        t = f"t{i}"
        d.held(t)
        d.dispatched([p(f"r{i}", tenant=t)], FairParams())
        d.finished(t, float(i))
        assert len([x for x in d.work if x not in d.active]) <= 100
    assert "t999" in d.work and "t0" not in d.work  # the least recently charged went
