"""The fleet simulator: determinism, conservation, the shared engine model, PD,
prefix caching, routing under heartbeat lag. Virtual time only; fast."""

from __future__ import annotations

import msgspec
import pytest

from cplane.fleetsim.metrics import shared_cache_bound, summarize
from cplane.fleetsim.records import TraceRequest
from cplane.fleetsim.sim import FleetSpec, simulate
from cplane.fleetsim.synthetic import LengthDist, SyntheticSpec, generate
from cplane.fleetsim.workload import load_mooncake, scale_rate
from cplane.orchestrator.dispatch import DispatchConfig
from cplane.schemas.settings import SimSettings
from cplane.workers.engines.stepcore import CoreSeq, StepCore
from tests import traces


def cfg(router: str = "pool", policy: str = "fifo", pd: str = "never") -> DispatchConfig:
    return DispatchConfig.named(policy=policy, router=router, pd=pd)


def work(n: int = 300, rate: float = 40.0, seed: int = 1) -> list[TraceRequest]:
    spec = SyntheticSpec(rate_per_s=rate, count=n, prompt=LengthDist(600, 0.8, 4000),
                         output=LengthDist(120, 0.8, 600), levels={0: 1, 2: 2, 4: 1})
    return generate(spec, seed)


def times(run: object) -> list[tuple[float | None, float | None, int]]:
    return [(r.first_token_ms, r.finished_ms, r.output_tokens) for r in run.records]  # type: ignore[attr-defined]


def test_a_seed_replays_exactly_and_every_request_completes() -> None:
    reqs = work()
    a = simulate(reqs, FleetSpec(workers=4), cfg("random"), seed=7)
    b = simulate(reqs, FleetSpec(workers=4), cfg("random"), seed=7)
    c = simulate(reqs, FleetSpec(workers=4), cfg("random"), seed=8)
    assert times(a) == times(b) and times(a) != times(c)
    for rec in a.records:
        assert rec.finished_ms is not None and not rec.rejected
        assert rec.output_tokens == rec.req.output_tokens
        assert rec.req.arrival_ms < rec.dispatched_ms <= rec.first_token_ms <= rec.finished_ms  # type: ignore[operator]


def test_one_request_costs_what_the_engine_model_says() -> None:
    s = SimSettings()
    r = TraceRequest("x", 0.0, prompt_tokens=1000, output_tokens=50)
    fleet = FleetSpec(workers=1)
    rec = simulate([r], fleet, cfg()).records[0]
    core = StepCore(s)
    seq = CoreSeq("x", 1000, 1000, 50, True)
    core.add(seq)
    step = core.plan(0.0)
    assert step is not None
    prefill_ms = step.ms
    core.begin(step)
    core.advance()
    decode_ms = core.decode_run_ms(49)
    delays = fleet.intake_ms + fleet.work_ms + fleet.token_ms
    assert rec.ttft_ms == pytest.approx(prefill_ms + delays)
    assert rec.e2e_ms == pytest.approx(prefill_ms + decode_ms + delays)
    assert rec.tpot_ms == pytest.approx(decode_ms / 49)


def test_decode_runs_priced_at_once_equal_step_by_step() -> None:
    # The simulator prices a run of decode steps in one call and cuts it when
    # work arrives; stepping one at a time must give the same token times.
    reqs = work(200, rate=80.0)
    fast = simulate(reqs, FleetSpec(workers=3), cfg("round_robin"))
    slow = simulate(reqs, FleetSpec(workers=3, max_run_steps=1), cfg("round_robin"))
    assert fast.events < slow.events
    for a, b in zip(times(fast), times(slow), strict=True):
        assert a[2] == b[2]
        assert a[0] == pytest.approx(b[0], rel=1e-9) and a[1] == pytest.approx(b[1], rel=1e-9)


def test_overload_queues_at_the_orchestrator_and_priority_serves_level_0_first() -> None:
    reqs = scale_rate(work(400, rate=40.0), 8.0)  # far beyond 2 workers
    fleet = FleetSpec(workers=2, capacity=8)
    fifo = summarize(simulate(reqs, fleet, cfg(policy="fifo")))
    prio = summarize(simulate(reqs, fleet, cfg(policy="priority")))
    assert fifo["completed"] == prio["completed"] == 400
    crit_fifo = fifo["ttft_by_priority"]["critical"]["p50"]
    crit_prio = prio["ttft_by_priority"]["critical"]["p50"]
    back_prio = prio["ttft_by_priority"]["background"]["p50"]
    assert crit_prio < crit_fifo / 2 and crit_prio < back_prio / 2


def test_pd_runs_prefill_then_decode_with_the_kv_transfer() -> None:
    reqs = work(100, rate=20.0)
    run = simulate(reqs, FleetSpec(workers=0, prefill_workers=1, decode_workers=2), cfg(pd="always"))
    for rec in run.records:
        assert rec.finished_ms is not None and rec.output_tokens == rec.req.output_tokens
        assert rec.worker.startswith("d")  # the decode side finished it
    s = summarize(run)
    assert s["completed"] == 100


def test_prefix_cache_hits_on_the_mooncake_trace_and_saves_prefill() -> None:
    # A quarter of the trace's rate: one worker keeps up (12k-token prompts).
    reqs = scale_rate(load_mooncake(traces.need(traces.MOONCAKE), limit=400), 0.25)
    big = msgspec.structs.replace(SimSettings(), prefix_cache_tokens=10**9,
                                  kv_tokens=10**7)
    off = msgspec.structs.replace(big, prefix_cache_tokens=0)
    # One worker with an unbounded cache hits what one shared cache would.
    hit = simulate(reqs, FleetSpec(workers=1, engine=big), cfg())
    miss = simulate(reqs, FleetSpec(workers=1, engine=off), cfg())
    assert hit.prefix_query_tokens > 0 and miss.prefix_query_tokens == 0
    rate = hit.prefix_hit_tokens / hit.prefix_query_tokens
    assert rate == pytest.approx(shared_cache_bound(reqs, 0), abs=0.03)
    assert summarize(hit)["mean_ttft_ms"] < 0.9 * summarize(miss)["mean_ttft_ms"]
    # A small cache per worker, split over four: fewer hits.
    small = simulate(reqs, FleetSpec(workers=4), cfg("round_robin"))
    assert 0 < small.prefix_hit_tokens / small.prefix_query_tokens < rate


def test_random_routing_is_less_balanced_than_round_robin() -> None:
    reqs = scale_rate(work(600, rate=40.0), 3.0)
    rr = summarize(simulate(reqs, FleetSpec(workers=8), cfg("round_robin")))
    rnd = summarize(simulate(reqs, FleetSpec(workers=8), cfg("random")))
    assert rnd["mean_load_imbalance"] > rr["mean_load_imbalance"]
