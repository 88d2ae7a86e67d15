"""The SDK's stream handling: order, repeats, and replay of missed chunks from LLM_OUT."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client as NATS

from bus.provision import ensure_streams
from client.sdk import Client, RequestHandle
from schemas.messages import Final, FinishReason, Request, TokenChunk
from tests.natsfix import isolated_settings


def chunk(seq: int) -> TokenChunk:
    return TokenChunk(request_id="r1", seq=seq, token_ids=[seq], text=f"<{seq}>")


async def test_chunks_in_order_without_repeats(nats_url: str, nc: NATS) -> None:
    client = Client(nc, isolated_settings(nats_url))
    h = RequestHandle(client, Request(request_id="r1", prompt="x"))
    for seq in (1, 0, 0, 2, 1, 3):  # out of order and repeated (a hand-over)
        h._take(chunk(seq))
    h._take(Final(request_id="r1", finish_reason=FinishReason.LENGTH, chunks=4))
    assert [c.seq async for c in h] == [0, 1, 2, 3]
    assert (await h.result()).chunks == 4


async def test_missed_chunks_are_replayed_from_the_out_stream(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url)
    await ensure_streams(nc.jetstream(), s)
    client = Client(nc, s)
    # chunks 0..2 went out before this handle listened; LLM_OUT captured them
    for seq in range(3):
        await nc.publish(s.subjects.out("i", "r1"), msgspec.json.encode(chunk(seq)))
    await nc.flush()
    h = RequestHandle(client, Request(request_id="r1", prompt="x"))
    h._take(chunk(3))
    h._take(Final(request_id="r1", finish_reason=FinishReason.LENGTH, chunks=4))
    assert [c.seq async for c in h] == [0, 1, 2, 3]
