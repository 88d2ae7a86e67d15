"""The decision core on a real nats-server: the live orchestrator decides nothing
outside it (its recorded inputs replay to the very plans it made), and the
`adaptive` policy sees the TTFT misses workers measure (the Fin signal)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import nats

from cplane.client.sdk import Client
from cplane.orchestrator.adaptive_policy import FIFO, SLO
from cplane.orchestrator.core import Journal, replay
from cplane.orchestrator.dispatch import dispatch_config
from cplane.orchestrator.service import Orchestrator
from cplane.schemas.messages import Final, Priority, Request
from cplane.schemas.settings import Settings
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.waiting import until


async def _send(s: Settings, nats_url: str, n: int, *, every_s: float = 0.0,
                ttft_ms: float | None = None) -> list[Final]:
    client = Client(await nats.connect(nats_url), s)
    try:
        handles = []
        for i in range(n):
            prio = (Priority.HIGH, Priority.NORMAL, Priority.LOW)[i % 3]
            req = Request(request_id=f"r{i}", prompt="a b c d " * (1 + i % 5), max_tokens=4,
                          tenant=("light", "heavy", "heavy")[i % 3], ttft_target_ms=ttft_ms)
            handles.append(await client.submit(req, priority=prio))
            if every_s:
                await asyncio.sleep(every_s)  # an arrival rate, not a wait for an event
        return list(await asyncio.gather(*(h.result(timeout=60) for h in handles)))
    finally:
        await client.close()


async def test_the_live_orchestrators_decisions_replay_to_the_same_plans(nats_url: str) -> None:
    # Routers that read the tables (least_loaded: routed-since counters), tenant
    # fairness (virtual counters) and three priority levels, on two sim workers
    # with few slots so that requests wait and plans see a queue.
    s = isolated_settings(nats_url, worker={"capacity": 2}, sim={"decode_a_ms": 3.0},
                          orchestrator={"policy": "priority", "router": "least_loaded",
                                        "policy_params": {"fair": True}, "max_batch": 2})
    journal = Journal()
    async with stack(s, workers=2, journal=journal):
        finals = await _send(s, nats_url, 60)
    assert sorted(f.request_id for f in finals) == sorted(f"r{i}" for i in range(60))
    plans = journal.plans
    assert sum(p.dispatched for p in plans) >= 60 and len(plans) > 5
    assert any(len(p.sent) for p in plans)  # routed to workers, not only pools
    o = s.orchestrator
    again = replay(journal, dispatch_config(o), tenant_weights=o.tenant_weights,
                   prefill_tokens_per_s=o.prefill_tokens_per_s)
    assert again == plans


@contextlib.asynccontextmanager
async def _adaptive_run(nats_url: str, sim: dict[str, object], ttft_ms: float
                        ) -> AsyncIterator[tuple[Orchestrator, list[Final]]]:
    """One worker of 64 slots, the adaptive policy, 12 requests 0.25 s apart, each
    with a TTFT target of `ttft_ms`; yields the orchestrator and the Finals."""
    s = isolated_settings(nats_url, worker={"capacity": 64}, sim=sim,
                          orchestrator={"policy": "adaptive",
                                        "policy_params": {"up_s": 0.5}})
    async with stack(s, workers=1) as run:
        assert run.orchestrator is not None
        yield run.orchestrator, await _send(s, nats_url, 12, every_s=0.25, ttft_ms=ttft_ms)


async def test_adaptive_switches_on_ttft_misses_the_workers_measured(nats_url: str) -> None:
    # Low pressure (one request at a time on 64 slots) and nothing held long: the
    # only sign of trouble is that every request's first token comes after its
    # 250 ms target (the sim engine's prefill takes 400 ms). Workers measure it,
    # the Fin signal carries it, and adaptive leaves fifo for slo_aware.
    async with _adaptive_run(nats_url, {"prefill_a_ms": 400.0}, 250.0) as (orch, finals):
        assert all(f.timings.ttft_ms > 250 for f in finals)
        state = orch.core.state
        assert state.miss_rate(time.time() * 1000) > 0.5
        await until(lambda: state.mode == SLO, 10, "adaptive to leave fifo")


async def test_adaptive_stays_on_fifo_when_targets_are_met(nats_url: str) -> None:
    # Zero-cost engines meet a 2 s target even on a loaded CI box (a 250 ms one
    # was missed there once: a real miss, which rightly moved adaptive off fifo).
    async with _adaptive_run(nats_url, {"zero_cost": True}, 2000.0) as (orch, finals):
        assert all(f.timings.ttft_ms < 2000 for f in finals)
        assert orch.core.state.mode in ("", FIFO)
