"""A parallelism hint in the dispatch decision: only workers of that engine size, never a
pool subject; none of them live past model_wait: refused with the sizes served."""

from __future__ import annotations

from cplane.orchestrator.dispatch import DispatchConfig, DispatchPlan, plan_dispatch
from cplane.orchestrator.fleet import FleetView, WorkerView
from cplane.orchestrator.snapshot import Pending, QueueSnapshot
from cplane.schemas.messages import ErrorCode, Role


def fleet() -> FleetView:
    return FleetView(tuple(WorkerView(f"w{i}", Role.UNIFIED, ("m",), 8, 0, 0, 0, 0.0, 0.0,
                                      parallelism=n) for i, n in enumerate((1, 2, 2, 4))))


def plan(hint: int, router: str = "pool", now_ms: float = 0.0) -> DispatchPlan:
    p = Pending("r", 2, 0.0, 0.0, "m", 100, parallelism=hint)
    cfg = DispatchConfig.named(policy="fifo", router=router, pd="never", model_wait_ms=1000.0)
    return plan_dispatch(QueueSnapshot(((), (), (p,), (), ()), {}), fleet(), cfg, now_ms=now_ms)


def test_a_hint_reaches_only_engines_of_its_size_whatever_the_router() -> None:
    for router in ("pool", "round_robin", "least_loaded", "prefix_aware", "affinity"):
        assert plan(2, router).batches[0].target in ("w1", "w2"), router
        assert plan(4, router).batches[0].target == "w3", router
    assert plan(0).batches[0].target == "any"  # no hint: the pool subject, any layout


def test_a_hint_no_live_engine_matches_waits_then_is_refused_with_the_sizes() -> None:
    waiting = plan(8, now_ms=500.0)
    assert not waiting.batches and not waiting.rejections  # held: one may come
    refused = plan(8, now_ms=1000.0).rejections
    assert len(refused) == 1 and refused[0].code == ErrorCode.MODEL_UNAVAILABLE
    assert "8 GPUs" in refused[0].message and "[1, 2, 4]" in refused[0].message
