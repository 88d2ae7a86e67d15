"""The broker goes away and comes back: nothing accepted is lost, every chunk can be replayed.

Each test runs its own nats-server (EmbeddedNats with a private store dir and
a fixed port) so it can be stopped with SIGTERM or killed with SIGKILL and
started again on the same port and store, while the session's server serves
the other tests.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.errors import NoRespondersError
from nats.js.errors import NoStreamResponseError

from cplane.bus.connect import connect
from cplane.bus.provision import ensure_all, ensure_streams, stream_configs
from cplane.bus.replay import streamed_chunks
from cplane.bus.server import EmbeddedNats, free_port
from cplane.client.sdk import Client, RequestHandle, Unavailable
from cplane.schemas.codec import encode
from cplane.schemas.messages import Final, FinishReason, Request, TokenChunk
from tests.natsfix import isolated_settings
from tests.stack import stack

# ~600 decode steps of ~7 ms (simulated time, ~4 s): the request is still generating
# when the broker comes back, even on a busy machine.
SLOW = {"sim": {"zero_cost": False}, "worker": {"chunk_tokens": 8}}
LONG = 600


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    srv = EmbeddedNats(port=free_port(), store_dir=str(tmp_path)).start()
    try:
        yield srv
    finally:
        srv.stop()


def bounce(srv: EmbeddedNats, how: str) -> None:
    """Stop the server the way `how` says and start it again on the same port and store."""
    srv.kill() if how == "kill" else srv.terminate()
    srv.start()


async def collect(handle: RequestHandle, first: TokenChunk, timeout_s: float) -> list[TokenChunk]:
    out = [first]
    async with asyncio.timeout(timeout_s):
        async for chunk in handle:
            out.append(chunk)
    return out


async def stream_names(url: str) -> set[str]:
    nc = await nats.connect(url)
    try:
        return {i.config.name or "" for i in await nc.jetstream().streams_info()}
    finally:
        await nc.close()


@pytest.mark.parametrize("how", ["terminate", "kill"])
async def test_request_in_flight_completes_across_a_broker_restart(
    server: EmbeddedNats, how: str
) -> None:
    """SIGTERM / SIGKILL mid-generation: streams survive, the request completes, no seq is
    missing or repeated, and LLM_OUT holds every chunk afterwards (file storage)."""
    s = isolated_settings(server.url, **SLOW)  # type: ignore[arg-type]
    client = await Client.connect(server.url, s, default_timeout_s=60)
    try:
        async with stack(s, workers=1):
            queued = await client.submit(Request(request_id=f"q-{how}", prompt="q",
                                                 max_tokens=40, temperature=0.7))
            handle = await client.submit(Request(request_id=f"r-{how}", prompt="hello",
                                                 max_tokens=LONG, temperature=0.7))
            first = await asyncio.wait_for(anext(aiter(handle)), 30)  # generation has begun
            down_ms = time.time() * 1000
            bounce(server, how)
            up_ms = time.time() * 1000
            chunks = await collect(handle, first, 60)
            final = await handle.result(timeout=60)
            assert (await queued.result(timeout=60)).finish_reason == FinishReason.LENGTH
        assert final.finish_reason == FinishReason.LENGTH
        # The broker really went away mid-generation: chunks were made after it came back.
        assert first.ts_ms < down_ms and max(c.ts_ms for c in chunks) > up_ms
        assert [c.seq for c in chunks] == list(range(final.chunks))
        assert sum(len(c.token_ids) for c in chunks) == final.usage.completion_tokens == LONG
        # Every chunk is still in LLM_OUT, in order, with the tokens the client saw.
        stored = await streamed_chunks(client.js, s, "i", handle.request_id)
        assert [c.token_ids for c in stored] == [c.token_ids for c in chunks]
        assert {c.name for c in stream_configs(s)} <= await stream_names(server.url)
    finally:
        await client.close()


@pytest.mark.parametrize("how", ["terminate", "kill"])
async def test_finished_request_replays_from_out_after_a_restart(
    server: EmbeddedNats, how: str
) -> None:
    """A client attaching after the restart gets every chunk and the stored Final."""
    # 1 ms steps: one chunk per token (zero-cost steps would hand over all 50 at once).
    s = isolated_settings(server.url, sim={"prefill_a_ms": 1.0, "decode_a_ms": 1.0})
    client = await Client.connect(server.url, s)
    try:
        async with stack(s, workers=1):
            handle = await client.submit(Request(request_id="done-1", prompt="p", max_tokens=50))
            before = [c async for c in handle]
            final = await handle.result(timeout=30)
        await client.close()
        bounce(server, how)
        client = await Client.connect(server.url, s)
        again = await client.attach("done-1")
        assert await again.result(timeout=10) == final
        after = [c async for c in again]
        assert [(c.seq, c.token_ids) for c in after] == [(c.seq, c.token_ids) for c in before]
        assert len(after) == final.chunks > 1
    finally:
        await client.close()


async def test_outputs_published_while_the_client_was_away_reach_it(
    server: EmbeddedNats,
) -> None:
    """Chunks and a Final stored right after a restart reach a handle that was waiting:
    live if its subscription is back by then, else through its reconnect recovery."""
    s = isolated_settings(server.url)
    client = await Client.connect(server.url, s)
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        await ensure_streams(nc.jetstream(), s)
        handle = await client.attach("away-1")
        server.kill()
        server.start()
        js = nc.jetstream()
        for seq in range(4):
            chunk = TokenChunk(request_id="away-1", seq=seq, token_ids=[seq], text=str(seq))
            await _publish_when_ready(js, s.subjects.out_store("i", "away-1"), encode(chunk))
        await _publish_when_ready(js, s.subjects.done_store("i", "away-1"), encode(
            Final(request_id="away-1", finish_reason=FinishReason.STOP, chunks=4, text="0123")))
        assert (await handle.result(timeout=30)).text == "0123"
        assert [c.seq async for c in handle] == [0, 1, 2, 3]
    finally:
        await nc.close()
        await client.close()


async def test_on_reconnect_recreates_what_a_restart_lost(server: EmbeddedNats) -> None:
    """The broker comes back with an empty store: the service's on_reconnect hook
    (bus.connect, retried while JetStream is not ready) re-runs ensure_all."""
    s = isolated_settings(server.url)
    ran = asyncio.Event()

    async def hook() -> None:
        await ensure_all(nc.jetstream(), s)
        ran.set()

    nc = await connect(server.url, "restart-test", on_reconnect=hook)
    try:
        await ensure_all(nc.jetstream(), s)
        server.kill()
        shutil.rmtree(Path(server.store_dir, "js"))  # the store lost every stream
        server.start()
        await asyncio.wait_for(ran.wait(), 30)
        js = nc.jetstream()
        names = {i.config.name for i in await js.streams_info()}
        assert {c.name for c in stream_configs(s)} | {f"KV_{s.subjects.leases_bucket}"} <= names
        assert len(await js.consumers_info(s.streams.req.name)) == 5
    finally:
        await nc.close()


async def _publish_when_ready(js: nats.js.JetStreamContext, subject: str, data: bytes) -> None:
    """JetStream answers 503 for a moment after a restart: retry until the store takes it."""
    async with asyncio.timeout(20):
        while True:
            try:
                await js.publish(subject, data, timeout=1.0)
                return
            except (NoStreamResponseError, NoRespondersError, TimeoutError, nats.errors.Error):
                await asyncio.sleep(0.1)  # back-off between tries, bounded by the timeout


async def test_ensure_all_recreates_streams_deleted_while_services_run(
    nats_url: str,
) -> None:
    """The broker's store lost LLM_REQ, LLM_OUT and LLM_DONE under running services:
    a publish is refused (no stream), ensure_all re-creates them with their consumers,
    and the next request completes end to end."""
    s = isolated_settings(nats_url, sim={"zero_cost": True})
    client = await Client.connect(nats_url, s)
    js = client.js
    try:
        async with stack(s, workers=1):
            await client.generate(Request(request_id="before", prompt="p", max_tokens=5),
                                  timeout=30)
            for key in ("req", "out", "done"):
                await js.delete_stream(getattr(s.streams, key).name)
            with pytest.raises(Unavailable, match="no stream"):
                await client.submit(Request(request_id="lost", prompt="p", max_tokens=5),
                                    timeout=1.0)
            await ensure_all(js, s)
            await ensure_all(js, s)  # idempotent
            names = {i.config.name for i in await js.streams_info()}
            assert {c.name for c in stream_configs(s)} <= names
            consumers = {c.name for c in await js.consumers_info(s.streams.req.name)}
            assert len(consumers) == 5
            handle = await client.submit(Request(request_id="after", prompt="p", max_tokens=5))
            final = await handle.result(timeout=30)
            assert final.chunks == len([c async for c in handle]) > 0
    finally:
        await client.close()

