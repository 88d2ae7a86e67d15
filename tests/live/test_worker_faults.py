"""Worker faults on a real nats-server: kill -9, redelivery, duplicates, dead
letters, persisted cancels, model-keeping hand-backs, limits (engine health:
test_worker_health.py).

No orchestrator: work messages are published to LLM_WORK by hand, as the
orchestrator would. A "killed" worker has its own connection whose socket is
aborted (unsent bytes lost, nothing acked) before its tasks are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cplane.bus.provision import ensure_all, ensure_work_consumer
from cplane.schemas.codec import encode, output_decoder
from cplane.schemas.messages import (
    DeadLetter,
    ErrorCode,
    ErrorReply,
    Final,
    FinishReason,
    Priority,
    Request,
    Role,
    TokenChunk,
    WorkBatch,
    WorkItem,
)
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import ANY_TARGET, model_target
from cplane.workers.engines.sim import SimEngine
from cplane.workers.runtime import Worker
from tests.natsfix import isolated_settings
from tests.waiting import subscribed, until

ROLE = Role.UNIFIED
FAST = {"ack_wait_s": 2.0, "in_progress_every_s": 0.4, "drain_timeout_s": 0.1}


def item(rid: str, n: int, **req: object) -> WorkItem:
    r = Request(request_id=rid, prompt="tell me a story", max_tokens=n, **req)  # type: ignore[arg-type]
    return WorkItem(request=r, priority=Priority.NORMAL, slo_class="standard")


async def put(js: JetStreamContext, s: Settings, *items: WorkItem, target: str = ANY_TARGET
              ) -> int:
    ack = await js.publish(s.subjects.work(ROLE, target), encode(WorkBatch(items=list(items))))
    return ack.seq


async def queued(js: JetStreamContext, s: Settings) -> int:
    return (await js.stream_info(s.streams.work.name)).state.messages


async def work_empty(js: JetStreamContext, s: Settings) -> bool:
    return await queued(js, s) == 0


@dataclass
class Watch:
    """What a live subscriber sees of one request: its chunks and terminals."""

    chunks: list[TokenChunk] = field(default_factory=list)
    terminals: list[Final | ErrorReply] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(cls, nc: NATS, s: Settings, rid: str) -> Watch:
        w = cls()
        await nc.subscribe(s.subjects.outputs_of("i", rid), cb=w._on)
        await subscribed(nc)  # before any worker publishes
        return w

    async def _on(self, msg: Msg) -> None:
        out = output_decoder.decode(msg.data)
        if isinstance(out, TokenChunk):
            self.chunks.append(out)
            self.first.set()
        else:
            self.terminals.append(out)
            self.done.set()

    def tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    async def terminal(self, timeout: float = 20.0) -> Final | ErrorReply:
        await asyncio.wait_for(self.done.wait(), timeout)
        return self.terminals[0]

    def assert_consistent(self, final: Final) -> None:
        """One gap-free, duplicate-free sequence whose text is the Final's."""
        seqs = [c.seq for c in self.chunks]
        assert sorted(seqs) == list(range(len(seqs))), seqs
        by_seq = sorted(self.chunks, key=lambda c: c.seq)
        assert "".join(c.text for c in by_seq) == final.text
        assert sum(len(c.token_ids) for c in by_seq) == final.usage.completion_tokens
        assert final.chunks == len(seqs)


@dataclass
class Running:
    worker: Worker
    task: asyncio.Task[None]
    stop: asyncio.Event
    nc: NATS


@dataclass
class Fleet:
    """Workers on the test's loop, each with its own connection (so one can be killed)."""

    s: Settings
    running: list[Running] = field(default_factory=list)

    async def start(self, worker_id: str, engine: SimEngine | None = None,
                    **worker: object) -> Worker:
        ws = msgspec.structs.replace(self.s.worker, worker_id=worker_id, **worker)
        s = msgspec.structs.replace(self.s, worker=ws)
        eng = engine or SimEngine(s.sim, model=ws.model)
        await eng.start()
        nc = await nats.connect(s.nats.url, allow_reconnect=False)
        w = Worker(s, eng, nc=nc)
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(w.run(stop, ready))
        self.running.append(Running(w, task, stop, nc))
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({waiter, task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        assert ready.is_set()
        return w

    def _of(self, w: Worker) -> Running:
        return next(r for r in self.running if r.worker is w)

    async def drain(self, w: Worker) -> None:
        r = self._of(w)
        r.stop.set()
        await asyncio.wait_for(r.task, 20)

    async def kill(self, w: Worker) -> None:
        """kill -9: the socket dies first (with whatever was not sent), then the tasks."""
        r = self._of(w)
        r.nc._transport._io_writer.transport.abort()  # type: ignore[union-attr]
        await w.engine.shutdown()
        r.task.cancel()
        await asyncio.wait({r.task}, timeout=20)

    async def close(self) -> None:
        for r in self.running:
            r.stop.set()
        await asyncio.wait([r.task for r in self.running] or [asyncio.sleep(0)], timeout=20)
        for r in self.running:
            r.task.cancel()
            with contextlib.suppress(BaseException):
                await r.task
            await r.worker.engine.shutdown()
            with contextlib.suppress(Exception):
                await r.nc.close()


@contextlib.asynccontextmanager
async def fleet(nats_url: str, **sections: dict[str, object]) -> AsyncIterator[Fleet]:
    worker = {**FAST, **sections.pop("worker", {})}
    s = isolated_settings(nats_url, worker=worker, **sections)
    nc = await nats.connect(nats_url)
    await ensure_all(nc.jetstream(), s)  # streams and the claims bucket; no orchestrator
    await nc.close()
    f = Fleet(s)
    try:
        yield f
    finally:
        await f.close()


# -- migration ---------------------------------------------------------------------
async def test_killed_worker_request_continues_on_another(nats_url: str, nc: NATS) -> None:
    """kill -9 mid-generation at temperature 1 without seed: another worker continues
    after the chunks in LLM_OUT within ~ack_wait; one consistent stream."""
    async with fleet(nats_url, sim={"decode_a_ms": 8.0}) as f:
        js = nc.jetstream()
        victim = await f.start("victim")
        watch = await Watch.start(nc, f.s, "k1")
        await put(js, f.s, item("k1", 300, temperature=1.0))
        await until(lambda: watch.tokens() >= 30)
        await f.start("heir")
        t_kill = time.monotonic()
        await f.kill(victim)
        final = await watch.terminal(timeout=f.s.worker.ack_wait_s + 10)
        took = time.monotonic() - t_kill
        await until(lambda: work_empty(js, f.s))
        await nc.flush()
    assert isinstance(final, Final) and final.finish_reason is FinishReason.LENGTH
    assert final.usage.completion_tokens == 300
    assert final.workers == ["victim", "heir"]
    assert len(watch.terminals) == 1
    watch.assert_consistent(final)
    assert took < f.s.worker.ack_wait_s + 3 + 300 * 0.008 * 2


async def test_a_head_aged_out_of_llm_out_is_never_regenerated(nats_url: str,
                                                              nc: NATS) -> None:
    """A long generation outlives LLM_OUT's retention (max_age scaled down to 2 s):
    its worker dies after the first chunks aged out. The heir must not run it again
    from the start (repeated seqs with another continuation, a Final unlike the
    stream): it ends in ErrorReply worker_failed (retryable)."""
    async with fleet(nats_url, sim={"decode_a_ms": 8.0}, stream_out={"max_age_s": 2.0, "duplicate_window_s": 2.0}) as f:
        js = nc.jetstream()
        victim = await f.start("victim")
        watch = await Watch.start(nc, f.s, "h1")
        # Stamped as the orchestrator stamps its dispatches: when the heir comes in
        # after every chunk aged out (a slow box), nothing stored proves nothing.
        h1 = msgspec.structs.replace(item("h1", 1500), dispatched_ms=time.time() * 1000)
        await put(js, f.s, h1)
        await until(lambda: watch.tokens() >= 400)  # ~3 s in: seq 0 is older than 2 s
        await f.start("heir")
        await f.kill(victim)
        term = await watch.terminal(timeout=f.s.worker.ack_wait_s + 15)
    assert isinstance(term, ErrorReply), (
        f"ran again from the start: a Final by {getattr(term, 'workers', None)}")
    assert term.code is ErrorCode.WORKER_FAILED and term.retryable
    assert len(watch.terminals) == 1


async def test_a_tail_that_may_have_aged_out_is_not_continued(nats_url: str, nc: NATS) -> None:
    """The newest chunk read back is about LLM_OUT's max_age old (30 s here): later ones,
    if any, may have aged out, even while the run was read (the chaos run saw a read
    that got seqs 0-2 of 25 as the server took the rest). The heir does not continue
    after it: ErrorReply worker_failed (retryable). The same chunks streamed just now
    are continued."""
    async with fleet(nats_url, sim={"zero_cost": True},
                     stream_out={"max_age_s": 30.0, "duplicate_window_s": 2.0}) as f:
        js = nc.jetstream()
        for rid, age_s in (("old-tail", 29.0), ("young-tail", 0.0)):
            for seq in range(3):
                chunk = TokenChunk(request_id=rid, seq=seq, token_ids=[seq + 1], text=f" t{seq}",
                                   worker_id="gone", ts_ms=(time.time() - age_s) * 1000)
                await js.publish(f.s.subjects.out_store("i", rid), encode(chunk))
        watches = [await Watch.start(nc, f.s, rid) for rid in ("old-tail", "young-tail")]
        w = await f.start("w")
        for rid in ("old-tail", "young-tail"):
            await put(js, f.s, msgspec.structs.replace(item(rid, 5), redispatched=True))
        old, young = [await watch.terminal() for watch in watches]
        await until(lambda: work_empty(js, f.s))
    assert isinstance(old, ErrorReply) and old.code is ErrorCode.WORKER_FAILED and old.retryable
    assert "max_age" in old.message and watches[0].chunks == []
    assert isinstance(young, Final) and young.workers == ["gone", "w"]
    assert young.usage.completion_tokens == 5 and young.text.startswith(" t0 t1 t2")
    assert w.ctx is not None and w.ctx.counts["migrated"] == 1


async def test_live_worker_keeps_its_work_past_ack_wait(nats_url: str, nc: NATS) -> None:
    """in_progress() keeps a long generation (3x ack_wait) from being redelivered."""
    async with fleet(nats_url, worker={"ack_wait_s": 1.0, "in_progress_every_s": 0.3},
                     sim={"decode_a_ms": 10.0}) as f:
        js = nc.jetstream()
        w = await f.start("steady")
        watch = await Watch.start(nc, f.s, "long")
        await put(js, f.s, item("long", 300))
        final = await watch.terminal(timeout=20)
        await until(lambda: work_empty(js, f.s))
        info = await js.consumer_info(f.s.streams.work.name, f"work-{ROLE.value}-any")
    assert isinstance(final, Final) and final.workers == ["steady"]
    assert info.num_redelivered == 0
    assert w.ctx is not None and w.ctx.counts["migrated"] == w.ctx.counts["skipped"] == 0


async def test_redelivered_work_with_stored_final_is_not_run(nats_url: str, nc: NATS) -> None:
    async with fleet(nats_url, sim={"zero_cost": True}) as f:
        js = nc.jetstream()
        w = await f.start("w")
        watch = await Watch.start(nc, f.s, "once")
        await put(js, f.s, item("once", 5))
        first = await watch.terminal()
        # The orchestrator could not rule out an earlier dispatch: it flags the item.
        await put(js, f.s, msgspec.structs.replace(item("once", 5), redispatched=True))
        await until(lambda: work_empty(js, f.s))
        await nc.flush()  # whatever the worker published before its ack has reached us
        assert w.ctx is not None and w.ctx.counts["skipped"] == 1
    assert isinstance(first, Final) and len(watch.terminals) == 1
    assert len(watch.chunks) == first.chunks  # none from a second run


async def test_redelivery_count_triggers_the_check(nats_url: str, nc: NATS) -> None:
    """A Final stored by a worker whose ack was lost: the redelivery is not run."""
    async with fleet(nats_url, sim={"zero_cost": True}) as f:
        js = nc.jetstream()
        durable = await ensure_work_consumer(js, f.s, ROLE, ANY_TARGET)
        await put(js, f.s, item("lost-ack", 5))
        stored = Final(request_id="lost-ack", finish_reason=FinishReason.LENGTH, text=" x")
        await js.publish(f.s.subjects.done_store("i", "lost-ack"), encode(stored))
        psub = await js.pull_subscribe_bind(durable, stream=f.s.streams.work.name)
        (msg,) = await psub.fetch(1, timeout=5)
        await msg.nak()  # delivery 1 went nowhere: the worker gets delivery 2
        await psub.unsubscribe()
        watch = await Watch.start(nc, f.s, "lost-ack")
        w = await f.start("w")
        await until(lambda: work_empty(js, f.s))
        await nc.flush()
    assert w.ctx is not None and w.ctx.counts["skipped"] == 1 and w.ctx.counts["finals"] == 0
    assert watch.terminals == [] and watch.chunks == []


async def test_resume_that_reached_max_tokens_publishes_only_the_final(
    nats_url: str, nc: NATS
) -> None:
    """Every token was streamed before the worker died; only the Final was missing."""
    async with fleet(nats_url, sim={"zero_cost": True}) as f:
        js = nc.jetstream()
        for seq, ids, text in ((0, [1], " a"), (1, [2, 3], " b c")):
            chunk = TokenChunk(request_id="full", seq=seq, token_ids=ids, text=text,
                               worker_id="gone")
            await js.publish(f.s.subjects.out_store("i", "full"), encode(chunk))  # stored in LLM_OUT
        watch = await Watch.start(nc, f.s, "full")
        w = await f.start("w")
        await put(js, f.s, msgspec.structs.replace(item("full", 3), redispatched=True))
        final = await watch.terminal()
        await until(lambda: work_empty(js, f.s))
    assert isinstance(final, Final) and final.finish_reason is FinishReason.LENGTH
    assert (final.text, final.chunks, final.usage.completion_tokens) == (" a b c", 2, 3)
    assert final.workers == ["gone", "w"] and watch.chunks == []
    assert w.ctx is not None and w.ctx.counts["migrated"] == 1
    # The run took the request over behind a run fence, kept forever while it ran; once
    # its Final is stored, only a closing fence is left, which max_age takes away.
    fence = f.s.subjects.fence_store("i", "full")
    info = await js.stream_info(f.s.streams.out.name, subjects_filter=fence)
    assert info.state.subjects == {fence: 1}
    assert (await js.get_last_msg(f.s.streams.out.name, fence)).data == b"w closed"


async def test_duplicate_item_waits_for_the_running_original(nats_url: str, nc: NATS) -> None:
    async with fleet(nats_url, sim={"decode_a_ms": 8.0}) as f:
        js = nc.jetstream()
        w = await f.start("w")
        watch = await Watch.start(nc, f.s, "dup")
        await put(js, f.s, item("dup", 150))
        await watch.first.wait()
        await put(js, f.s, item("dup", 150))  # a second dispatch, in another message
        info = lambda: js.consumer_info(f.s.streams.work.name, f"work-{ROLE.value}-any")  # noqa: E731

        async def both_held() -> bool:
            return (await info()).num_ack_pending == 2
        await until(both_held)
        assert not watch.done.is_set()  # neither was acked before the original's outcome
        final = await watch.terminal()
        await until(lambda: work_empty(js, f.s))
        await nc.flush()
    assert isinstance(final, Final) and len(watch.terminals) == 1
    watch.assert_consistent(final)
    assert w.ctx is not None and w.ctx.counts["finals"] == 1


async def test_dead_letter_after_max_migrations(nats_url: str, nc: NATS) -> None:
    async with fleet(nats_url, worker={"max_migrations": 1}, sim={"zero_cost": True}) as f:
        js = nc.jetstream()
        durable = await ensure_work_consumer(js, f.s, ROLE, ANY_TARGET)
        seq = await put(js, f.s, item("doomed", 5))
        psub = await js.pull_subscribe_bind(durable, stream=f.s.streams.work.name)
        for _ in range(2):  # two workers died under it
            (msg,) = await psub.fetch(1, timeout=5)
            await msg.nak()
        await psub.unsubscribe()
        watch = await Watch.start(nc, f.s, "doomed")
        w = await f.start("w")
        err = await watch.terminal()
        await until(lambda: work_empty(js, f.s))
        stream = f.s.streams.work.name
        raw = await js.get_last_msg(f.s.streams.dlq.name, f.s.subjects.dead_letter(stream, seq))
    assert isinstance(err, ErrorReply) and err.code == "worker_failed" and err.retryable
    letter = msgspec.json.decode(raw.data or b"", type=DeadLetter)
    assert (letter.stream, letter.seq, letter.request_id, letter.deliveries) == (
        stream, seq, "doomed", 3)
    assert msgspec.json.decode(letter.data, type=WorkBatch).items[0].request.request_id == "doomed"
    assert watch.chunks == [] and w.ctx is not None and w.ctx.counts["finals"] == 0


# -- cancels, hand-back, limits ----------------------------------------------------
async def test_cancel_sent_before_the_worker_started_is_honoured(nats_url: str, nc: NATS
                                                                 ) -> None:
    async with fleet(nats_url, sim={"zero_cost": True}) as f:
        js = nc.jetstream()
        await js.publish(f.s.subjects.cancel("early"), b"")  # stored in LLM_CANCEL
        w = await f.start("late")
        watch = await Watch.start(nc, f.s, "early")
        await put(js, f.s, item("early", 50))
        final = await watch.terminal()
        await until(lambda: work_empty(js, f.s))
    assert isinstance(final, Final) and final.finish_reason is FinishReason.CANCELLED
    assert final.usage.completion_tokens == 0 and watch.chunks == []
    assert w.ctx is not None and w.ctx.counts["cancelled"] == 1


async def test_hand_back_keeps_the_model(nats_url: str, nc: NATS) -> None:
    """Draining a worker of a mixed-model fleet: its running item and the one queued
    on its own subject end on a worker of the same model, never on the other one."""
    async with fleet(nats_url, sim={"decode_a_ms": 8.0}) as f:
        js = nc.jetstream()
        running = await Watch.start(nc, f.s, "run-a")
        waiting = await Watch.start(nc, f.s, "wait-a")
        await put(js, f.s, item("run-a", 200, model="alpha"), target="a1")
        await put(js, f.s, item("wait-a", 5, model="alpha"), target="a1")
        a1 = await f.start("a1", model="alpha", capacity=1)
        b1 = await f.start("b1", model="beta")
        await until(lambda: running.tokens() >= 20)
        assert not waiting.first.is_set()  # a1 is full: the second waits on a1's subject
        await f.start("a2", model="alpha")
        await f.drain(a1)
        fr, fw = await running.terminal(), await waiting.terminal()
        await until(lambda: work_empty(js, f.s))
    assert isinstance(fr, Final) and fr.workers == ["a1", "a2"] and fr.model == "alpha"
    assert isinstance(fw, Final) and fw.workers == ["a2"] and fw.model == "alpha"
    running.assert_consistent(fr)
    assert fr.usage.completion_tokens == 200
    assert b1.ctx is not None and b1.ctx.counts["errors"] == b1.ctx.counts["finals"] == 0
    assert model_target("alpha") != model_target("beta")


async def test_limits_are_checked(nats_url: str, nc: NATS) -> None:
    async with fleet(nats_url, worker={"max_prompt_tokens": 4}, sim={"zero_cost": True}) as f:
        js = nc.jetstream()
        await f.start("w")
        ids = await Watch.start(nc, f.s, "ids")
        text = await Watch.start(nc, f.s, "text")
        big = await Watch.start(nc, f.s, "big")
        ok = await Watch.start(nc, f.s, "ok")
        await put(js, f.s,
                  msgspec.structs.replace(item("ids", 3), request=Request(
                      request_id="ids", prompt_token_ids=[1] * 10, max_tokens=3)),
                  msgspec.structs.replace(item("text", 3), request=Request(
                      request_id="text", prompt="one two three four five", max_tokens=3)),
                  item("big", f.s.limits.max_tokens + 1),
                  msgspec.structs.replace(item("ok", 3), request=Request(
                      request_id="ok", prompt="one two", max_tokens=3)))
        e_ids, e_text, e_big, fine = [await w.terminal() for w in (ids, text, big, ok)]
        await until(lambda: work_empty(js, f.s))
    assert isinstance(e_ids, ErrorReply) and e_ids.code == "prompt_too_long"
    assert isinstance(e_text, ErrorReply) and e_text.code == "prompt_too_long"
    assert isinstance(e_big, ErrorReply) and e_big.code == "too_large"
    assert isinstance(fine, Final) and fine.usage.completion_tokens == 3


async def test_a_run_ended_while_its_claim_is_confirmed_keeps_no_claim(
        nats_url: str, nc: NATS) -> None:
    """After a pause the fence check confirms each run's claim. A run that ends during
    that await (a lost claim cancels it, and its end releases nothing) must not
    leave the claim confirm() just wrote: the renewal loop would keep it while the
    worker lives, and every other worker would wait on the request (the
    partitioned chaos run lost a request so)."""
    from types import SimpleNamespace
    from typing import cast

    from nats.js.errors import KeyNotFoundError

    from cplane.bus.claims import Claims, claim_key
    from cplane.bus.provision import claims_bucket
    from cplane.workers.context import ServeContext
    from cplane.workers.migrate import taken_over
    from cplane.workers.runs import RunLedger

    s = isolated_settings(nats_url)
    js = nc.jetstream()
    await ensure_all(js, s)
    claims = Claims(js, s, "w1")
    runs = RunLedger()
    run = runs.add(item("ends", 4))
    runs.begin(run)
    run.running = run.item
    run.task = asyncio.create_task(asyncio.sleep(3600))  # the run's task, still held
    confirm = claims.confirm

    async def confirm_as_the_run_ends(request_id: str) -> bool:
        held = await confirm(request_id)  # the real write of the claim
        runs.finish(run, stored=False)  # the run's end, inside the await
        runs.transition(run, None)
        return held

    claims.confirm = confirm_as_the_run_ends  # type: ignore[method-assign]
    ctx = cast(ServeContext, SimpleNamespace(runs=runs, claims=claims, js=js, settings=s,
                                             worker_id="w1"))
    try:
        assert await taken_over(ctx) == []
        assert "ends" not in claims._held  # nothing left to renew
        kv = await js.key_value(claims_bucket(s))
        with pytest.raises(KeyNotFoundError):
            await kv.get(claim_key("ends"))
    finally:
        run.task.cancel()
