"""Stream and consumer provisioning against a real server: idempotent, updatable."""

from __future__ import annotations

import asyncio

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus.provision import ensure_request_consumers, ensure_streams
from client.sdk import Client
from schemas.messages import Request
from tests.natsfix import isolated_settings
from tests.stack import stack


async def test_ensure_streams_is_idempotent_and_applies_new_limits(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url)
    js = nc.jetstream()
    await ensure_streams(js, s)
    await ensure_streams(js, s)  # no error the second time
    await ensure_request_consumers(js, s)
    await ensure_request_consumers(js, s)
    info = await js.stream_info(s.streams.req.name)
    assert info.config.retention == "workqueue" and info.config.discard == "new"
    assert info.config.duplicate_window == 120.0
    assert sorted(info.config.subjects or []) == sorted(
        f"{s.subjects.prefix}.req.{p}.*" for p in ("critical", "high", "normal", "low", "background")
    )
    assert (await js.stream_info(s.streams.out.name)).config.storage == "memory"
    bigger = msgspec.structs.replace(
        s, streams=msgspec.structs.replace(
            s.streams, req=msgspec.structs.replace(s.streams.req, max_msgs=77)))
    await ensure_streams(js, bigger)
    assert (await js.stream_info(s.streams.req.name)).config.max_msgs == 77
    consumers = {c.name for c in await js.consumers_info(s.streams.req.name)}
    assert consumers == {f"orch-{p}" for p in ("critical", "high", "normal", "low", "background")}


async def test_reply_to_gets_every_output_too(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True})
    got: list[bytes] = []

    async def on(msg: Msg) -> None:
        got.append(msg.data)

    sub = await nc.subscribe("my.inbox.r1", cb=on)
    async with stack(s, workers=1):
        client = Client(nc, s)
        final = await client.generate(Request(request_id="rt1", prompt="x", max_tokens=5,
                                              reply_to="my.inbox.r1"), timeout=10)
        await asyncio.sleep(0.1)
    await sub.unsubscribe()
    kinds = [msgspec.json.decode(d)["type"] for d in got]
    assert kinds[-1] == "final" and kinds.count("final") == 1
    assert len(kinds) - 1 == final.chunks
