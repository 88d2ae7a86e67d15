"""Circuit breakers: a worker that fails often (never enough in a row to take
itself out) or answers far slower than its peers gets no new work; after a
while one probe, then closed again, or open for twice as long."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nats

from cplane.client.sdk import Client
from cplane.orchestrator.breaker import BreakerParams, Breakers, BreakerState, peer_median
from cplane.orchestrator.dispatch import dispatch_config, plan_dispatch
from cplane.orchestrator.fleet import FleetView, WorkerView
from cplane.orchestrator.snapshot import Pending, QueueSnapshot
from cplane.schemas.admin import breakers_decoder
from cplane.schemas.messages import Final, Heartbeat, Request, Role
from cplane.schemas.settings import OrchestratorSettings
from cplane.workers.engines.base import Delta, EngineRequest
from cplane.workers.engines.sim import SimEngine
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.waiting import until

P = BreakerParams(error_rate=0.5, min_requests=4, slow_factor=4.0, slow_min_ms=250,
                  window=10, open_s=1.0, max_open_s=4.0, probe_timeout_s=5.0)


def hb(wid: str = "w", served: int = 0, faults: int = 0, tpot: float = 0.0) -> Heartbeat:
    return Heartbeat(worker_id=wid, role=Role.UNIFIED, models=["m"], engine="sim",
                     capacity=4, served=served, faults=faults, tpot_ms_avg=tpot)


def test_error_rate_opens_then_a_probe_closes() -> None:
    b = Breakers(P)
    assert not b.observe(hb(served=0), 0, 0)
    assert not b.observe(hb(served=2, faults=1), 1000, 0)  # 3 ended: below min_requests
    assert b.allows("w")
    assert b.observe(hb(served=3, faults=3), 2000, 0)  # 3 of 6 failed
    assert b.state("w")[0] is BreakerState.OPEN and not b.allows("w")
    assert "3/6" in b.state("w")[1]
    assert not b.tick(2500)
    assert b.tick(3000) and b.state("w")[0] is BreakerState.HALF_OPEN
    assert b.allows("w")  # one probe may go
    assert b.routed(["w"], 3000) and not b.allows("w")
    assert not b.observe(hb(served=3, faults=3), 3500, 0)  # still running
    assert b.observe(hb(served=4, faults=3), 4000, 0)  # served: closed, history gone
    assert b.state("w") == (BreakerState.CLOSED, "")
    assert not b.observe(hb(served=5, faults=4), 5000, 0)


def test_failed_probe_doubles_the_wait_up_to_a_cap() -> None:
    b = Breakers(P)
    b.observe(hb(), 0, 0)
    b.observe(hb(faults=4), 0, 0)
    waits = []
    now = 0.0
    for _ in range(4):
        opened = now
        while not b.tick(now):
            now += 100
        waits.append(now - opened)
        b.routed(["w"], now)
        faults = b._t["w"].faults + 1
        assert b.observe(hb(faults=faults), now, 0)
        assert b.state("w") == (BreakerState.OPEN, "probe failed")
    assert waits == [1000, 2000, 4000, 4000]


def test_probe_that_never_ends_fails() -> None:
    b = Breakers(P)
    b.observe(hb(), 0, 0)
    b.observe(hb(faults=4), 0, 0)
    b.tick(1000)
    b.routed(["w"], 1000)
    assert not b.tick(5000)
    assert b.tick(6001) and b.state("w") == (BreakerState.OPEN, "probe timed out")


def test_slow_worker_opens_against_its_peers() -> None:
    b = Breakers(P)
    b.observe(hb(tpot=900), 0, 100)
    assert not b.observe(hb(served=10, tpot=900), 0, 300)  # not 4x its peers
    assert not b.observe(hb(served=12, tpot=200), 0, 40)  # 5x, but under slow_min_ms
    assert b.observe(hb(served=14, tpot=1500), 0, 100)
    assert b.state("w")[1].startswith("TPOT 1500 ms")
    assert peer_median([100, 300, 5000], own=5000) == 200
    assert peer_median([0, 0]) == 0.0


def test_a_restarted_worker_starts_afresh() -> None:
    b = Breakers(P)
    b.observe(hb(served=100, faults=2), 0, 0)
    assert not b.observe(hb(served=1, faults=0), 1000, 0)  # counts went back: new process
    assert not b.observe(hb(served=5, faults=1), 2000, 0)


def test_pool_work_goes_to_a_chosen_worker_while_a_breaker_is_open() -> None:
    cfg = dispatch_config(OrchestratorSettings(policy="fifo"))
    w = [WorkerView(worker_id=f"w{i}", role=Role.UNIFIED, models=("m",), capacity=4,
                    held_items=i, running=0, waiting=0, kv_usage=0.0, last_seen_ms=0.0)
         for i in range(2)]
    p = Pending(request_id="r", level=2, arrival_ms=0, held_ms=0, model="m", prompt_tokens=8)
    q = QueueSnapshot(((), (), (p,), (), ()), {})
    whole = plan_dispatch(q, FleetView(tuple(w)), cfg, now_ms=0)
    assert [b.target for b in whole.batches] == ["any"]
    fenced = plan_dispatch(q, FleetView((w[1],), frozenset({Role.UNIFIED})), cfg, now_ms=0)
    assert [b.target for b in fenced.batches] == ["w1"]


# -- on a real nats-server ------------------------------------------------------------
class FlakyEngine(SimEngine):
    """A sim engine that, while `failing`, fails two requests of every three: never
    the three in a row that make its worker take itself out. (One in two sat at
    the breaker's 50 % exactly: a fault whose retry this worker pulled at once
    read as 49 % at every heartbeat on a slow machine, and it never opened.)"""

    failing = True
    calls = 0

    async def generate(self, req: EngineRequest) -> AsyncIterator[Delta]:  # type: ignore[override]
        self.calls += 1
        if self.failing and self.calls % 3 != 0:
            raise RuntimeError("XID 79: GPU has fallen off the bus (injected)")
        async with contextlib.aclosing(super().generate(req)) as inner:  # type: ignore[type-var]
            async for delta in inner:
                yield delta


async def test_flaky_worker_is_fenced_probed_and_let_back(nats_url: str) -> None:
    s = isolated_settings(
        nats_url, sim={"zero_cost": True}, worker={"heartbeat_s": 0.1, "capacity": 2},
        orchestrator={"policy": "fifo", "max_batch": 1,
                      "breaker_params": {"min_requests": 4, "open_s": 1.0, "window": 100}})
    flaky = FlakyEngine(s.sim)
    await flaky.start()
    async with stack(s, workers=[{"worker_id": "flaky", "engine": flaky},
                                 {"worker_id": "good"}]) as run:
        orch = run.orchestrator
        assert orch is not None and orch.registry.breakers is not None
        breakers = orch.registry.breakers
        await until(lambda: orch.registry.knows("flaky") and orch.registry.knows("good"))
        client = Client(await nats.connect(nats_url), s)
        try:
            n = 0
            while breakers.state("flaky")[0] is BreakerState.CLOSED:
                assert n < 200, "the breaker never opened"
                final = await (await client.submit(Request(request_id=f"b{n}", prompt="x y",
                                                           max_tokens=2))).result(timeout=30)
                assert isinstance(final, Final)  # faults are retried elsewhere: no loss
                n += 1
            assert flaky.calls >= 2
            reply = await client.nc.request(s.subjects.admin("breakers"), b"", timeout=5)
            infos = {i.worker_id: i for i in breakers_decoder.decode(reply.data)}
            assert infos["flaky"].state in ("open", "half_open") and "failed" in (
                infos["flaky"].reason)
            # Open: everything goes to the good worker, by name.
            if breakers.state("flaky")[0] is BreakerState.OPEN:
                before = flaky.calls
                for i in range(4):
                    final = await (await client.submit(Request(
                        request_id=f"o{i}", prompt="x y", max_tokens=2))).result(timeout=30)
                    if breakers.state("flaky")[0] is BreakerState.OPEN:
                        assert final.workers == ["good"], final.workers
                assert breakers.state("flaky")[0] is not BreakerState.OPEN or (
                    flaky.calls == before)
            flaky.failing = False  # repaired: after open_s, its probe succeeds
            probed_at = flaky.calls
            await until(lambda: breakers.state("flaky")[0] is BreakerState.HALF_OPEN, 5,
                        "half-open after open_s")
            final = await (await client.submit(Request(request_id="probe", prompt="x y",
                                                       max_tokens=2))).result(timeout=30)
            assert final.workers == ["flaky"] and flaky.calls == probed_at + 1
            await until(lambda: breakers.state("flaky")[0] is BreakerState.CLOSED, 5,
                        "closed after a good probe")
        finally:
            await client.close()
        await flaky.shutdown()
