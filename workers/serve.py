"""Runs one work item on the engine and publishes its outcome.

Every item ends in exactly one outcome, published before the caller acks the
work message: a Final or ErrorReply on `llm.done.<group>.<id>` (stored by
JetStream), a decode item handed to the decode pool (prefill role), or the
item handed back to its pool with the tokens so far (drain/migration).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from bus.outcome import StoredPublisher, cancelled_final, error_reply
from schemas.codec import encode
from schemas.messages import (
    ErrorCode,
    ErrorReply,
    Final,
    FinishReason,
    Role,
    Timings,
    Usage,
    WorkBatch,
    WorkItem,
)
from schemas.subjects import Subjects
from workers.chunker import ChunkStream
from workers.engines.base import Delta, Engine, EngineInputError, EngineRequest

log = logging.getLogger("cplane.worker")
_ERROR_CODES = frozenset(c.value for c in ErrorCode)


@dataclass(slots=True)
class ServeContext:
    """What every item needs; one per worker."""

    nc: NATS
    store: StoredPublisher
    engine: Engine
    subjects: Subjects
    worker_id: str
    role: Role
    chunk_tokens: int = 16
    chunk_interval_s: float = 0.005
    handing_back: bool = False  # set while draining: cancelled items go back to the pool
    stats: dict[str, int] = field(default_factory=lambda: {
        "finals": 0, "errors": 0, "handoffs": 0, "handbacks": 0, "cancelled": 0,
    })

    async def publish_terminal(self, item: WorkItem, msg: Final | ErrorReply) -> None:
        req = item.request
        await self.store.publish_terminal(self.nc, self.subjects, req.group, msg, req.reply_to)
        key = "finals" if isinstance(msg, Final) else "errors"
        self.stats[key] += 1

    async def publish_error(
        self, item: WorkItem, code: ErrorCode, message: str, retryable: bool = False
    ) -> None:
        err = error_reply(item.request.request_id, code, message, retryable)
        await self.publish_terminal(item, err)

    async def publish_work(self, role: Role, item: WorkItem) -> None:
        data = encode(WorkBatch(items=[item]))
        msg_id = f"{item.request.request_id}:{role.value}:{item.attempt}:{item.next_seq}"
        await self.store.publish(self.subjects.work(role), data, msg_id)


def engine_request(item: WorkItem, role: Role) -> EngineRequest:
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
    return Final(
        request_id=item.request.request_id,
        finish_reason=last.finish_reason or FinishReason.ABORT,
        usage=Usage(
            prompt_tokens=last.prompt_tokens or item.prompt_tokens or 0,
            completion_tokens=n_tokens,
            cached_prompt_tokens=last.cached_prompt_tokens or 0,
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
    return msgspec.structs.replace(
        item,
        resume_token_ids=[*item.resume_token_ids, *stream.token_ids],
        resume_text=item.resume_text + "".join(stream.text_parts),
        next_seq=stream.next_seq,
        served_by=[*item.served_by, ctx.worker_id],
        **changes,
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
        ttft_ms=max(0.0, first_ms - t0),
        prompt_tokens=last.prompt_tokens,
    )
    await ctx.publish_work(Role.DECODE, decode)
    ctx.stats["handoffs"] += 1


async def hand_back(ctx: ServeContext, item: WorkItem, stream: ChunkStream) -> None:
    """Return an unfinished item to its role's pool, resuming after what was streamed."""
    await stream.flush()
    back = _continued(ctx, item, stream, attempt=item.attempt + 1)
    await ctx.publish_work(ctx.role, back)
    ctx.stats["handbacks"] += 1


async def run_item(ctx: ServeContext, item: WorkItem) -> None:
    """Serve one item to its outcome. Never raises except on a failed outcome publish."""
    req = item.request
    role = item.role
    out_subjects = [ctx.subjects.out(req.group, req.request_id)]
    if req.reply_to:
        out_subjects.append(req.reply_to)
    stream = ChunkStream(
        ctx.nc.publish,
        out_subjects,
        req.request_id,
        ctx.worker_id,
        next_seq=item.next_seq,
        max_tokens=ctx.chunk_tokens,
        max_age_s=ctx.chunk_interval_s,
    )
    last = Delta(token_ids=[])
    model = req.model or ctx.engine.models[0]
    if model not in ctx.engine.models:  # never answer with another model's tokens
        await ctx.publish_error(
            item, ErrorCode.UNKNOWN_MODEL,
            f"worker {ctx.worker_id} serves {ctx.engine.models}, not {model!r}", True,
        )
        return
    try:
        async for delta in ctx.engine.generate(engine_request(item, role)):
            await stream.add(delta.token_ids, delta.text)
            if delta.finish_reason is not None:
                last = delta
    except EngineInputError as exc:
        await stream.flush()
        code = ErrorCode(exc.code) if exc.code in _ERROR_CODES else ErrorCode.INVALID_REQUEST
        await ctx.publish_error(item, code, str(exc))
        return
    except asyncio.CancelledError:
        stream.close()
        if not ctx.handing_back:
            raise
        await asyncio.shield(hand_back(ctx, item, stream))
        return
    except Exception as exc:
        log.exception("engine failed on %s", req.request_id)
        await stream.flush()
        await ctx.publish_error(item, ErrorCode.ENGINE_ERROR, f"engine failed: {exc}", True)
        return
    finally:
        stream.close()
    await stream.flush()
    if last.finish_reason is FinishReason.ABORT and ctx.handing_back:
        await hand_back(ctx, item, stream)
        return
    wants_more = len(item.resume_token_ids) + stream.tokens_sent < req.max_tokens
    if role is Role.PREFILL and last.finish_reason is FinishReason.LENGTH and wants_more:
        await _hand_off_to_decode(ctx, item, stream, last)
        return
    if last.finish_reason is FinishReason.CANCELLED:
        ctx.stats["cancelled"] += 1
    await ctx.publish_terminal(item, _final(ctx, item, stream, last, model))


async def finish_cancelled(ctx: ServeContext, item: WorkItem) -> None:
    """Final(cancelled) for an item cancelled before it ran."""
    final = cancelled_final(item, ctx.worker_id)
    ctx.stats["cancelled"] += 1
    await ctx.publish_terminal(item, final)
