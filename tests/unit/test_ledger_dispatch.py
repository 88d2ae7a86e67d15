"""The ledger's transitions and the pure dispatch plan, with plain asserts."""

from __future__ import annotations

import pytest

from cplane.orchestrator.dispatch import DispatchConfig, Pending, QueueSnapshot, plan_dispatch
from cplane.orchestrator.fleet import FleetView, WorkerView
from cplane.orchestrator.ledger import Entry, IllegalTransition, Ledger, RequestState
from cplane.schemas.messages import ErrorCode, Priority, Request, Role, WorkItem
from cplane.schemas.subjects import ANY_TARGET, model_target


def entry(rid: str, prio: Priority = Priority.NORMAL, seq: int = 1) -> Entry[WorkItem]:
    item = WorkItem(request=Request(request_id=rid, prompt="x"), priority=prio, slo_class="s")
    return Entry(Pending(rid, prio.level, float(seq), 0.0, "m", 10), item, seq=seq)


def test_ledger_moves_and_refuses_illegal_ones() -> None:
    led = Ledger(5)
    a, b = entry("a", seq=1), entry("b", seq=2)
    led.transition(a, RequestState.HELD)
    led.transition(b, RequestState.HELD)
    assert led.held_count() == 2 and [e.request_id for e in led.held_heads(2, 5)] == ["a", "b"]
    with pytest.raises(IllegalTransition):
        led.transition(a, RequestState.DISPATCHED)  # must go through DISPATCHING
    with pytest.raises(IllegalTransition):
        led.transition(entry("a"), RequestState.HELD)  # already there
    led.transition(a, RequestState.DISPATCHING, ("unified", "m"))
    assert led.in_flight(("unified", "m")) == 1 and led.held_count() == 1
    led.transition(a, RequestState.HELD)  # refused publish: planned again
    assert led.in_flight(("unified", "m")) == 0
    assert [e.request_id for e in led.held_heads(2, 5)] == ["a", "b"] or \
        sorted(e.request_id for e in led.held_heads(2, 5)) == ["a", "b"]
    led.transition(a, RequestState.DISPATCHING, ("unified", "m"))
    led.transition(a, RequestState.DISPATCHED)
    assert led.in_flight(("unified", "m")) == 1
    with pytest.raises(IllegalTransition):
        led.transition(a, RequestState.HELD)
    led.transition(a, None)
    assert "a" not in led and led.in_flight(("unified", "m")) == 0
    led.transition(b, RequestState.FINISHING)
    with pytest.raises(IllegalTransition):
        led.transition(b, RequestState.DISPATCHING, ("unified", "m"))
    led.transition(b, None)
    assert len(led) == 0 and led.held_heads(2, 5) == []


def worker(wid: str, role: Role = Role.UNIFIED, models: tuple[str, ...] = ("m",), cap: int = 4,
           held: int = 0) -> WorkerView:
    return WorkerView(wid, role, models, cap, held, 0, 0, 0.0, 0.0)


CFG = DispatchConfig.named(policy="priority", policy_params={"aging_s": 3600}, pd="never",
                           headroom=0.0, max_batch=2, model_wait_ms=1000)


def pending(rid: str, level: int = 2, t: float = 0.0, model: str = "m",
            redispatched: bool = False) -> Pending:
    return Pending(rid, level, t, 0.0, model, 10, None, redispatched)


def snapshot(levels: dict[int, list[Pending]], in_flight: dict[tuple[str, str], int] | None = None
             ) -> QueueSnapshot:
    return QueueSnapshot(tuple(tuple(levels.get(i, [])) for i in range(5)), in_flight or {})


def test_plan_fills_pool_capacity_in_priority_order_and_batches() -> None:
    fleet = FleetView((worker("a", cap=3),))
    q = snapshot({4: [pending("bg", 4)], 0: [pending("c1", 0), pending("c2", 0)],
                  2: [pending("n1", 2, 1.0)]})
    plan = plan_dispatch(q, fleet, CFG, now_ms=10.0)
    sent = [rid for b in plan.batches for rid in b.request_ids]
    assert sent == ["c1", "c2", "n1"]  # room 3, highest priority first; bg stays held
    assert [len(b.request_ids) for b in plan.batches] == [2, 1]  # max_batch 2
    assert all(b.target == ANY_TARGET and b.pool == ("unified", "m") for b in plan.batches)
    # the pool already holds 2: one slot left
    plan = plan_dispatch(snapshot({2: [pending("x"), pending("y")]}, {("unified", "m"): 2}),
                         fleet, CFG, now_ms=10.0)
    assert plan.dispatched == 1


def test_a_full_pool_does_not_block_another_models_requests() -> None:
    fleet = FleetView((worker("a", models=("ma",), cap=1), worker("b", models=("mb",), cap=1)))
    q = snapshot({0: [pending("a1", 0, model="ma"), pending("a2", 0, model="ma")],
                  4: [pending("b1", 4, model="mb")]})
    plan = plan_dispatch(q, fleet, CFG, now_ms=0.0)
    assert sorted(r for b in plan.batches for r in b.request_ids) == ["a1", "b1"]
    # a mixed pool: each model's work goes to that model's pool subject
    assert {b.target for b in plan.batches} == {model_target("ma"), model_target("mb")}


def test_absent_model_waits_then_is_rejected_retryable() -> None:
    fleet = FleetView((worker("a"),))
    q = snapshot({2: [pending("gone", model="other")]})
    assert plan_dispatch(q, fleet, CFG, now_ms=500.0) == plan_dispatch(q, fleet, CFG, now_ms=0.0)
    assert not plan_dispatch(q, fleet, CFG, now_ms=500.0).rejections  # still waiting
    plan = plan_dispatch(q, fleet, CFG, now_ms=1000.0)
    (rej,) = plan.rejections
    assert rej.code is ErrorCode.MODEL_UNAVAILABLE and rej.retryable and not plan.batches
    # no fleet at all: the same wait, the same answer
    assert plan_dispatch(q, FleetView(), CFG, now_ms=1000.0).rejections


def test_redispatched_requests_go_out_alone_and_any_model_resolves() -> None:
    fleet = FleetView((worker("a", cap=8),))
    q = snapshot({2: [pending("r", redispatched=True), pending("p1", model=""),
                      pending("p2", model="")]})
    plan = plan_dispatch(q, fleet, CFG, now_ms=0.0)
    assert plan.batches[0].request_ids == ("r",)
    assert plan.batches[1].request_ids == ("p1", "p2") and plan.batches[1].model == "m"


def test_pd_requests_count_against_the_decode_side() -> None:
    fleet = FleetView((worker("p", Role.PREFILL, cap=8), worker("d", Role.DECODE, cap=2)))
    q = snapshot({2: [pending(f"r{i}") for i in range(5)]})
    plan = plan_dispatch(q, fleet, CFG, now_ms=0.0)
    assert plan.dispatched == 2 and all(b.role is Role.PREFILL and b.pool == ("pd", "m")
                                        for b in plan.batches)
