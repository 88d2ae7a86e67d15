"""Orchestrator faults on a real nats-server: a missed terminal heals, requests that
keep failing are dead-lettered, stored cancels are honoured at start, work queued
for a worker that died moves to a live one, a bad copy cannot end another request."""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cplane.bus.provision import ensure_streams, ensure_work_consumer
from cplane.client.sdk import Client
from cplane.orchestrator.ledger import Entry, RequestState
from cplane.orchestrator.pending import pending_of
from cplane.schemas.codec import encode, output_decoder
from cplane.schemas.messages import (
    DeadLetter,
    ErrorReply,
    Final,
    FinishReason,
    Priority,
    Request,
    Role,
    WorkBatch,
    WorkItem,
)
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import consumer_for_priority
from cplane.workers.engines.sim import SimEngine
from cplane.workers.runtime import Worker
from tests.natsfix import isolated_settings
from tests.stack import _start, stack
from tests.waiting import until


async def test_a_terminal_missed_live_frees_its_slot_from_llm_done(nats_url: str,
                                                                   nc: NATS) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True},
                          orchestrator={"reconcile_after_s": 0.3})
    async with stack(s, workers=1) as run:
        orch = run.orchestrator
        assert orch is not None
        await until(lambda: orch.leading, what="leadership")
        # Its Final was stored while the orchestrator was not listening (a reconnect):
        ghost = Final(request_id="ghost", finish_reason=FinishReason.LENGTH)
        await nc.jetstream().publish(s.subjects.done_store("i", "ghost"), encode(ghost))
        item = WorkItem(request=Request(request_id="ghost", prompt="x"),
                        priority=Priority.NORMAL, slo_class="standard")
        e = Entry(pending_of(item, 0.0, s.orchestrator), item, seq=1)
        orch.core.hold(e)  # as if planned and stored, its Final never seen
        orch.ledger.transition(e, RequestState.DISPATCHING, ("unified", "sim"))
        orch.core.stored([e], time.time() * 1000)
        assert orch.ledger.in_flight(("unified", "sim")) == 1
        await until(lambda: "ghost" not in orch.ledger, 10, "the reconcile")
        assert orch.ledger.in_flight(("unified", "sim")) == 0 and orch.stats.reconciled == 1


async def test_a_request_that_keeps_failing_is_dead_lettered(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True},
                          orchestrator={"max_deliveries": 2})
    js = nc.jetstream()
    done = await nc.subscribe(s.subjects.done("i", "doomed"))
    dlq = await nc.subscribe(s.subjects.dead_letters_all)
    async with stack(s, workers=0, orchestrator=False):
        from cplane.bus.provision import ensure_request_consumers, ensure_streams

        await ensure_streams(js, s)
        await ensure_request_consumers(js, s)
        body = msgspec.json.encode(Request(request_id="doomed", prompt="x"))
        await js.publish(s.subjects.request("normal"), body)
        # two orchestrators that crash while holding it
        psub = await js.pull_subscribe_bind(consumer_for_priority(Priority.NORMAL),
                                            stream=s.streams.req.name)
        for _ in range(2):
            (msg,) = await psub.fetch(1, timeout=5)
            await msg.nak()
        await psub.unsubscribe()
    async with stack(s, workers=1):
        err = output_decoder.decode((await done.next_msg(timeout=15)).data)
        assert isinstance(err, ErrorReply) and err.code == "dead_letter"
        letter = msgspec.json.decode((await dlq.next_msg(timeout=5)).data, type=DeadLetter)
        assert letter.request_id == "doomed" and letter.deliveries == 3 and letter.data == body
        async def req_empty() -> bool:  # the ack follows the stores
            return (await js.stream_info(s.streams.req.name)).state.messages == 0

        await until(req_empty, 5, "the dead-lettered request's ack")


async def test_a_request_held_by_the_leader_and_dead_lettered_ends_on_its_own_subject(
        nats_url: str, nc: NATS) -> None:
    """The leader holds a request (no worker yet) whose message keeps coming back (each
    change of leader naks what it held): past max_deliveries its dead_letter
    ErrorReply goes to its own subject, where its client waits, and it leaves the
    ledger; not to `llm.done.invalid.seq<N>` as if another request owned the id."""
    s = isolated_settings(nats_url, orchestrator={"max_deliveries": 2})
    done = await nc.subscribe(s.subjects.done("i", "held1"))
    async with stack(s, workers=0) as run:
        orch = run.orchestrator
        assert orch is not None
        await until(lambda: orch.leading, what="leadership")
        await nc.jetstream().publish(s.subjects.request("normal"), msgspec.json.encode(
            Request(request_id="held1", prompt="x")))
        await until(lambda: "held1" in orch.ledger, 10, "the request held")
        for _ in range(2):  # naked as a standby would, redelivered to the leader
            entry = orch.ledger.get("held1")
            assert entry is not None and entry.state is RequestState.HELD
            first = entry.msg
            assert first is not None
            await first.nak()
            await until(lambda m=first: (e := orch.ledger.get("held1")) is None
                        or e.msg is not m, 10, "the redelivery")
        err = output_decoder.decode((await done.next_msg(timeout=10)).data)
        assert isinstance(err, ErrorReply) and err.code == "dead_letter"
        await until(lambda: "held1" not in orch.ledger, 5, "the ledger let go of it")


async def test_a_cancel_sent_before_the_orchestrator_started_is_honoured(
        nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True})
    js = nc.jetstream()
    async with stack(s, workers=0, orchestrator=False):
        from cplane.bus.provision import ensure_streams

        await ensure_streams(js, s)
        await js.publish(s.subjects.request("normal"),
                         msgspec.json.encode(Request(request_id="early", prompt="x")))
        await nc.publish(s.subjects.cancel("early"), b"")  # captured by LLM_CANCEL
        await nc.flush()
    client = Client(nc, s)
    handle = await client.attach("early")
    async with stack(s, workers=1) as run:
        final = await handle.result(timeout=15)
        assert final.finish_reason is FinishReason.CANCELLED and final.usage.completion_tokens == 0
        assert run.orchestrator is not None and run.orchestrator.stats.dispatched == 0


async def collect_finals(nc: NATS, s: Settings) -> list[Final]:
    """Every Final published from now on (a list that fills as they come)."""
    finals: list[Final] = []

    async def on(msg: Msg) -> None:
        out = output_decoder.decode(msg.data)
        if isinstance(out, Final):
            finals.append(out)

    await nc.subscribe(s.subjects.done_all, cb=on)
    return finals


async def test_work_queued_for_a_dead_worker_moves_to_a_live_one(nats_url: str) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True},
                          orchestrator={"worker_timeout_s": 1.0},
                          worker={"ack_wait_s": 1.0, "worker_id": "victim"})
    watcher = await nats.connect(nats_url)
    async with stack(s, workers=[{"worker_id": "heir"}]) as run:
        victim_nc = await nats.connect(nats_url, allow_reconnect=False)
        engine = SimEngine(s.sim)
        await engine.start()
        victim = Worker(s, engine, nc=victim_nc)
        await _start(victim, run)
        # kill -9: the socket dies (no goodbye heartbeat, nothing acked), then the tasks
        victim_nc._transport._io_writer.transport.abort()  # type: ignore[union-attr]
        await engine.shutdown()
        run.tasks[victim].cancel()
        await asyncio.wait({run.tasks[victim]}, timeout=10)
        # work a router sent to it by name before it learned of the death
        items = [WorkItem(request=Request(request_id=f"orphan{i}", prompt="x", max_tokens=3),
                          priority=Priority.NORMAL, slo_class="standard") for i in range(3)]
        finals = await collect_finals(watcher, s)
        await watcher.jetstream().publish(s.subjects.work(Role.UNIFIED, "victim"),
                                          encode(WorkBatch(items=items)))
        await until(lambda: len(finals) == 3, 20, "the orphans' Finals")
        assert {f.workers[-1] for f in finals} == {"heir"}
        assert (await watcher.jetstream().stream_info(s.streams.work.name)).state.messages == 0
    await watcher.close()


async def test_a_bad_copy_cannot_end_a_live_request(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, sim={"decode_a_ms": 20.0})
    async with stack(s, workers=1):
        client = Client(nc, s)
        handle = await client.submit(Request(request_id="victim", prompt="x", max_tokens=40))
        await handle.__aiter__().__anext__()  # it runs
        invalid = await nc.subscribe(f"{s.subjects.prefix}.done.invalid.>")
        await nc.jetstream().publish(s.subjects.request("normal"),
                                     b'{"request_id": "victim", "prompt": 7}')
        err = output_decoder.decode((await invalid.next_msg(timeout=10)).data)
        assert isinstance(err, ErrorReply) and err.request_id.startswith("seq")
        final = await handle.result(timeout=20)
        assert final.usage.completion_tokens == 40


async def test_a_refused_copy_of_a_finished_id_gets_its_stored_answer_again(
        nats_url: str, nc: NATS) -> None:
    """An id whose terminal is stored, published again and refused on its way (here
    malformed; in a partitioned fleet, refused as overloaded while LLM_REQ was full):
    its publisher, listening on the id's subject, hears the stored answer again, not
    a rejection sent to `llm.done.invalid.seq<N>` it never hears."""
    s = isolated_settings(nats_url, sim={"zero_cost": True})
    async with stack(s, workers=1):
        client = Client(nc, s)
        first = await client.generate(Request(request_id="again1", prompt="x", max_tokens=3))
        done = await nc.subscribe(s.subjects.done("i", "again1"))
        await nc.jetstream().publish(s.subjects.request("normal"),
                                     b'{"request_id": "again1", "prompt": 7}')
        term = output_decoder.decode((await done.next_msg(timeout=10)).data)
        assert term == first


async def test_work_of_a_worker_that_died_before_any_leader_saw_it_is_rescued(
        nats_url: str) -> None:
    # The worker died (its own queue left behind, items in it) while no
    # orchestrator ran, so no leader saw its heartbeats stop: the leader's sweep
    # of own queues of unknown workers moves them once it has listened to
    # heartbeats for a worker timeout.
    s = isolated_settings(nats_url, sim={"zero_cost": True},
                          orchestrator={"worker_timeout_s": 1.0})
    watcher = await nats.connect(nats_url)
    js = watcher.jetstream()
    await ensure_streams(js, s)
    await ensure_work_consumer(js, s, Role.UNIFIED, "ghost-w")
    items = [WorkItem(request=Request(request_id=f"stray{i}", prompt="x", max_tokens=3),
                      priority=Priority.NORMAL, slo_class="standard") for i in range(3)]
    finals = await collect_finals(watcher, s)
    await js.publish(s.subjects.work(Role.UNIFIED, "ghost-w"), encode(WorkBatch(items=items)))
    async with stack(s, workers=[{"worker_id": "heir"}]):
        await until(lambda: len(finals) == 3, 30, "the stray items' Finals")
        assert {f.workers[-1] for f in finals} == {"heir"}

        async def queue_gone() -> bool:
            names = {c.name for c in await js.consumers_info(s.streams.work.name)}
            return "work-unified-ghost-w" not in names

        await until(queue_gone, 30, "the dead worker's queue deleted")
    await watcher.close()


async def test_work_on_a_dead_workers_subject_that_no_consumer_reads_is_rescued(
        nats_url: str) -> None:
    """Routed to a worker by name after its consumer was deleted (it had been rescued
    as dead): the messages sit on its subject with no consumer. The leader's sweep
    finds the subject, makes the consumer again and moves them."""
    s = isolated_settings(nats_url, sim={"zero_cost": True},
                          orchestrator={"worker_timeout_s": 1.0})
    watcher = await nats.connect(nats_url)
    js = watcher.jetstream()
    await ensure_streams(js, s)
    items = [WorkItem(request=Request(request_id=f"unread{i}", prompt="x", max_tokens=3),
                      priority=Priority.NORMAL, slo_class="standard") for i in range(3)]
    finals = await collect_finals(watcher, s)
    await js.publish(s.subjects.work(Role.UNIFIED, "gone-w"), encode(WorkBatch(items=items)))
    async with stack(s, workers=[{"worker_id": "heir"}]):
        await until(lambda: len(finals) == 3, 30, "the unread items' Finals")
        assert {f.workers[-1] for f in finals} == {"heir"}
        # The worker acks its message once the terminal is stored: a moment after it.
        async def drained() -> bool:
            return (await js.stream_info(s.streams.work.name)).state.messages == 0

        await until(drained, 10, "the moved messages acked")
    await watcher.close()
