"""One run of one work item, from its delivery to its single stored outcome.

`serve(ctx, run)` is the whole path: wait for the run here that it continues,
look for what an earlier run stored (a redelivery: migrate.py), then the
engine, the chunks (chunker.py) and one outcome, stored before it returns:

- a Final or ErrorReply on `llm.done.<group>.<id>` (FINAL, ERROR);
- a decode item on the model's decode pool (prefill role: HANDOFF);
- the item back on its model's pool with the tokens so far (HANDBACK: the
  worker drains or is unhealthy, or the engine failed on it);
- nothing, when its terminal was stored already (SKIPPED).

The run's state moves through the run ledger (workers/runs.py); what the
runtime must act on is the returned `Outcome`. The engine faults are the one
pair returned before anything is stored: the runtime judges its engine (it
stops pulling when unhealthy), then serves the run again, and the run leaves:
handed back, or its ErrorReply once it ran max_attempts times. `serve`
raises only when the outcome could not be stored (the runtime tries again,
then naks), or CancelledError when stopped without being told to leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from cplane.bus import tracing
from cplane.bus.cancels import is_cancelled
from cplane.bus.outcome import cancelled_final
from cplane.schemas.messages import ErrorCode, Final, FinishReason, Role, Timings, Usage, WorkItem
from cplane.workers.chunker import ChunkStream
from cplane.workers.context import Outcome, ServeContext
from cplane.workers.engines.base import Delta, EngineDeadError, EngineInputError, EngineRequest
from cplane.workers.migrate import HeadLost, dead_letter, prepare
from cplane.workers.run_fence import store_fence
from cplane.workers.runs import Run, RunState

__all__ = ["Outcome", "ServeContext", "engine_request", "serve"]
log = logging.getLogger("cplane.worker")
_ERROR_CODES = frozenset(c.value for c in ErrorCode)


async def serve(ctx: ServeContext, run: Run) -> Outcome:
    """Bring `run` to its outcome (see the module's docstring)."""
    if ctx.runs.begin(run) is RunState.HANDING_BACK:  # told to leave before it began
        await _after(run)
        if run.letter is not None:  # delivered too often: out, rather than back
            return await dead_letter(ctx, run, run.letter)
        return await _leave(ctx, run, recheck=run.check)
    try:
        if run.after is not None:
            await _after(run)
        return await _attempt(ctx, run)
    except asyncio.CancelledError:
        if run.state is not RunState.HANDING_BACK:
            raise
        # Told to leave outside generation (the check, a flush): the next worker
        # looks for what this one stored before it runs the item.
        return await asyncio.shield(_leave(ctx, run, recheck=True))


async def _after(run: Run) -> None:
    """The run here that this one continues (a hand-back come back) ends first."""
    after, run.after = run.after, None
    if after is not None and after.task is not None:
        await asyncio.wait({after.task})


async def _attempt(ctx: ServeContext, run: Run) -> Outcome:
    run.running = run.stream = None
    if run.letter is not None:
        return await dead_letter(ctx, run, run.letter)
    item = run.item
    if run.check:
        try:
            prepared = await prepare(ctx, run)
        except HeadLost as exc:
            log.error("%s", exc)
            await _storing(ctx, run)
            await ctx.publish_error(item, ErrorCode.WORKER_FAILED, str(exc), True)
            return Outcome.ERROR
        if prepared is None:
            return Outcome.SKIPPED
        item = prepared
        run.check = False
    run.running = item
    if is_cancelled(ctx.cancelled, item.request.group, item.request.request_id):  # before it ran
        await _storing(ctx, run)
        ctx.counts["cancelled"] += 1
        await ctx.publish_terminal(item, cancelled_final(item, ctx.worker_id))
        return Outcome.FINAL
    if len(item.resume_token_ids) >= item.request.max_tokens:
        # The tokens read back reach max_tokens already: only the Final was missing.
        await _storing(ctx, run)
        last = Delta(token_ids=[], finish_reason=FinishReason.LENGTH)
        await ctx.publish_terminal(item, _final(ctx, item, None, last, ctx.model_of(item)))
        return Outcome.FINAL
    if item.role is Role.PREFILL and item.resume_token_ids:
        # The first token is out (an earlier prefill died before handing off):
        # the decode pool continues without transferred KV.
        await _storing(ctx, run)
        await ctx.publish_work(Role.DECODE, msgspec.structs.replace(
            item, role=Role.DECODE, kv_transfer_params=None))
        ctx.counts["handoffs"] += 1
        return Outcome.HANDOFF
    refused = _refused(ctx, item)
    if refused is not None:
        await _storing(ctx, run)
        await ctx.publish_error(item, *refused)
        return Outcome.ERROR
    return await _generate(ctx, run, item)


async def _generate(ctx: ServeContext, run: Run, item: WorkItem) -> Outcome:
    req = item.request
    stream = run.stream = _stream(ctx, item)
    ctx.runs.transition(run, RunState.RUNNING)
    ctx.stats.begin(run, item)  # `cplane request ID` sees it run; inter-token gaps
    last = Delta(token_ids=[])
    model = ctx.model_of(item)
    gen = ctx.engine.generate(engine_request(ctx, item, item.role))
    deltas = gen.__aiter__()
    span = tracing.Span()
    if item.traceparent:  # what follows (terminal, hand-off) is a child of this run
        span = tracing.start("cplane.worker.generate", item.traceparent, {
            "request_id": req.request_id, "worker": ctx.worker_id, "model": model})
        item = run.running = msgspec.structs.replace(
            item, traceparent=tracing.span_traceparent(span, item.traceparent))
    try:
        while True:
            # Only what the engine raises is an engine fault: a failed chunk
            # publish (below) propagates as the outcome-not-stored error it is.
            try:
                delta = await deltas.__anext__()
            except StopAsyncIteration:
                break
            except EngineInputError as exc:
                code = ErrorCode(exc.code) if exc.code in _ERROR_CODES else (
                    ErrorCode.INVALID_REQUEST)
                await _storing(ctx, run)
                await ctx.publish_error(item, code, str(exc))
                return Outcome.ERROR
            except Exception as exc:
                log.error("engine failed on %s: %r", req.request_id, exc)
                ctx.counts["engine_faults"] += 1
                run.fault = str(exc) or repr(exc)
                if run.state is not RunState.HANDING_BACK:  # not told to leave already
                    ctx.runs.transition(run, RunState.HANDING_BACK)
                return Outcome.ENGINE_DEAD if isinstance(exc, EngineDeadError) else (
                    Outcome.ENGINE_FAULT)
            await stream.add(delta.token_ids, delta.text)
            ctx.stats.tokens(run, len(delta.token_ids))
            if delta.finish_reason is not None:
                last = delta
    except asyncio.CancelledError:
        stream.close()
        if run.state is not RunState.HANDING_BACK:
            raise
        return await asyncio.shield(_leave(ctx, run, recheck=False))
    finally:
        stream.close()
        span.end()
        await _close(gen)
    if last.finish_reason is FinishReason.ABORT and run.state is RunState.HANDING_BACK:
        return await _leave(ctx, run, recheck=False)  # the engine let go of it first
    return await _finish(ctx, run, item, last, model)


async def _finish(
    ctx: ServeContext, run: Run, item: WorkItem, last: Delta, model: str
) -> Outcome:
    ctx.runs.transition(run, RunState.STORING)  # _storing(), one frame less
    stream = run.stream
    assert stream is not None
    await stream.flush()
    req = item.request
    wants_more = len(item.resume_token_ids) + stream.tokens_sent < req.max_tokens
    if item.role is Role.PREFILL and last.finish_reason is FinishReason.LENGTH and wants_more:
        first_ms = stream.first_token_ms or time.time() * 1000
        t0 = item.enqueued_ms or item.dispatched_ms or first_ms
        await ctx.publish_work(Role.DECODE, _continued(
            ctx, item, stream, role=Role.DECODE,
            kv_transfer_params=last.kv_transfer_params or {},
            ttft_ms=item.ttft_ms if item.ttft_ms is not None else max(0.0, first_ms - t0),
            prompt_tokens=last.prompt_tokens))
        ctx.counts["handoffs"] += 1
        return Outcome.HANDOFF
    if last.finish_reason is FinishReason.CANCELLED:
        ctx.counts["cancelled"] += 1
    await ctx.publish_terminal(item, _final(ctx, item, stream, last, model), stream)
    return Outcome.FINAL


async def _storing(ctx: ServeContext, run: Run) -> None:
    """From here the run is never cancelled for a hand-back or a lost claim: what
    it streamed goes out, then its outcome is stored."""
    ctx.runs.transition(run, RunState.STORING)
    if run.stream is not None:
        await run.stream.flush()


async def _leave(ctx: ServeContext, run: Run, *, recheck: bool) -> Outcome:
    """The run goes back to its model's pool (attempt+1) after what it streamed;
    after an engine fault on its last allowed attempt, it gets its ErrorReply.
    `recheck`: the next worker must look in LLM_DONE/LLM_OUT first (this one did
    not finish doing so)."""
    await _storing(ctx, run)
    item = run.running or run.item
    if run.fault and item.attempt >= ctx.max_attempts:
        await ctx.publish_error(item, ErrorCode.ENGINE_ERROR,
                                f"engine failed {item.attempt} times: {run.fault}", True)
        return Outcome.ERROR
    back = _continued(ctx, item, run.stream, attempt=item.attempt + 1,
                      redispatched=item.redispatched or recheck)
    await ctx.publish_work(item.role, back)
    ctx.counts["handbacks"] += 1
    return Outcome.HANDBACK


def _continued(ctx: ServeContext, item: WorkItem, stream: ChunkStream | None,
               **changes: Any) -> WorkItem:
    """The item as the next worker should see it: after everything streamed so far."""
    served = item.served_by if item.served_by[-1:] == [ctx.worker_id] else [
        *item.served_by, ctx.worker_id]
    if stream is None:
        return msgspec.structs.replace(item, served_by=served, **changes)
    return msgspec.structs.replace(
        item,
        resume_token_ids=[*item.resume_token_ids, *stream.token_ids],
        resume_text=item.resume_text + "".join(stream.text_parts),
        next_seq=stream.next_seq,
        served_by=served,
        **changes,
    )


def _stream(ctx: ServeContext, item: WorkItem) -> ChunkStream:
    req = item.request
    out_subjects = [ctx.subjects.out_store(req.group, req.request_id)]
    if req.reply_to:
        out_subjects.append(req.reply_to)
    ws = ctx.settings.worker
    return ChunkStream(
        ctx.nc.publish, out_subjects, req.request_id, ctx.worker_id,
        next_seq=item.next_seq, max_tokens=ws.chunk_tokens,
        min_interval_s=ws.chunk_interval_ms / 1000, epoch=ctx.epoch, gate=ctx.gate,
        fence=ctx.fence, msg_key=ctx.subjects.scoped_id(req.group, req.request_id),
        store_fence=store_fence(ctx.subjects, item) if ctx.run_fences else None,
    )


def _refused(ctx: ServeContext, item: WorkItem) -> tuple[ErrorCode, str, bool] | None:
    """Why this worker will not run the item at all, or None."""
    req = item.request
    model = ctx.model_of(item)
    if model not in ctx.engine.models:  # never answer with another model's tokens
        return (ErrorCode.UNKNOWN_MODEL,
                f"worker {ctx.worker_id} serves {ctx.engine.models}, not {model!r}", True)
    if req.max_tokens > ctx.settings.limits.max_tokens:
        return (ErrorCode.TOO_LARGE,
                f"max_tokens {req.max_tokens} above the limit {ctx.settings.limits.max_tokens}",
                False)
    limit = ctx.settings.worker.max_prompt_tokens
    if limit > 0 and req.prompt_token_ids is not None and len(req.prompt_token_ids) > limit:
        return (ErrorCode.PROMPT_TOO_LONG,
                f"prompt has {len(req.prompt_token_ids)} tokens, more than {limit}", False)
    return None


async def _close(gen: AsyncIterator[Delta]) -> None:
    """Let the engine free the request's slot now, not when the generator is collected."""
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def engine_request(ctx: ServeContext, item: WorkItem, role: Role) -> EngineRequest:
    r = item.request
    return EngineRequest(
        request_id=r.request_id,
        prompt=r.prompt,
        prompt_token_ids=r.prompt_token_ids,
        messages=r.messages,
        max_tokens=r.max_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        stop=r.stop,
        seed=r.seed,
        ignore_eos=r.ignore_eos,
        priority=item.priority.level,
        max_prompt_tokens=ctx.settings.worker.max_prompt_tokens,
        resume_token_ids=list(item.resume_token_ids),
        prefill_only=role is Role.PREFILL,
        kv_transfer_params=item.kv_transfer_params if role is Role.DECODE else None,
    )


def _final(
    ctx: ServeContext, item: WorkItem, stream: ChunkStream | None, last: Delta, model: str
) -> Final:
    now = time.time() * 1000
    t0 = item.enqueued_ms or item.dispatched_ms or now
    n_tokens = len(item.resume_token_ids) + (stream.tokens_sent if stream else 0)
    if item.ttft_ms is not None:  # the first token was streamed by an earlier worker
        first_ms = t0 + item.ttft_ms
    else:
        first_ms = (stream.first_token_ms if stream else None) or now
    last_ms = (stream.last_token_ms if stream else None) or first_ms
    tpot = (last_ms - first_ms) / (n_tokens - 1) if n_tokens > 1 else 0.0
    ctx.latency.observe(max(0.0, first_ms - t0), max(0.0, tpot))
    prompt_tokens = last.prompt_tokens or item.prompt_tokens or 0
    w = ctx.settings.worker
    cost = (prompt_tokens * w.price_in_per_1k + n_tokens * w.price_out_per_1k) / 1000
    return Final(
        request_id=item.request.request_id,
        finish_reason=last.finish_reason or FinishReason.ABORT,
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=n_tokens,
            cached_prompt_tokens=last.cached_prompt_tokens or 0,
            cost=cost,
            price_in_per_1k=w.price_in_per_1k,
            price_out_per_1k=w.price_out_per_1k,
            price_source=w.price_source or ("configured" if cost else ""),
        ),
        timings=Timings(
            queue_ms=max(0.0, (item.dispatched_ms or t0) - t0),
            ttft_ms=max(0.0, first_ms - t0),
            tpot_ms=max(0.0, tpot),
            e2e_ms=max(0.0, now - t0),
        ),
        text=item.resume_text + "".join(stream.text_parts if stream else ()),
        chunks=stream.next_seq if stream else item.next_seq,
        workers=[*item.served_by, ctx.worker_id],
        model=model,
        ts_ms=now,
    )
