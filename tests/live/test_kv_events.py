"""Precise prefix routing: engines' KV events, forwarded by workers on NATS, folded
into the router's index; a prompt goes where its prefix is cached, not merely
where it was sent."""

from __future__ import annotations

import asyncio

import nats
from nats.aio.msg import Msg

from cplane.client.sdk import Client
from cplane.orchestrator.prefix_router import PrefixIndex
from cplane.orchestrator.prompt_hash import PromptHasher
from cplane.orchestrator.service import Orchestrator
from cplane.schemas.blocks import chain_hashes, word_token_ids
from cplane.schemas.codec import kv_events_decoder
from cplane.schemas.messages import KvEvents, Request
from cplane.schemas.settings import SimSettings
from cplane.workers.engines.base import EngineRequest, KvDelta
from cplane.workers.engines.sim import SimEngine
from cplane.workers.engines.stepcore import PrefixCache
from cplane.workers.kv_events import IDLE_CHECK_S, QUIET_TICKS, KvEventPump
from tests.natsfix import isolated_settings
from tests.stack import _start, stack
from tests.waiting import until

BLOCK = 16


# -- the pure parts ---------------------------------------------------------------
def test_chain_hashes_equal_prefix_equal_hashes() -> None:
    a = chain_hashes(list(range(100)), 16)
    b = chain_hashes([*range(50), 999, *range(51, 100)], 16)
    assert len(a) == 6 and a[:3] == b[:3] and a[3] != b[3] and a[4] != b[4]
    assert chain_hashes(list(range(15)), 16) == ()
    assert all(0 <= h < 2**63 for h in a)  # JSON-safe
    assert chain_hashes(list(range(32)), 16) == a[:2]


def test_prefix_cache_drain_nets_changes() -> None:
    c = PrefixCache(2, record=True)
    c.insert([1, 2])
    c.insert([3])  # evicts 1
    c.insert([1])  # 1 back, evicts 2
    stored, removed = c.drain()
    assert sorted(stored) == [1, 3] and removed == [2]
    assert c.drain() == ([], [])
    assert c.blocks() == [3, 1]


def test_index_folds_events_in_order_and_asks_on_gaps() -> None:
    ix = PrefixIndex()
    assert ix.apply("w", "e1", 1, [10, 11], [], False)
    assert ix.match("w", [10, 11, 12]) == 2 and ix.reporting("w")
    assert not ix.apply("w", "e1", 3, [12], [], False)  # seq 2 lost: resync
    assert ix.match("w", [10, 11, 12]) == 2  # unchanged until the snapshot
    assert ix.apply("w", "e1", 3, [10, 12], [], True)  # snapshot at seq 3: 11 is gone
    assert ix.match("w", [10, 11]) == 1 and ix.match("w", [12]) == 1
    assert ix.apply("w", "e1", 2, [99], [], True)  # a stale snapshot changes nothing
    assert ix.match("w", [99]) == 0
    assert ix.apply("w", "e1", 3, [77], [], False)  # already covered by the snapshot
    assert ix.match("w", [77]) == 0
    assert ix.apply("w", "e1", 4, [], [10], False)
    assert ix.match("w", [10]) == 0
    assert ix.apply("w", "e2", 1, [5], [], False)  # a restarted engine: nothing before
    assert ix.match("w", [12]) == 0 and ix.match("w", [5]) == 1
    assert not ix.apply("v", "e9", 7, [1], [], False)  # met mid-life: resync
    ix.forget("w")
    assert not ix.reporting("w") and ix.match("w", [5]) == 0


def test_reporting_worker_counts_recent_sends_only() -> None:
    ix = PrefixIndex(pending_ms=1000)
    ix.now_ms = 0.0
    ix.add("w", [1, 2])
    assert ix.match("w", [1, 2]) == 2  # approximate: sent = held
    ix.apply("w", "e", 1, [1], [], False)  # now the engine reports: it holds 1
    ix.now_ms = 500.0
    assert ix.match("w", [1, 2]) == 2  # 2 sent 0.5 s ago: prefill may be running
    ix.now_ms = 1500.0
    assert ix.match("w", [1, 2]) == 1  # never reported: not there


def test_reported_blocks_are_bounded() -> None:
    ix = PrefixIndex(reported_per_worker=3)
    ix.apply("w", "e", 1, [1, 2, 3, 4, 5], [], False)
    assert [ix.match("w", [h]) for h in (1, 2, 3, 4, 5)] == [0, 0, 1, 1, 1]


def test_words_hasher_matches_the_sim_engine() -> None:
    h = PromptHasher("words", BLOCK, vocab_size=1000)
    text = " ".join(f"w{i}" for i in range(40))
    req = Request(request_id="r", prompt=text)
    assert h.blocks(req) == chain_hashes(word_token_ids(text, 1000), BLOCK)
    assert len(h.blocks(req)) == 2
    ids = list(range(40))
    assert h.blocks(Request(request_id="r", prompt_token_ids=ids)) == chain_hashes(ids, BLOCK)


# -- on a real nats-server ------------------------------------------------------------
def _prefix(tag: str, words: int = 4 * BLOCK) -> str:
    return " ".join(f"{tag}{i}" for i in range(words))


async def _warm(engine: SimEngine, text: str) -> None:
    """Run a prompt on the engine itself: its cache holds the prefix, and no
    orchestrator ever sent it anywhere."""
    async for _ in engine.generate(EngineRequest(request_id=f"warm-{text[:8]}", prompt=text,
                                                 max_tokens=1, temperature=0.0)):
        pass


async def test_requests_follow_the_cache_the_engines_report(nats_url: str) -> None:
    s = isolated_settings(
        nats_url, sim={"zero_cost": True, "prefix_block_tokens": BLOCK},
        worker={"kv_events_ms": 10.0},
        orchestrator={"router": "prefix_aware", "prefix_tokenizer": "words",
                      "prefix_block_tokens": BLOCK, "policy": "fifo"})
    prefixes = {"w0": [_prefix("alpha"), _prefix("gamma")],
                "w1": [_prefix("beta"), _prefix("delta")]}
    async with stack(s, workers=2, orchestrator=False) as run:
        engines = {w.worker_id: w.engine for w in run.workers}
        assert all(isinstance(e, SimEngine) for e in engines.values())
        # w0 warms before the orchestrator starts: it meets w0 mid-life and
        # learns its blocks from a snapshot; w1 warms after: from its events.
        for text in prefixes["w0"]:
            await _warm(engines["w0"], text)  # type: ignore[arg-type]
        pump0 = run.workers[0].kv_pump
        assert pump0 is not None
        await until(lambda: pump0.published >= 1, 5, "w0's events published")
        orch = Orchestrator(s)
        run.orchestrator = orch
        await _start(orch, run)
        await until(lambda: orch.registry.knows("w0") and orch.registry.knows("w1"), 10)
        for text in prefixes["w1"]:
            await _warm(engines["w1"], text)  # type: ignore[arg-type]
        want = {text: wid for wid, texts in prefixes.items() for text in texts}
        blocks = {t: orch._hasher.blocks(Request(request_id="x", prompt=t))  # type: ignore[union-attr]
                  for t in want}
        ix = orch.core.state.prefix
        # w1's blocks arrive as events; w0 meets the orchestrator with seq > 1:
        # its first event after warming (or the heartbeat-driven next change)
        # makes the orchestrator ask for a snapshot.
        await _warm(engines["w0"], _prefix("epsilon"))  # type: ignore[arg-type]
        await until(lambda: all(ix.match(w, blocks[t]) == 4 for t, w in want.items()),
                    10, "both workers' blocks in the index")
        assert orch._kv is not None and orch._kv.snapshots >= 1

        client = Client(await nats.connect(nats_url), s)
        try:
            for i, (text, wid) in enumerate(sorted(want.items())):
                handle = await client.submit(Request(
                    request_id=f"kv{i}", prompt=text + " tail words here", max_tokens=2))
                final = await handle.result(timeout=30)
                assert final.workers == [wid], (text[:10], final.workers)
                assert final.usage.cached_prompt_tokens >= 4 * BLOCK
        finally:
            await client.close()


async def test_worker_answers_snapshots_and_splits_nothing_it_holds(nats_url: str) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True, "prefix_block_tokens": BLOCK},
                          worker={"kv_events_ms": 10.0})
    seen: list[bytes] = []

    async def on_event(msg: Msg) -> None:
        seen.append(msg.data)

    nc = await nats.connect(nats_url)
    sub = await nc.subscribe(s.subjects.kv_events_all, cb=on_event)
    try:
        async with stack(s, workers=1, orchestrator=False) as run:
            eng = run.workers[0].engine
            assert isinstance(eng, SimEngine)
            await _warm(eng, _prefix("zeta"))
            await until(lambda: len(seen) >= 1, 5, "an event")
            ev = kv_events_decoder.decode(seen[0])
            assert ev.worker_id == "w0" and ev.seq == 1 and ev.block_tokens == BLOCK
            assert len(ev.stored) == 4 and not ev.cleared
            reply = await nc.request(s.subjects.kv_snapshot("w0"), b"", timeout=5)
            snap = kv_events_decoder.decode(reply.data)
            assert snap.cleared and snap.epoch == ev.epoch and snap.seq >= ev.seq
            assert set(ev.stored) <= set(snap.stored)
    finally:
        await sub.unsubscribe()
        await nc.close()


def test_sim_settings_report_by_default() -> None:
    assert SimSettings().kv_events



class _Cache:
    """A KvEventSource whose changes a test makes by hand."""

    block_tokens = 32

    def __init__(self) -> None:
        self.pending: list[int] = []

    def kv_events(self) -> KvDelta | None:
        stored, self.pending = self.pending, []
        return KvDelta(stored, []) if stored else None

    def kv_blocks(self) -> list[int]:
        return []


async def test_an_idle_pump_stops_ticking_and_wakes_on_work_or_within_a_second(
        nats_url: str) -> None:
    """Nothing changes: after QUIET_TICKS the pump stops looking 50 times a second (an
    idle worker's CPU). Work pokes it back; a change nobody poked for (an engine other
    clients feed) still goes out within IDLE_CHECK_S."""
    s = isolated_settings(nats_url)
    nc = await nats.connect(nats_url)
    got: list[KvEvents] = []

    async def on(msg: Msg) -> None:
        got.append(kv_events_decoder.decode(msg.data))

    await nc.subscribe(s.subjects.kv_events("w-idle"), cb=on)
    cache = _Cache()
    pump = KvEventPump(nc, s.subjects, "w-idle", cache, 20)
    stop = asyncio.Event()
    task = asyncio.create_task(pump.run(stop))
    try:
        await until(lambda: pump.ticks >= QUIET_TICKS + 1, 5, "the pump going quiet")
        idle_at = pump.ticks
        await asyncio.sleep(0.3)  # 15 ticks' time: an idle pump looks at most once
        assert pump.ticks - idle_at <= 1
        cache.pending = [7]
        pump.poke()
        await until(lambda: [e.stored for e in got] == [[7]], 2, "the poked change")
        await until(lambda: pump.ticks >= idle_at + QUIET_TICKS, 5, "quiet again")
        t0 = asyncio.get_running_loop().time()
        cache.pending = [8]  # no poke
        await until(lambda: [8] in [e.stored for e in got], 3, "the unpoked change")
        assert asyncio.get_running_loop().time() - t0 <= IDLE_CHECK_S + 0.5
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await nc.close()
