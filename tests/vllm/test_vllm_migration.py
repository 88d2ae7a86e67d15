"""Request migration on the real vLLM engine (CPU, tiny random Llama), real NATS.

A request sampled with temperature > 0 and no seed moves mid-generation from
one worker to another: the client must see one gap-free, duplicate-free run
of chunks, every copy of a seq on the wire must carry the same tokens, and
`Final.text` must equal the concatenation of the streamed texts. With
sampling, a worker that restarted the request from scratch would splice two
different samples, and these checks catch it.

Two ways a worker leaves: a drain (it hands the item back with the tokens
streamed so far) and a kill (no outcome, no ack: JetStream redelivers the
work message and the next worker resumes from the chunks stored in LLM_OUT).

The two workers run the two session engines of tests/vllm_fixtures.py
(`vllm_engine` and `vllm_decode_engine`): one engine per worker, so the
moved request never meets itself inside one AsyncLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
import pytest
import vllm  # noqa: F401 - these tests fail, never skip, where vLLM is missing
from nats.aio.client import Client as NATS

from cplane.client.sdk import Client, RequestHandle
from cplane.schemas.codec import chunk_decoder
from cplane.schemas.messages import Final, FinishReason, Request, TokenChunk
from cplane.schemas.settings import Settings
from cplane.workers.runtime import Worker
from tests.natsfix import isolated_settings
from tests.stack import stack, start_worker
from tests.vllm_model import MODEL_NAME
from tests.waiting import quiet_for, subscribed, until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

PROMPT = "An orchestrator schedules prompts onto workers that run a language model."
# Long enough that the first worker is still generating when it leaves; short
# enough that prompt + max_tokens fits the tiny model's 512 tokens.
MAX_TOKENS = 440
MOVE_AFTER = 24  # tokens the client has seen before the first worker leaves


class Wire:
    """Every chunk copy published on a request's output subject (core NATS)."""

    def __init__(self) -> None:
        self.copies: dict[int, list[TokenChunk]] = {}

    async def watch(self, nc: NATS, subject: str) -> None:
        async def on_msg(msg: Any) -> None:
            try:
                chunk = chunk_decoder.decode(msg.data)
            except msgspec.DecodeError:
                return  # a Final or ErrorReply on the same subject
            if isinstance(chunk, TokenChunk):
                self.copies.setdefault(chunk.seq, []).append(chunk)

        await nc.subscribe(subject, cb=on_msg)


def stray(chunks: list[TokenChunk], wire: Wire) -> bool:
    """A copy on the wire past the client's last seq, or unlike what it kept for that seq."""
    kept = {c.seq: (c.token_ids, c.text) for c in chunks}
    return any(seq not in kept or any((x.token_ids, x.text) != kept[seq] for x in xs)
               for seq, xs in wire.copies.items())


def sampled(request_id: str) -> Request:
    return Request(request_id=request_id, prompt=PROMPT, max_tokens=MAX_TOKENS,
                   temperature=1.0, ignore_eos=True, model=MODEL_NAME)


async def first_chunks(handle: RequestHandle, tokens: int) -> list[TokenChunk]:
    chunks: list[TokenChunk] = []
    async for c in handle:
        chunks.append(c)
        if sum(len(x.token_ids) for x in chunks) >= tokens:
            break
    return chunks


def check_one_stream(chunks: list[TokenChunk], wire: Wire, final: Final) -> None:
    """One gap-free, duplicate-free, consistent sequence, and Final agrees with it."""
    assert [c.seq for c in chunks] == list(range(len(chunks))), "gap or repeat in the stream"
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == MAX_TOKENS == final.usage.completion_tokens
    assert final.finish_reason is FinishReason.LENGTH
    assert final.chunks == len(chunks)
    assert final.text == "".join(c.text for c in chunks), "Final.text is not what was streamed"
    # Every copy of a seq that went over the wire (a replayed or re-sent
    # chunk included) carries what the client kept for that seq.
    assert set(wire.copies) <= set(range(len(chunks))), "chunks past the Final's count"
    for c in chunks:
        for copy in wire.copies.get(c.seq, []):
            assert (copy.token_ids, copy.text) == (c.token_ids, c.text), (
                f"seq {c.seq} was sent with different tokens by {copy.worker_id} and "
                f"{c.worker_id}"
            )


@dataclass
class First:
    """The worker the request leaves: run by hand, on a connection of its own."""

    worker: Worker
    nc: NATS
    stop: asyncio.Event
    task: asyncio.Task[None]


async def start_first(s: Settings, engine: Any) -> First:
    ws = msgspec.structs.replace(s.worker, worker_id="first")
    nc = await nats.connect(s.nats.url, allow_reconnect=False)  # a dead socket stays dead
    worker = Worker(msgspec.structs.replace(s, worker=ws), engine, nc=nc)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(worker.run(stop, ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({waiter, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert ready.is_set(), "the first worker did not become ready"
    return First(worker, nc, stop, task)


async def _migrate(
    nats_url: str,
    s: Settings,
    first_engine: Any,
    second_engine: Any,
    request_id: str,
    leave: Callable[[First], Awaitable[None]],
) -> tuple[list[TokenChunk], Wire, Final]:
    """Run one sampled request; once the client has MOVE_AFTER tokens, start a
    second worker and make the first one leave with `leave(first)`."""
    first = await start_first(s, first_engine)
    try:
        async with stack(s, workers=0) as run:
            nc = await nats.connect(nats_url)
            try:
                client = Client(nc, s)
                wire = Wire()
                await wire.watch(nc, s.subjects.out("i", request_id))
                await subscribed(nc)
                handle = await client.submit(sampled(request_id))
                chunks = await asyncio.wait_for(first_chunks(handle, MOVE_AFTER), timeout=120)
                await start_worker(s, run, engine=second_engine, worker_id="second")
                await leave(first)
                async for c in handle:
                    chunks.append(c)
                final = await handle.result(timeout=120)
                await until(lambda: chunks[-1].seq in wire.copies, 10, "the last chunk's copy")
                await quiet_for(0.2, lambda: stray(chunks, wire),
                                why="copies a worker sent before it left (or was killed) "
                                    "may still be in flight; none may differ or run past the end")
            finally:
                await nc.close()
    finally:
        first.stop.set()
        await asyncio.wait({first.task}, timeout=30)
        if not first.task.done():
            first.task.cancel()
        await asyncio.gather(first.task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await first.nc.close()
    return chunks, wire, final


async def test_vllm_drain_moves_a_sampled_request_mid_generation(
    nats_url: str, vllm_engine: Any, vllm_decode_engine: Any
) -> None:
    s = isolated_settings(nats_url, worker={"model": MODEL_NAME, "drain_timeout_s": 0.1})

    async def drain(first: First) -> None:
        first.stop.set()  # drains: hands the item back with the tokens so far
        await asyncio.wait_for(first.task, 60)

    chunks, wire, final = await _migrate(
        nats_url, s, vllm_engine, vllm_decode_engine, "mig-drain", drain
    )
    check_one_stream(chunks, wire, final)
    assert final.workers == ["first", "second"], "the request did not move"
    assert chunks[0].worker_id == "first" and chunks[-1].worker_id == "second"
    assert vllm_engine.stats().running == 0


async def kill(first: First) -> None:
    """kill -9: the socket dies first (with whatever was not sent yet), then
    the worker's tasks stop where they are: no outcome, no ack, no hand-back,
    no goodbye heartbeat. JetStream redelivers the work message."""
    transport = first.nc._transport
    assert transport is not None
    transport._io_writer.transport.abort()  # type: ignore[attr-defined]
    items = list(first.worker._items.values())
    for task in items:
        task.cancel()  # not draining: cancelled items store nothing and ack nothing
    first.task.cancel()
    await asyncio.gather(*items, return_exceptions=True)
    await asyncio.gather(first.task, return_exceptions=True)  # it dies on the closed socket


async def test_vllm_killed_worker_request_resumes_from_streamed_chunks(
    nats_url: str, vllm_engine: Any, vllm_decode_engine: Any
) -> None:
    s = isolated_settings(nats_url, worker={"model": MODEL_NAME})
    chunks, wire, final = await _migrate(
        nats_url, s, vllm_engine, vllm_decode_engine, "mig-kill", kill
    )
    check_one_stream(chunks, wire, final)
    assert chunks[0].worker_id == "first" and chunks[-1].worker_id == "second"
    assert "second" in final.workers
    # the killed worker's request no longer runs in its engine
    await until(lambda: vllm_engine.stats().running == 0, 5, "the killed worker's engine idle")
