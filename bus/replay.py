"""Reading back what a request already produced: its stored terminal and chunks.

Used where a delivery may repeat earlier work: a redelivered request (the
orchestrator) and a redelivered or migrated work item (the worker). One
JetStream API round trip per message read; only redeliveries pay it.
"""

from __future__ import annotations

import asyncio

import msgspec
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cplane.schemas.codec import chunk_decoder, final_decoder
from cplane.schemas.messages import ErrorReply, Final, TokenChunk
from cplane.schemas.settings import Settings


async def stored_terminal(
    js: JetStreamContext, settings: Settings, group: str, request_id: str
) -> Final | ErrorReply | None:
    """The Final/ErrorReply stored for a request, or None.

    Looked up in LLM_OUT first (where it is stored; LLM_DONE copies it a moment
    later) and then in LLM_DONE (which keeps it for days).
    """
    subject = settings.subjects.done_store(group, request_id)
    for stream in (settings.streams.out.name, settings.streams.done.name):
        try:
            msg = await js.get_last_msg(stream, subject)
        except NotFoundError:
            continue
        try:
            return final_decoder.decode(msg.data or b"")
        except msgspec.DecodeError:
            continue
    return None


async def stored_terminals(nc: NATS, settings: Settings, keys: list[tuple[str, str]],
                           timeout_s: float = 2.0, stream: str | None = None
                           ) -> dict[tuple[str, str], bytes]:
    """(group, request id) -> its stored terminal (encoded), for every key in `keys`
    that has one in `stream` (default LLM_DONE; LLM_OUT holds them too, for its
    max_age): one batched direct get (`multi_last`) for all of them. Raises
    TimeoutError (or the server's error) when unanswered. Keyed by group too: two
    tenants' requests may share an id, never a subject."""
    subjects = settings.subjects
    wanted = {subjects.done_store(g, r): (g, r) for g, r in keys}
    found: dict[tuple[str, str], bytes] = {}
    end: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_msg(msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            key = wanted.get((msg.headers or {}).get("Nats-Subject", ""))
            if key is not None:
                found[key] = msg.data
        elif not end.done():  # 204 end of batch, 404 nothing found; else an error
            if status in ("204", "404"):
                end.set_result(None)
            else:
                end.set_exception(RuntimeError(f"direct get: {status} {msg.headers}"))

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        req = orjson.dumps({"multi_last": list(wanted), "batch": len(wanted)})
        await nc.publish(f"$JS.API.DIRECT.GET.{stream or settings.streams.done.name}", req,
                         reply=inbox)
        await asyncio.wait_for(end, timeout_s)
    finally:
        await sub.unsubscribe()
    return found


async def last_chunk(
    js: JetStreamContext, settings: Settings, group: str, request_id: str
) -> TokenChunk | None:
    """The chunk stored last for a request (one round trip), or None."""
    try:
        msg = await js.get_last_msg(settings.streams.out.name,
                                    settings.subjects.out_store(group, request_id))
    except NotFoundError:
        return None
    try:
        return chunk_decoder.decode(msg.data or b"")
    except msgspec.DecodeError:
        return None


async def stored_count(
    js: JetStreamContext, settings: Settings, group: str, request_id: str
) -> int:
    """How many chunks of a request LLM_OUT holds (one round trip: the stream's count
    for the request's subject)."""
    subject = settings.subjects.out_store(group, request_id)
    info = await js.stream_info(settings.streams.out.name, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def stored_seqs(
    js: JetStreamContext, settings: Settings, group: str, request_id: str, from_seq: int = 0,
    limit: int = 100_000,
) -> set[int]:
    """The chunk seqs (>= from_seq) of a request that LLM_OUT holds."""
    return {c.seq for c in await stored_chunks(js, settings, group, request_id, from_seq, limit)}


async def stored_chunks(
    js: JetStreamContext, settings: Settings, group: str, request_id: str, from_seq: int = 0,
    limit: int = 100_000,
) -> list[TokenChunk]:
    """Every chunk (>= from_seq) of a request in LLM_OUT, in stream order, repeats kept."""
    subject = settings.subjects.out_store(group, request_id)
    stream = settings.streams.out.name
    out: list[TokenChunk] = []
    cursor = 1
    for _ in range(limit):
        try:
            raw = await js.get_msg(stream, seq=cursor, subject=subject, next=True)
        except NotFoundError:
            break
        cursor = (raw.seq or cursor) + 1
        try:
            chunk = chunk_decoder.decode(raw.data or b"")
        except msgspec.DecodeError:
            continue
        if chunk.request_id == request_id and chunk.seq >= from_seq:
            out.append(chunk)
    return out


async def streamed_chunks(
    js: JetStreamContext, settings: Settings, group: str, request_id: str, from_seq: int = 0,
    limit: int = 100_000,
) -> list[TokenChunk]:
    """The gap-free run of chunks `from_seq, from_seq+1, ...` captured in LLM_OUT.

    Where a seq was published twice, the first stored copy wins: it is the one
    every reader took (the SDK drops a seq it has seen). The run stops at the
    first missing seq; a worker continues after it.
    """
    by_seq: dict[int, TokenChunk] = {}
    for chunk in await stored_chunks(js, settings, group, request_id, from_seq, limit):
        by_seq.setdefault(chunk.seq, chunk)
    run: list[TokenChunk] = []
    seq = from_seq
    while seq in by_seq:
        run.append(by_seq[seq])
        seq += 1
    return run
