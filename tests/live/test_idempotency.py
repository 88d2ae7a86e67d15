"""Request ids as idempotency keys, past the streams' duplicate windows (scaled down here).

A request id is the identity of a request for as long as its terminal is
stored (LLM_DONE: days), not only for the two-minute duplicate windows:
published again it gets its stored terminal back, never a hang and never a
second run's terminal; and a malformed copy of a live id, handled by a
replica that never saw the original, never ends it.
"""

from __future__ import annotations

import asyncio
import json

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cplane.orchestrator.service import Orchestrator
from cplane.schemas.settings import Settings
from tests.natsfix import isolated_settings
from tests.stack import Running, _start, stack
from tests.waiting import until

WINDOW_S = 1.5  # every stream's duplicate window, scaled down from 120 s


def settings(url: str, **extra: dict[str, object]) -> Settings:
    windows: dict[str, dict[str, object]] = {
        f"stream_{k}": {"duplicate_window_s": WINDOW_S} for k in ("req", "work", "out", "done")}
    return isolated_settings(url, **{**windows, **extra})


class Terminals:
    def __init__(self) -> None:
        self.seen: dict[str, list[dict[str, object]]] = {}

    async def on_done(self, msg: Msg) -> None:
        self.seen.setdefault(msg.subject.rsplit(".", 1)[-1], []).append(json.loads(msg.data))

    def count(self, rid: str) -> int:
        return len(self.seen.get(rid, []))


async def takeover(run: Running, s: Settings) -> Orchestrator:
    """The orchestrator stops; a new replica that never saw any id leads."""
    assert run.orchestrator is not None
    run.stops[run.orchestrator].set()
    await run.tasks[run.orchestrator]
    fresh = Orchestrator(s)
    await _start(fresh, run)
    await until(lambda: fresh.leading, 10, "the new replica leads")
    return fresh


async def publish(nc: NATS, s: Settings, rid: str, body: dict[str, object] | None = None) -> None:
    data = body if body is not None else {"request_id": rid, "prompt": "x y z", "max_tokens": 4}
    await nc.jetstream().publish(s.subjects.request("normal", "standard"),
                                 json.dumps(data).encode(), headers={"Nats-Msg-Id": rid})


async def stored_terminals(nc: NATS, s: Settings, rid: str) -> int:
    """Terminals LLM_DONE holds for `rid` (two would be two runs' answers)."""
    subject = s.subjects.done_store("i", rid)
    info = await nc.jetstream().stream_info(s.streams.done.name, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def test_an_id_published_again_after_the_windows_gets_its_stored_terminal(
        nats_url: str) -> None:
    """The orchestrator remembers the id: it was acked silently (a hang) before."""
    s = settings(nats_url, sim={"zero_cost": True})
    nc = await nats.connect(nats_url)
    got = Terminals()
    await nc.subscribe(s.subjects.done_all, cb=got.on_done)
    async with stack(s, workers=1):
        await publish(nc, s, "again-1")
        await until(lambda: got.count("again-1") == 1, 15, "the first terminal")
        await asyncio.sleep(WINDOW_S + 0.5)  # the scenario: every duplicate window passes
        await publish(nc, s, "again-1")  # a client retrying after its own timeout
        await until(lambda: got.count("again-1") == 2, 15, "a terminal for the second publish")
        assert got.seen["again-1"][1] == got.seen["again-1"][0]  # the stored one
        assert await stored_terminals(nc, s, "again-1") == 1
    await nc.close()


async def test_an_id_a_new_leader_never_saw_runs_once_more_and_answers_with_the_stored(
        nats_url: str) -> None:
    """Past LLM_REQ's window, inside LLM_WORK's and LLM_OUT's, to a replica that never
    saw the id (a takeover): its work publish was swallowed as a repeat of the first
    run's batch (same Nats-Msg-Id), a hang. Now it runs, its outputs are dropped as
    repeats, and the stored terminal is sent again."""
    s = settings(nats_url, sim={"zero_cost": True}, stream_work={"duplicate_window_s": 60.0},
                 stream_out={"duplicate_window_s": 60.0},
                 stream_done={"duplicate_window_s": 60.0})
    nc = await nats.connect(nats_url)
    got = Terminals()
    await nc.subscribe(s.subjects.done_all, cb=got.on_done)
    async with stack(s, workers=1) as run:
        await publish(nc, s, "again-2")
        await until(lambda: got.count("again-2") == 1, 15, "the first terminal")
        await takeover(run, s)
        await asyncio.sleep(WINDOW_S + 0.5)  # the scenario: LLM_REQ's window passes
        await publish(nc, s, "again-2")
        await until(lambda: got.count("again-2") == 2, 15, "a terminal for the second publish")
        assert got.seen["again-2"][1] == got.seen["again-2"][0]
        assert await stored_terminals(nc, s, "again-2") == 1
    await nc.close()


async def test_an_id_no_replica_remembers_past_every_window_is_answered_from_the_store(
        nats_url: str) -> None:
    """Every window passed and the replica is new (a takeover): it used to run the id
    again and store a second terminal. Now its id is looked up in LLM_DONE first."""
    s = settings(nats_url, sim={"zero_cost": True})
    nc = await nats.connect(nats_url)
    got = Terminals()
    await nc.subscribe(s.subjects.done_all, cb=got.on_done)
    async with stack(s, workers=1) as run:
        await publish(nc, s, "again-3")
        await until(lambda: got.count("again-3") == 1, 15, "the first terminal")
        fresh = await takeover(run, s)
        await asyncio.sleep(WINDOW_S + 0.5)  # the scenario: every duplicate window passes
        await publish(nc, s, "again-3")
        await until(lambda: got.count("again-3") == 2, 15, "a terminal for the second publish")
        assert got.seen["again-3"][1] == got.seen["again-3"][0]
        assert await stored_terminals(nc, s, "again-3") == 1
        assert fresh.stats.dispatched == 0  # not run again
    await nc.close()


async def test_a_malformed_copy_of_a_live_id_never_ends_it(nats_url: str) -> None:
    """After a takeover the new leader's memory lacks the running request; a bad copy
    of its id must be answered on the invalid subject, and the request keep its
    own Final (not be ended by the copy's ErrorReply under the same dedup id)."""
    s = settings(nats_url, sim={"decode_a_ms": 20.0})
    nc = await nats.connect(nats_url)
    got = Terminals()
    await nc.subscribe(s.subjects.done_all, cb=got.on_done)
    chunks: list[str] = []

    async def on_out(msg: Msg) -> None:
        chunks.append(msg.subject)

    await nc.subscribe(s.subjects.out("i", "live-1"), cb=on_out)
    async with stack(s, workers=1) as run:
        await publish(nc, s, "live-1", {"request_id": "live-1", "prompt": "x", "max_tokens": 150})
        await until(lambda: len(chunks) >= 3, 15, "the request streams")
        fresh = await takeover(run, s)  # a takeover: the new leader never saw live-1
        await publish(nc, s, "live-1-bad", {"request_id": "live-1", "prompt": "x",
                                            "max_tokens": -3})
        await until(lambda: got.count("live-1") >= 1, 30, "live-1's terminal")
        assert all(t.get("finish_reason") for t in got.seen["live-1"]), (
            f"live-1 was ended by its malformed copy: {got.seen['live-1']}")
        assert fresh.stats.rejected == 1
    await nc.close()


async def test_an_id_whose_terminal_llm_done_lacks_is_answered_from_llm_out(
        nats_url: str) -> None:
    """LLM_DONE's copy of LLM_OUT was seen to skip terminals on a cluster (a leader
    killed -9: the cluster chaos run's done_missing), and the id, published again,
    ran a second time. Made here by purging the copy: the id is still answered from
    LLM_OUT, never run again."""
    s = settings(nats_url, sim={"zero_cost": True})
    nc = await nats.connect(nats_url)
    got = Terminals()
    await nc.subscribe(s.subjects.done_all, cb=got.on_done)
    async with stack(s, workers=1) as run:
        await publish(nc, s, "again-4")
        await until(lambda: got.count("again-4") == 1, 15, "the first terminal")
        await until(lambda: stored_terminals(nc, s, "again-4"), 15, "LLM_DONE's copy")
        await nc.jetstream().purge_stream(s.streams.done.name,
                                          subject=s.subjects.done_store("i", "again-4"))
        assert await stored_terminals(nc, s, "again-4") == 0
        fresh = await takeover(run, s)
        await asyncio.sleep(WINDOW_S + 0.5)  # the scenario: every duplicate window passes
        await publish(nc, s, "again-4")
        await until(lambda: got.count("again-4") == 2, 15, "a terminal for the second publish")
        assert got.seen["again-4"][1] == got.seen["again-4"][0]
        assert fresh.stats.dispatched == 0  # not run again
    await nc.close()


async def test_a_fresh_id_is_held_without_a_lookup_and_others_are_looked_up(
        nats_url: str) -> None:
    """Request.fresh_id (the gateway's ids): no stored-terminal lookup on the way to the
    first token; an id without the claim is still looked up, and both are answered."""
    s = settings(nats_url, sim={"zero_cost": True})
    nc = await nats.connect(nats_url)
    got = Terminals()
    await nc.subscribe(s.subjects.done_all, cb=got.on_done)
    async with stack(s, workers=1) as run:
        assert run.orchestrator is not None and run.orchestrator._known_ids is not None
        known = run.orchestrator._known_ids
        for i in range(5):
            await publish(nc, s, f"fresh-{i}", {"request_id": f"fresh-{i}", "prompt": "x y",
                                                "max_tokens": 2, "fresh_id": True})
        await until(lambda: all(got.count(f"fresh-{i}") == 1 for i in range(5)), 15,
                    "the fresh ids answered")
        assert known.looked_up == 0
        await publish(nc, s, "plain-1")
        await until(lambda: got.count("plain-1") == 1, 15, "the plain id answered")
        assert known.looked_up == 1
    await nc.close()
