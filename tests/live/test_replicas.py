"""Two orchestrator replicas on one set of streams: one leads, the other takes over."""

from __future__ import annotations

import asyncio
import collections
import time

import nats
from nats.aio.msg import Msg

from cplane.bus.stored_retry import StoreResult
from cplane.client.sdk import Client
from cplane.orchestrator.service import Orchestrator
from cplane.schemas.messages import Request
from tests.natsfix import isolated_settings
from tests.stack import Running, _start, stack, start_replicas
from tests.waiting import until


async def test_one_leader_dispatches_and_a_standby_takes_over_after_a_crash(nats_url: str) -> None:
    s = isolated_settings(
        nats_url, orchestrator={"ack_wait_s": 2.0, "in_progress_every_s": 0.5,
                                "lease_ttl_s": 2.0, "lease_renew_s": 0.5},
        sim={"decode_a_ms": 20.0})
    terminals: collections.Counter[str] = collections.Counter()
    watch = await nats.connect(nats_url)

    async def on_done(msg: Msg) -> None:
        terminals[msg.subject.rpartition(".")[2]] += 1

    await watch.subscribe(s.subjects.done_all, cb=on_done)
    conns = [await nats.connect(nats_url), await nats.connect(nats_url)]
    async with stack(s, workers=2, orchestrator=False) as run:
        orchs = await start_replicas(s, run, conns)
        leader = next(o for o in orchs if o.leading)
        standby = next(o for o in orchs if not o.leading)
        client = Client(await nats.connect(nats_url), s)
        first = [await client.submit(Request(request_id=f"a{i}", prompt="x y z", max_tokens=20))
                 for i in range(40)]
        await until(lambda: leader.stats.dispatched > 0, 10, "dispatch")
        assert standby.stats.dispatched == 0 and standby.stats.accepted == 0
        # kill -9 of the leader: its connection drops, nothing is nak'ed or released
        await conns[orchs.index(leader)].close()
        t_crash = time.monotonic()
        second = [await client.submit(Request(request_id=f"b{i}", prompt="x", max_tokens=5))
                  for i in range(20)]
        await until(lambda: standby.leading, 10, "takeover")
        assert time.monotonic() - t_crash < 5.0  # within a few seconds
        finals = await asyncio.gather(*(h.result(timeout=30) for h in first + second))
        assert len(finals) == 60
        await until(lambda: len(terminals) >= 60, 10, "terminals seen live")
        assert set(terminals.values()) == {1}  # exactly one terminal per request
        await client.close()
        await stop_all(run)
    await watch.close()
    for c in conns:
        if not c.is_closed:
            await c.close()


async def stop_all(run: Running) -> None:
    for stop in run.stops.values():
        stop.set()
    await asyncio.gather(*run.tasks.values(), return_exceptions=True)


async def test_graceful_stop_hands_over_at_once(nats_url: str) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True},
                          orchestrator={"lease_ttl_s": 30.0, "lease_renew_s": 0.2})
    async with stack(s, workers=1, orchestrator=False) as run:
        a, b = Orchestrator(s), Orchestrator(s)
        await _start(a, run)
        await until(lambda: a.leading, 10, "a leads")
        await _start(b, run)
        run.stops[a].set()
        await run.tasks[a]
        t0 = time.monotonic()
        await until(lambda: b.leading, 5, "b takes over")  # far sooner than the 30 s ttl
        assert time.monotonic() - t0 < 2.0
        client = Client(await nats.connect(nats_url), s)
        final = await client.generate(Request(request_id="after", prompt="x", max_tokens=3),
                                      timeout=10)
        assert final.usage.completion_tokens == 3
        await client.close()


async def test_a_replica_that_steps_down_mid_publish_keeps_nothing(nats_url: str) -> None:
    """The leader loses the lease while a work publish is still out; the publish then
    fails. Its request must go to the new leader (naked), not back into the old
    one's ledger, where its keep-alives would hold it from everyone for good."""
    s = isolated_settings(
        nats_url, sim={"zero_cost": True},
        orchestrator={"ack_wait_s": 2.0, "in_progress_every_s": 0.5, "lease_ttl_s": 2.0,
                      "lease_renew_s": 0.5, "publish_timeout_s": 1.0})
    conns = [await nats.connect(nats_url), await nats.connect(nats_url)]
    async with stack(s, workers=1, orchestrator=False) as run:
        orchs = await start_replicas(s, run, conns)
        old = next(o for o in orchs if o.leading)
        new = next(o for o in orchs if not o.leading)
        entered, fail = asyncio.Event(), asyncio.Event()

        async def slow_publish(batch: object, entries: object) -> StoreResult:
            entered.set()
            await fail.wait()  # the broker's answer is late, then a refusal
            return StoreResult.REFUSED

        async def no_renewal() -> None:  # lost for good: the other replica holds it now
            return None

        old._store_batch = slow_publish  # type: ignore[method-assign]
        client = Client(await nats.connect(nats_url), s)
        handle = await client.submit(Request(request_id="x1", prompt="x y", max_tokens=3))
        await until(entered.is_set, 10, "the publish in flight")
        lease = old._leads.lease
        assert lease is not None
        lease._step = no_renewal  # type: ignore[method-assign]
        await lease.release()  # steps down; the standby acquires the lease
        await until(lambda: new.leading, 10, "takeover")
        fail.set()
        final = await handle.result(timeout=15)
        assert final.request_id == "x1"
        assert "x1" not in old.ledger
        await client.close()
        await stop_all(run)
    for c in conns:
        if not c.is_closed:
            await c.close()
