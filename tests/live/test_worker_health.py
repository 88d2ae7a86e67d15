"""Engine health on a real nats-server: a dead or failing engine makes its worker
unhealthy and its work goes to another worker, never into a flood of errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nats.aio.client import Client as NATS

from cplane.schemas.messages import ErrorReply, Final, WorkerState
from cplane.schemas.settings import Settings
from cplane.workers.engines.base import Delta, EngineDeadError, EngineRequest
from cplane.workers.engines.sim import SimEngine
from tests.live.test_worker_faults import Watch, fleet, item, put, work_empty
from tests.stack import watch_states
from tests.waiting import until


class FailingEngine(SimEngine):
    """A sim engine that fails every request after `after` tokens."""

    def __init__(self, s: Settings, exc: Exception, after: int = 0) -> None:
        super().__init__(s.sim, model=s.worker.model)
        self.exc = exc
        self.after = after

    async def generate(self, req: EngineRequest) -> AsyncIterator[Delta]:  # type: ignore[override]
        if self.after == 0:
            raise self.exc
        n = 0
        async with contextlib.aclosing(super().generate(req)) as inner:  # type: ignore[type-var]
            async for delta in inner:
                yield delta
                n += len(delta.token_ids)
                if n >= self.after:
                    raise self.exc


async def test_dead_engine_hands_work_back_and_reports_unhealthy(nats_url: str, nc: NATS
                                                                  ) -> None:
    async with fleet(nats_url, sim={"decode_a_ms": 5.0}) as f:
        js = nc.jetstream()
        unhealthy = (await watch_states(nc, f.s, "sick")).unhealthy
        sick = await f.start("sick", FailingEngine(f.s, EngineDeadError("gone"), after=10))
        watch = await Watch.start(nc, f.s, "survivor")
        await put(js, f.s, item("survivor", 60))
        await asyncio.wait_for(unhealthy.wait(), 10)
        assert sick.state is WorkerState.UNHEALTHY
        await f.start("healthy")
        final = await watch.terminal()
        await until(lambda: work_empty(js, f.s))
    assert isinstance(final, Final) and final.workers == ["sick", "healthy"]
    assert final.usage.completion_tokens == 60
    watch.assert_consistent(final)
    assert sick.ctx is not None and sick.ctx.counts["errors"] == 0


async def test_failing_engine_cannot_drain_the_queue_into_errors(nats_url: str, nc: NATS
                                                                  ) -> None:
    async with fleet(nats_url, worker={"engine_error_limit": 2, "max_migrations": 5},
                     sim={"zero_cost": True}) as f:
        js = nc.jetstream()
        sick = await f.start("sick", FailingEngine(f.s, RuntimeError("CUDA error")))
        watches = [await Watch.start(nc, f.s, f"q{i}") for i in range(6)]
        await put(js, f.s, *(item(f"q{i}", 4) for i in range(6)))
        await until(lambda: sick.state is WorkerState.UNHEALTHY)
        await f.start("healthy")
        finals = [await w.terminal() for w in watches]
        await until(lambda: work_empty(js, f.s))
    assert all(isinstance(x, Final) and x.workers[-1] == "healthy" for x in finals)
    assert sick.ctx is not None and sick.ctx.counts["errors"] == 0


async def test_engine_errors_on_one_item_are_bounded(nats_url: str, nc: NATS) -> None:
    """An item the engine keeps failing on runs 1 + max_migrations times, then
    gets ErrorReply engine_error (retryable)."""
    async with fleet(nats_url, worker={"engine_error_limit": 100, "max_migrations": 2},
                     sim={"zero_cost": True}) as f:
        js = nc.jetstream()
        w = await f.start("w", FailingEngine(f.s, RuntimeError("bad kernel")))
        watch = await Watch.start(nc, f.s, "poison")
        await put(js, f.s, item("poison", 4))
        err = await watch.terminal()
        await until(lambda: work_empty(js, f.s))
        assert w.state is WorkerState.READY  # below engine_error_limit: still serving
    assert isinstance(err, ErrorReply) and err.code == "engine_error" and err.retryable
    assert w.ctx is not None and w.ctx.counts["engine_faults"] == 3
    assert w.ctx.counts["handbacks"] == 2


