"""Slow is not dead: processes paused (SIGSTOP) past every timeout, then resumed.

Each test runs the services as OS processes through the CLI (as an operator
does) on a real nats-server, pauses one of them with SIGSTOP for longer than
the timeout that judges it, resumes it with SIGCONT, and checks that every
request published around the pause still gets exactly one terminal. The
routers here send work to a worker's own subject (`least_loaded`), the case a
consumer deleted under a live worker strands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from tests.chaos.procs import Fleet, NatsServer, Proc, kill_survivors
from tests.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@contextlib.contextmanager
def paused(proc: Proc) -> Iterator[None]:
    """SIGSTOP `proc` for the body; SIGCONT whatever happens."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


@dataclass
class Book:
    """Every terminal and every work item seen live, by request id."""

    terminals: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    dispatchers: dict[str, set[str]] = field(default_factory=dict)
    # (seen at, orch, rid, the item's dispatched_ms: when the orchestrator decided it)
    dispatches: list[tuple[float, str, str, float]] = field(default_factory=list)
    # rid -> seq -> every content seen live for it, and the worker that wrote it
    chunks: dict[str, dict[int, set[tuple[tuple[int, ...], str]]]] = field(default_factory=dict)

    async def on_out(self, msg: Msg) -> None:
        c = json.loads(msg.data)
        by_seq = self.chunks.setdefault(c["request_id"], {})
        by_seq.setdefault(c["seq"], set()).add((tuple(c["token_ids"]), c["worker_id"]))

    async def on_done(self, msg: Msg) -> None:
        rid = msg.subject.rsplit(".", 1)[-1]
        self.terminals.setdefault(rid, []).append(json.loads(msg.data))

    async def on_work(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            for it in json.loads(msg.data).get("items") or []:
                rid, orch = it["request"]["request_id"], str(it.get("orchestrator_id"))
                self.dispatchers.setdefault(rid, set()).add(orch)
                self.dispatches.append((time.monotonic(), orch, rid,
                                        float(it.get("dispatched_ms") or 0.0)))

    def done(self, rids: list[str]) -> list[str]:
        return [r for r in rids if r in self.terminals]


@dataclass
class Stack:
    server: NatsServer
    fleet: Fleet
    nc: NATS
    book: Book
    n: int = 0

    async def publish(self, count: int, max_tokens: int = 8, every_s: float = 0.0) -> list[str]:
        js = self.nc.jetstream()
        rids = []
        for _ in range(count):
            self.n += 1
            rid = f"p{self.n}"
            body = {"request_id": rid, "prompt": "hello world " * 4, "max_tokens": max_tokens}
            await js.publish("llm.req.normal.standard", json.dumps(body).encode(),
                             headers={"Nats-Msg-Id": rid})
            rids.append(rid)
            if every_s:
                await asyncio.sleep(every_s)  # pacing of the load, not a wait for an event
        return rids

    async def leader(self) -> tuple[str, Proc]:
        """The leading orchestrator's id (the first to dispatch) and its process."""
        await until(lambda: self.book.dispatchers, 10, "a dispatch")
        leader = next(iter(next(iter(self.book.dispatchers.values()))))
        return leader, next(p for p in self.fleet.orchestrators
                            if leader in p.log.read_text(errors="replace"))

    async def all_answered(self, rids: list[str], timeout: float, what: str) -> None:
        await answered_once(self.book, rids, timeout, what, self.fleet.dir)


async def answered_once(book: Book, rids: list[str], timeout: float, what: str,
                        logs: Path) -> None:
    """Every request ends with a terminal, and never with two different ones."""
    try:
        await until(lambda: len(book.done(rids)) == len(rids), timeout, what)
    except (TimeoutError, AssertionError) as exc:
        missing = sorted(set(rids) - set(book.done(rids)))
        raise AssertionError(f"{what}: {len(missing)} of {len(rids)} without a terminal "
                             f"{missing[:10]} (logs in {logs})") from exc
    twice = {r: len(book.terminals[r]) for r in rids
             if len({json.dumps(t, sort_keys=True) for t in book.terminals[r]}) > 1}
    assert not twice, f"{what}: two different terminals for {twice}"


@contextlib.asynccontextmanager
async def processes(prefix: str, book: Book, orchestrators: int, worker_models: list[str],
                    capacity: int, **env: str
                    ) -> AsyncIterator[tuple[NatsServer, Fleet, NATS]]:
    """nats-server, orchestrator and worker processes (a worker per model given; "" =
    the default model), `book` following terminals, work and chunks; stopped after."""
    run_dir = Path(tempfile.mkdtemp(prefix=prefix))
    server = NatsServer(run_dir)
    await server.start()
    service_env = {k: v for k, v in os.environ.items() if not k.startswith("CPLANE")}
    service_env.update({"PYTHONUNBUFFERED": "1", "CPLANE_LOG_LEVEL": "INFO", **env})
    fleet = Fleet(run_dir, server.url, service_env, capacity=capacity)
    nc = await nats.connect(server.url)
    beats: set[str] = set()

    async def on_hb(msg: Msg) -> None:
        beats.add(msg.subject)

    try:
        await nc.subscribe("llm.done.>", cb=book.on_done)
        await nc.subscribe("llm.work.>", cb=book.on_work)
        await nc.subscribe("llm.out.>", cb=book.on_out)
        hb = await nc.subscribe("llm.hb.*", cb=on_hb)
        await nc.flush()
        for _ in range(orchestrators):
            fleet.start_orchestrator()
        for model in worker_models:
            if model:
                fleet.start_worker(model=model)
            else:
                fleet.start_worker()
        await until(lambda: len(beats) >= len(worker_models), 60, "workers heartbeat")
        await hb.unsubscribe()
        yield server, fleet, nc
    finally:
        await nc.close()
        await fleet.stop_all()
        await server.proc.terminate(10.0)
        kill_survivors()


@contextlib.asynccontextmanager
async def stack(orchestrators: int, workers: int, router: str = "least_loaded",
                **env: str) -> AsyncIterator[Stack]:
    book = Book()
    async with processes("cplane-pause-", book, orchestrators, [""] * workers, 4,
                         CPLANE__ORCHESTRATOR__ROUTER=router, **env) as (server, fleet, nc):
        st = Stack(server, fleet, nc, book)
        warm = await st.publish(4)
        await st.all_answered(warm, 60, "warm-up")
        yield st


async def test_a_worker_paused_past_its_timeout_keeps_serving() -> None:
    """Paused 6 s (worker_timeout_s 3.5, ack_wait_s 5): the leader takes it for dead and
    moves its work, but it comes back. Its consumer must not be deleted under it (or
    it re-creates it): work routed to it afterwards is served, none is stranded."""
    async with stack(1, 2) as st:
        w1 = st.fleet.workers["w1"]
        with paused(w1):
            during = await st.publish(6, every_s=0.5)
            await asyncio.sleep(3.0)  # the fault: paused 6 s in all
        after = await st.publish(40, every_s=0.5)  # past the rescue's 12 s wait
        await st.all_answered(during + after, 60, "requests around a worker's pause")


async def stored_chunks(nc: NATS, rid: str) -> list[dict[str, object]]:
    """Every chunk of `rid` LLM_OUT holds, in stream order, repeats kept."""
    js = nc.jetstream()
    out: list[dict[str, object]] = []
    psub = await js.pull_subscribe(f"llm.s.out.*.{rid}", stream="LLM_OUT")
    try:
        while True:
            try:
                msgs = await psub.fetch(256, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                return out
            for m in msgs:
                out.append(json.loads(m.data))
                await m.ack()
    finally:
        await psub.unsubscribe()


async def test_a_worker_paused_mid_generation_and_its_successor_never_both_write() -> None:
    """A worker paused 8 s mid-generation (ack_wait_s 5, its TCP connection up): its
    item is redelivered and another worker continues after the last stored chunk.
    When the first resumes it must stop, not write on: one content per seq, stored
    and live, and the Final's text is what was stored."""
    async with stack(1, 2, router="pool") as st:
        rid = (await st.publish(1, max_tokens=1500))[0]
        await until(lambda: len(st.book.chunks.get(rid, {})) >= 5, 30, "chunks streaming")
        writer = next(iter(st.book.chunks[rid][0]))[1]
        with paused(st.fleet.workers[writer]):
            await until(lambda: any(w != writer for seq in st.book.chunks[rid].values()
                                    for _, w in seq), 30, "the other worker continues")
            await asyncio.sleep(3.0)  # the fault: paused on past the successor's start
        await st.all_answered([rid], 90, "the long request")
        live_twice = {q: c for q, c in st.book.chunks[rid].items() if len(c) > 1}
        assert not live_twice, (f"live readers saw two contents for {len(live_twice)} seqs, "
                                f"from {sorted(live_twice)[:10]}")
        stored = await stored_chunks(st.nc, rid)
        contents: dict[int, set[str]] = {}
        for c in stored:
            contents.setdefault(int(str(c["seq"])), set()).add(json.dumps(c["token_ids"]))
        twice = sorted(q for q, v in contents.items() if len(v) > 1)
        assert not twice, f"LLM_OUT holds two contents for {len(twice)} seqs: {twice[:10]}"
        first: dict[int, dict[str, object]] = {}
        for c in stored:
            first.setdefault(int(str(c["seq"])), c)
        final = st.book.terminals[rid][0]
        text = "".join(str(first[q]["text"]) for q in sorted(first))
        assert sorted(first) == list(range(len(first))), "a gap in the stored chunks"
        assert final.get("text") == text, "the Final's text is not what was streamed"
        assert final.get("chunks") == len(first)


async def test_a_new_leader_counts_the_old_leaders_work_until_it_drained() -> None:
    """The leader killed -9 while the fleet is full of long generations (about 25 s
    each): the standby takes over and gets the requests the old one held, after
    their ack_wait (10 s). The generations the old leader dispatched still run
    then; counting them only for a fixed window let the new leader dispatch a
    second fleet's worth on top."""
    async with stack(2, 2, router="pool") as st:
        leader, orch = await st.leader()
        rids = await st.publish(30, max_tokens=4000)
        await until(lambda: sum(r in st.book.dispatchers for r in rids) >= 8, 20,
                    "the fleet full")
        orch.kill9()
        # capacity 2 x 4, dispatched up to 1.25x: 10; + 2 that a worker's heartbeat
        # cannot show (queued in LLM_WORK when the leader died)
        bound = 12
        killed = time.monotonic()

        def by_new_leader() -> int:
            return sum(1 for r in rids if r in st.book.dispatchers
                       and st.book.dispatchers[r] - {leader})

        # Sample the outstanding count until the new leader has dispatched for a while
        # (its first requests come back after their ack_wait), bounded in time.
        while time.monotonic() - killed < 90 and (
                time.monotonic() - killed < 25 or not by_new_leader()):
            out = sum(1 for r in rids if r in st.book.dispatchers and r not in st.book.terminals)
            by = Counter(o for r in rids if r in st.book.dispatchers and r not in st.book.terminals
                         for o in st.book.dispatchers[r])
            assert out <= bound, (f"{out} requests dispatched and unfinished after a takeover "
                                  f"(by {dict(by)}; old leader {leader})")
            await asyncio.sleep(0.2)  # sampling the outstanding count (bounded: 90 s)
        assert by_new_leader(), "the new leader dispatched nothing"


async def test_an_orchestrator_paused_past_the_worker_timeout_expires_nobody() -> None:
    """The only orchestrator paused 5 s: every worker's heartbeats wait unread. On
    resume it must not take the whole fleet for dead (rescue every queue, delete
    every consumer): requests after the pause are all served."""
    async with stack(1, 2) as st:
        orch = st.fleet.orchestrators[0]
        with paused(orch):
            during = await st.publish(4)
            await asyncio.sleep(5.0)  # the fault: the orchestrator stays paused 5 s
        after = await st.publish(30, every_s=0.5)
        await st.all_answered(during + after, 60, "requests around the orchestrator's pause")


async def test_a_leader_paused_past_its_lease_dispatches_nothing_it_buffered() -> None:
    """Two replicas; the leader paused 6 s (lease_ttl_s 3): the standby takes over.
    The old leader resumes with requests pulled before the pause: it must hand
    them back rather than dispatch them, so no request is dispatched by both."""
    async with stack(2, 2, router="pool") as st:
        leader, orch = await st.leader()
        # Work the fleet cannot take at once (capacity 2 x 4): the leader holds the rest.
        first = await st.publish(40, max_tokens=40)
        with paused(orch):
            # Taken once SIGSTOP is sent, not before: the leader is busy dispatching
            # the burst, and a batch it decided between a timestamp taken before the
            # signal and the signal itself is not one decided after the pause (a CI
            # run flagged three such items, flushed at resume).
            paused_ms = time.time() * 1000
            await asyncio.sleep(6.0)  # the fault: the leader stays paused 6 s
        resumed = time.monotonic()
        after = await st.publish(10)
        await st.all_answered(first + after, 90, "requests around the leader's pause")
        # Decided after the pause: what the fence forbids. A dispatch decided before it
        # whose bytes were still in the client's buffer when SIGSTOP came goes out on
        # resume (docs/guarantees.md, "What is not covered": a pause between the fence
        # check and the socket write); it is told apart by the item's dispatched_ms.
        stale = [(round(t - resumed, 2), rid) for t, o, rid, at_ms in st.book.dispatches
                 if o == leader and t > resumed and at_ms >= paused_ms]
        assert not stale, f"the paused leader dispatched after resuming: {stale[:8]}"
