"""Runs one work item on the engine and publishes its outcome.

Every item ends in exactly one outcome, published before the caller acks the
work message: a Final or ErrorReply on `llm.done.<group>.<id>` (stored by
JetStream), a decode item handed to the model's decode pool (prefill role),
or the item handed back to its model's pool with the tokens so far (drain,
an unhealthy engine, a retryable engine fault). `run_item` returns which one
it was, so the runtime can judge its engine's health.
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
from cplane.bus.outcome import cancelled_final
from cplane.schemas.messages import ErrorCode, Final, FinishReason, Role, Timings, Usage, WorkItem
from cplane.workers.chunker import ChunkStream
from cplane.workers.context import Outcome, ServeContext
from cplane.workers.engines.base import Delta, EngineDeadError, EngineInputError, EngineRequest
from cplane.workers.stats import Live

__all__ = ["Outcome", "ServeContext", "engine_request", "finish_cancelled", "finish_resumed",
           "hand_back", "run_item", "serve_item"]
log = logging.getLogger("cplane.worker")
_ERROR_CODES = frozenset(c.value for c in ErrorCode)


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
    ctx: ServeContext, item: WorkItem, stream: ChunkStream, last: Delta, model: str
) -> Final:
    now = time.time() * 1000
    t0 = item.enqueued_ms or item.dispatched_ms or now
    n_tokens = len(item.resume_token_ids) + stream.tokens_sent
    if item.ttft_ms is not None:  # the first token was streamed by an earlier worker
        first_ms = t0 + item.ttft_ms
    else:
        first_ms = stream.first_token_ms or now
    last_ms = stream.last_token_ms or first_ms
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
        ),
        timings=Timings(
            queue_ms=max(0.0, (item.dispatched_ms or t0) - t0),
            ttft_ms=max(0.0, first_ms - t0),
            tpot_ms=max(0.0, tpot),
            e2e_ms=max(0.0, now - t0),
        ),
        text=item.resume_text + "".join(stream.text_parts),
        chunks=stream.next_seq,
        workers=[*item.served_by, ctx.worker_id],
        model=model,
        ts_ms=now,
    )


def _continued(ctx: ServeContext, item: WorkItem, stream: ChunkStream, **changes: Any) -> WorkItem:
    """The item as the next worker should see it: after everything streamed so far."""
    served = item.served_by if item.served_by[-1:] == [ctx.worker_id] else [
        *item.served_by, ctx.worker_id]
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
    )


async def _hand_off_to_decode(
    ctx: ServeContext, item: WorkItem, stream: ChunkStream, last: Delta
) -> None:
    first_ms = stream.first_token_ms or time.time() * 1000
    t0 = item.enqueued_ms or item.dispatched_ms or first_ms
    decode = _continued(
        ctx,
        item,
        stream,
        role=Role.DECODE,
        kv_transfer_params=last.kv_transfer_params or {},
        ttft_ms=item.ttft_ms if item.ttft_ms is not None else max(0.0, first_ms - t0),
        prompt_tokens=last.prompt_tokens,
    )
    await ctx.publish_work(Role.DECODE, decode)
    ctx.stats["handoffs"] += 1


async def hand_back(
    ctx: ServeContext, item: WorkItem, stream: ChunkStream | None = None, *,
    recheck: bool = False,
) -> None:
    """Return an unfinished item to its model's pool (attempt+1), resuming after
    what was streamed. `recheck`: the next worker must look in LLM_DONE/LLM_OUT
    first (this one did not finish doing so)."""
    if stream is None:
        stream = _stream(ctx, item)
    await stream.flush()
    back = _continued(ctx, item, stream, attempt=item.attempt + 1,
                      redispatched=item.redispatched or recheck)
    await ctx.publish_work(item.role, back)
    ctx.stats["handbacks"] += 1


async def _engine_failed(
    ctx: ServeContext, item: WorkItem, stream: ChunkStream, exc: Exception
) -> Outcome:
    """Hand the item to another worker, until it ran max_attempts times."""
    dead = isinstance(exc, EngineDeadError)
    ctx.stats["engine_faults"] += 1
    await stream.flush()
    if ctx.on_engine_fault is not None:  # may stop the pulling before the item goes back
        await ctx.on_engine_fault(dead)
    if item.attempt < ctx.max_attempts:
        await hand_back(ctx, item, stream)
    else:
        await ctx.publish_error(item, ErrorCode.ENGINE_ERROR,
                                f"engine failed {item.attempt} times: {exc}", True)
    return Outcome.ENGINE_DEAD if dead else Outcome.ENGINE_FAULT


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


async def run_item(ctx: ServeContext, item: WorkItem) -> Outcome:
    """Serve one item to its outcome; raises only when the outcome could not be
    stored (the caller leaves the message unacked), or CancelledError when
    cancelled outside a hand-back."""
    refused = _refused(ctx, item)
    if refused is not None:
        await ctx.publish_error(item, *refused)
        return Outcome.ERROR
    stream = _stream(ctx, item)
    if ctx.handing_back:
        await hand_back(ctx, item, stream)
        return Outcome.HANDBACK
    live = ctx.metrics.begin(item)  # `cplane request ID` sees it run; inter-token gaps
    try:
        return await _generate(ctx, item, stream, live)
    finally:
        # Only once the terminal is stored (or the item handed back): a status query
        # in between would find neither this worker nor LLM_DONE and go backwards.
        ctx.metrics.end(live)


async def _generate(ctx: ServeContext, item: WorkItem, stream: ChunkStream,
                    live: Live) -> Outcome:
    req = item.request
    last = Delta(token_ids=[])
    model = ctx.model_of(item)
    gen = ctx.engine.generate(engine_request(ctx, item, item.role))
    deltas = gen.__aiter__()
    span = tracing.Span()
    if item.traceparent:  # what follows (terminal, hand-off) is a child of this run
        span = tracing.start("cplane.worker.generate", item.traceparent, {
            "request_id": req.request_id, "worker": ctx.worker_id, "model": model})
        item = msgspec.structs.replace(item, traceparent=tracing.span_traceparent(
            span, item.traceparent))
    try:
        while True:
            # Only what the engine raises is an engine fault: a failed chunk
            # publish (below) propagates as the outcome-not-stored error it is.
            try:
                delta = await deltas.__anext__()
            except StopAsyncIteration:
                break
            except EngineInputError as exc:
                await stream.flush()
                code = ErrorCode(exc.code) if exc.code in _ERROR_CODES else (
                    ErrorCode.INVALID_REQUEST)
                await ctx.publish_error(item, code, str(exc))
                return Outcome.ERROR
            except Exception as exc:
                log.error("engine failed on %s: %r", req.request_id, exc)
                return await _engine_failed(ctx, item, stream, exc)
            await stream.add(delta.token_ids, delta.text)
            ctx.metrics.tokens(live, len(delta.token_ids))
            if delta.finish_reason is not None:
                last = delta
    except asyncio.CancelledError:
        stream.close()
        if not ctx.handing_back:
            raise
        await asyncio.shield(hand_back(ctx, item, stream))
        return Outcome.HANDBACK
    finally:
        stream.close()
        span.end()
        await _close(gen)
    await stream.flush()
    if last.finish_reason is FinishReason.ABORT and ctx.handing_back:
        await hand_back(ctx, item, stream)
        return Outcome.HANDBACK
    return await _finish(ctx, item, stream, last, model)


async def _finish(
    ctx: ServeContext, item: WorkItem, stream: ChunkStream, last: Delta, model: str
) -> Outcome:
    req = item.request
    wants_more = len(item.resume_token_ids) + stream.tokens_sent < req.max_tokens
    if item.role is Role.PREFILL and last.finish_reason is FinishReason.LENGTH and wants_more:
        await _hand_off_to_decode(ctx, item, stream, last)
        return Outcome.HANDOFF
    if last.finish_reason is FinishReason.CANCELLED:
        ctx.stats["cancelled"] += 1
    await ctx.publish_terminal(item, _final(ctx, item, stream, last, model), stream)
    return Outcome.FINAL


async def finish_resumed(ctx: ServeContext, item: WorkItem) -> Outcome:
    """The tokens read back already reach max_tokens: only the Final was missing."""
    last = Delta(token_ids=[], finish_reason=FinishReason.LENGTH)
    stream = _stream(ctx, item)
    stream.close()
    await ctx.publish_terminal(item, _final(ctx, item, stream, last, ctx.model_of(item)))
    return Outcome.FINAL


async def finish_cancelled(ctx: ServeContext, item: WorkItem) -> Outcome:
    """Final(cancelled) for an item cancelled before it ran."""
    final = cancelled_final(item, ctx.worker_id)
    ctx.stats["cancelled"] += 1
    await ctx.publish_terminal(item, final)
    return Outcome.FINAL


async def serve_item(ctx: ServeContext, item: WorkItem) -> Outcome:
    """One item (after any redelivery check) to its outcome; see run_item."""
    if len(item.resume_token_ids) >= item.request.max_tokens:
        return await finish_resumed(ctx, item)
    if item.role is Role.PREFILL and item.resume_token_ids:
        # The first token is out (an earlier prefill died before handing off):
        # the decode pool continues without transferred KV.
        decode = msgspec.structs.replace(item, role=Role.DECODE, kv_transfer_params=None)
        await ctx.publish_work(Role.DECODE, decode)
        ctx.stats["handoffs"] += 1
        return Outcome.HANDOFF
    return await run_item(ctx, item)
