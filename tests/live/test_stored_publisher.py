"""StoredPublisher (pipelined JetStream publishes) against a real server."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import APIError, NoStreamResponseError

from cplane.bus.outcome import StoredPublisher


async def test_acks_dedup_and_errors(nc: NATS) -> None:
    js = nc.jetstream()
    await js.add_stream(name="SP_TEST", subjects=["sp.test.*"], max_msgs=3, discard="new")
    pub = StoredPublisher(nc, timeout_s=2.0)
    acks = await asyncio.gather(*(pub.publish("sp.test.a", b"x", f"id{i}") for i in range(2)))
    assert sorted(a["seq"] for a in acks) == [1, 2] and acks[0]["stream"] == "SP_TEST"
    again = await pub.publish("sp.test.a", b"x", "id0")
    assert again.get("duplicate") is True
    await pub.publish("sp.test.a", b"x")
    with pytest.raises(APIError, match="maximum messages"):
        await pub.publish("sp.test.a", b"x")
    with pytest.raises(NoStreamResponseError):
        await pub.publish("sp.nostream", b"x")
    await js.delete_stream("SP_TEST")


async def test_a_missing_ack_times_out(nc: NATS) -> None:
    async def swallow(msg: Msg) -> None:  # a responder that never answers
        return None

    sub = await nc.subscribe("sp.silent", cb=swallow)
    pub = StoredPublisher(nc, timeout_s=0.3)
    with pytest.raises(TimeoutError):
        await pub.publish("sp.silent", b"x")
    assert not pub._pending
    await sub.unsubscribe()
