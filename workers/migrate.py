"""Work that may have run before: redelivery checks, migration, dead letters, moves.

JetStream delivers a work message again when its worker died (or went
silent past ack_wait), and the orchestrator flags items it may have sent
twice (`WorkItem.redispatched`). Before such an item runs, `prepare` looks
for its stored terminal (LLM_DONE: nothing to do) and for the chunks already
streamed (LLM_OUT: continue after them), so the client sees one gap-free,
duplicate-free sequence whose Final.text is what was streamed.

A message delivered more often than 1 + max_migrations is taken out:
every item gets ErrorReply `worker_failed` (unless a terminal is already
stored), the evidence a DeadLetter on `llm.dlq.<stream>.<seq>`, and only
then is the message acked.

After a reconnect, `taken_over` claims every run that crossed the outage and
names those another worker continued meanwhile (the runtime stops them).
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from nats.aio.msg import Msg

from cplane.bus.replay import last_chunk, stored_terminal, streamed_chunks
from cplane.bus.requeue import requeue
from cplane.schemas.codec import encode
from cplane.schemas.messages import DeadLetter, ErrorCode, TokenChunk, WorkItem
from cplane.workers.context import Outcome, ServeContext
from cplane.workers.run_fence import write_run_fence
from cplane.workers.runs import Letter, Run, RunState

log = logging.getLogger("cplane.worker")
_CLAIM_POLL_S = 0.5


async def prepare(ctx: ServeContext, run: Run) -> WorkItem | None:
    """The item to run after an earlier run: None when its terminal is stored,
    else the item extended with the chunks captured in LLM_OUT from its
    `next_seq` on (tokens, text, seq and the workers that streamed them). The
    run holds its request's claim from here on."""
    item = run.item
    req = item.request
    rid = req.request_id
    waited = 0
    while True:
        if await stored_terminal(ctx.js, ctx.settings, req.group, rid) is not None:
            ctx.counts["skipped"] += 1
            log.info("%s already has its terminal: not run again", rid)
            return None
        chunks = await streamed_chunks(ctx.js, ctx.settings, req.group, rid,
                                       from_seq=item.next_seq)
        last = chunks[-1] if chunks else None
        streamer = last.worker_id if last is not None else ""
        # The worker that streamed last may still run it: after a broker killed -9
        # forgot the delivery it reconnects and goes on (re-sending what the
        # broker lost, which readers may have seen). Only once it is gone, or
        # its claim lapsed, does this worker continue after it.
        alive = last is not None and streamer != ctx.worker_id and ctx.still_streaming(last)
        if not alive and (ctx.claims is None or await ctx.claims.acquire(rid)):
            run.claimed = ctx.claims is not None
            break
        if waited % 10 == 0:
            log.info("%s runs on another worker (%s); waiting for its outcome", rid,
                     streamer or "claimed")
        waited += 1
        await asyncio.sleep(_CLAIM_POLL_S)
    resume_at = chunks[-1].seq + 1 if chunks else item.next_seq
    if not chunks and _may_have_aged_out(ctx, item):
        raise HeadLost(f"{rid}: no chunk from seq {resume_at} in "
                       f"{ctx.settings.streams.out.name}, but an earlier run may have "
                       f"streamed them more than its max_age "
                       f"({ctx.settings.streams.out.max_age_s:g} s) ago: running it from "
                       f"seq {resume_at} again could contradict what readers have")
    if await _hole_at(ctx, item, resume_at):
        raise HeadLost(f"{rid}: chunk {resume_at} is missing from "
                       f"{ctx.settings.streams.out.name} while later ones are stored (aged "
                       f"out after {ctx.settings.streams.out.max_age_s:g} s, or lost with a "
                       "broker): it cannot continue without contradicting them")
    fenced = await _fence(ctx, item, chunks)
    if fenced is None:
        return None
    item, chunks = fenced
    return _continued(ctx, item, chunks) if chunks else item


def _continued(ctx: ServeContext, item: WorkItem, chunks: list[TokenChunk]) -> WorkItem:
    """`item` extended with the chunks an earlier run stored, to continue after them."""
    rid = item.request.request_id
    if _tail_may_have_aged_out(ctx, chunks[-1]):
        raise HeadLost(f"{rid}: the last chunk read back (seq {chunks[-1].seq}) was streamed "
                       f"about {ctx.settings.streams.out.max_age_s:g} s ago, LLM_OUT's "
                       "max_age: later ones may have aged out, even while it was read, and "
                       "continuing after it could contradict what readers have")
    ctx.counts["migrated"] += 1
    served = list(item.served_by)
    for c in chunks:
        if c.worker_id and (not served or served[-1] != c.worker_id):
            served.append(c.worker_id)
    ttft = item.ttft_ms
    t0 = item.enqueued_ms or item.dispatched_ms
    if ttft is None and item.next_seq == 0 and t0:
        ttft = max(0.0, chunks[0].ts_ms - t0)
    log.info("%s continues after seq %d (%d chunks read back)", rid, chunks[-1].seq,
             len(chunks))
    return msgspec.structs.replace(
        item,
        resume_token_ids=[*item.resume_token_ids, *(t for c in chunks for t in c.token_ids)],
        resume_text=item.resume_text + "".join(c.text for c in chunks),
        next_seq=chunks[-1].seq + 1,
        served_by=served,
        ttft_ms=ttft,
    )


class HeadLost(Exception):
    """A run to continue with a hole in its stored chunks (the head aged out of
    LLM_OUT, or one was lost with a broker) while later ones remain, or with none
    stored where an earlier run may have streamed them all longer ago than
    LLM_OUT keeps them, or whose newest chunk read back is about max_age old (a
    tail may have aged out unseen): continuing after the hole would write seqs
    readers have with other contents, and running it again from the start would
    too. It ends in ErrorReply `worker_failed` (retryable) instead."""


async def _fence(ctx: ServeContext, item: WorkItem, chunks: list[TokenChunk]
                 ) -> tuple[WorkItem, list[TokenChunk]] | None:
    """A run fence (run_fence.py): from it on the store refuses whatever an earlier run
    still sends (bytes a healed partition delivers late), so what was stored before
    it is all that run will ever have stored: the item under its fence and those
    chunks, read again (`chunks`, read before, if none are left); None when the
    terminal is stored. Without run fences (a replicated LLM_OUT): as they are."""
    if not ctx.run_fences:
        return item, chunks
    req = item.request
    seq = await write_run_fence(ctx.js, ctx.subjects, item, ctx.worker_id,
                                ctx.settings.worker.publish_timeout_s)
    item = msgspec.structs.replace(item, fence_seq=seq)
    if await stored_terminal(ctx.js, ctx.settings, req.group, req.request_id) is not None:
        ctx.counts["skipped"] += 1
        log.info("%s has its terminal: not run again", req.request_id)
        return None
    again = await streamed_chunks(ctx.js, ctx.settings, req.group, req.request_id,
                                  from_seq=item.next_seq)
    return item, again or chunks


def _may_have_aged_out(ctx: ServeContext, item: WorkItem) -> bool:
    """An earlier run of `item` could have started longer ago than LLM_OUT keeps chunks
    (the request was stored then): what it streamed may be gone without a trace, so
    finding nothing stored proves nothing. Within max_age, nothing stored means
    nothing was streamed (a broker that lost chunks loses a tail, which the run that
    streamed them re-sends: bus/connect.py drop_pending, ServeContext._resend_lost)."""
    # The item's own dispatch (a rescued or redelivered work message is the same
    # item); a re-dispatch by another leader may follow an earlier dispatch made
    # any time after the request was stored.
    since = (item.enqueued_ms if item.redispatched else 0.0) or item.dispatched_ms
    return _past_max_age(ctx, since)


def _tail_may_have_aged_out(ctx: ServeContext, last: TokenChunk) -> bool:
    """`last`, the newest chunk of the run read back, is about as old as LLM_OUT's
    max_age: a later chunk, if one was streamed, may have aged out before or while
    the run was read (the server takes expired messages in batches, so a read can
    see the head and miss the rest: seen in the chaos run). Asked after the read:
    a later chunk was stored after `last`, so it expires after `last` would, and
    while `last` is younger than max_age no later one had expired when it was
    looked up. The margin (a quarter of max_age, at most 2 s) is for the clocks
    (`ts_ms` is the streaming worker's); a chunk without a time (0) is not judged."""
    return _past_max_age(ctx, last.ts_ms, margin_s=min(2.0, ctx.settings.streams.out.max_age_s / 4))


def _past_max_age(ctx: ServeContext, at_ms: float, margin_s: float = 0.0) -> bool:
    """`at_ms` (epoch ms) is more than LLM_OUT's max_age, less `margin_s`, ago. False
    when LLM_OUT keeps chunks for ever or the time is unknown (0)."""
    max_age_s = ctx.settings.streams.out.max_age_s
    return bool(max_age_s and at_ms) and time.time() * 1000 - at_ms > (max_age_s - margin_s) * 1000


async def _hole_at(ctx: ServeContext, item: WorkItem, seq: int) -> bool:
    """Chunks after `seq` are stored, the one at it is not."""
    req = item.request
    last = await last_chunk(ctx.js, ctx.settings, req.group, req.request_id)
    return last is not None and last.seq > seq


async def taken_over(ctx: ServeContext) -> list[Run]:
    """After a reconnect or a pause (the fence, workers/fence.py): claim every run
    here, for sure (a claim held may have lapsed); the runs another worker took
    over meanwhile: it holds the claim, streamed after this one, or a terminal
    is stored (this run's own, unacknowledged, counts too: a redelivery finds
    it and settles the message)."""
    lost: list[Run] = []
    for run in ctx.runs.runs():
        running = run.running
        if running is None or run.task is None or ctx.claims is None:
            continue
        req = running.request
        if not await ctx.claims.confirm(req.request_id):
            lost.append(run)
            continue
        if run.state is None or run.state is RunState.DONE:
            # It ended while the claim was asked for (a lost claim cancels it): its
            # end released nothing, and a claim nobody releases is renewed for as
            # long as this worker lives, keeping every other worker off the request.
            await ctx.claims.release(req.request_id)
            continue
        run.claimed = True
        # Another worker streamed after this run began (one read: the last chunk),
        # or stored the terminal.
        last = await last_chunk(ctx.js, ctx.settings, req.group, req.request_id)
        if (last is not None and last.seq >= running.next_seq
                and last.worker_id != ctx.worker_id) or (
                await stored_terminal(ctx.js, ctx.settings, req.group, req.request_id)
                is not None):
            lost.append(run)
    return lost


async def store_dead_letter(
    ctx: ServeContext, *, seq: int, subject: str, deliveries: int, data: bytes, reason: str,
    request_id: str = "",
) -> None:
    """Store the evidence on `llm.dlq.<stream>.<seq>` (once per message and request)."""
    stream = ctx.settings.streams.work.name
    letter = DeadLetter(
        stream=stream, seq=seq, subject=subject, reason=reason, deliveries=deliveries,
        request_id=request_id, data=data[: ctx.settings.limits.max_dead_letter_bytes],
        ts_ms=time.time() * 1000,
    )
    await ctx.store.publish(ctx.subjects.dead_letter(stream, seq), encode(letter),
                            f"dlq:{stream}:{seq}:{request_id}")
    ctx.counts["dead_letters"] += 1


async def dead_letter(ctx: ServeContext, run: Run, letter: Letter) -> Outcome:
    """ErrorReply worker_failed (retryable) unless a terminal is stored, then the
    DeadLetter. Raises when either could not be stored (the message stays)."""
    item = run.item
    req = item.request
    limit = ctx.settings.worker.max_migrations
    reason = (f"work delivered {letter.deliveries} times, more than 1 + max_migrations "
              f"({limit})")
    stored = await stored_terminal(ctx.js, ctx.settings, req.group, req.request_id)
    ctx.runs.transition(run, RunState.STORING)
    if stored is None:
        await ctx.publish_error(item, ErrorCode.WORKER_FAILED,
                                f"its workers failed: {reason}", True)
    await store_dead_letter(ctx, seq=letter.seq, subject=letter.subject,
                            deliveries=letter.deliveries, data=letter.data, reason=reason,
                            request_id=req.request_id)
    return Outcome.ERROR


async def move_queued(ctx: ServeContext, durable: str) -> int:
    """Move the messages still queued on `durable` (this worker's own consumer)
    to their models' pools (bus/requeue.py). Called on drain and when unhealthy,
    before the consumer is deleted, so nothing sent to this worker is stranded."""

    async def undecodable(msg: Msg, exc: Exception) -> None:
        await store_dead_letter(ctx, seq=msg.metadata.sequence.stream, subject=msg.subject,
                                deliveries=0, data=msg.data,
                                reason=f"undecodable work message: {exc}")

    moved = await requeue(ctx.js, ctx.store, ctx.settings, durable, ctx.worker_id,
                          model_of=ctx.model_of, undecodable=undecodable)
    if moved:
        log.info("moved %d queued items from %s to their model pools", moved, durable)
    return moved
