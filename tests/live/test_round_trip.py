"""bus/connect.py round_trip: a server paused past the timeout answers late, and the
connection still reads afterwards (nats-py's flush(timeout) killed its read loop)."""

from __future__ import annotations

import asyncio
import os
import signal

import nats
from nats.aio.msg import Msg

from cplane.bus.connect import round_trip
from cplane.bus.server import EmbeddedNats
from tests.waiting import stopped, until


async def test_a_late_answer_leaves_the_connection_reading() -> None:
    with EmbeddedNats() as srv:
        nc = await nats.connect(srv.url)
        got: list[bytes] = []

        async def on_msg(msg: Msg) -> None:
            got.append(msg.data)

        await nc.subscribe("t.echo", cb=on_msg)
        assert await round_trip(nc, 2.0)
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:  # a signal is delivered asynchronously: the server may answer until it stops
            await until(lambda: stopped(srv.proc.pid), 5, "the server stopped")
            assert not await round_trip(nc, 0.5)  # paused: no answer in time
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.3)  # the late answer arrives (the case that broke the reader)
        await nc.publish("t.echo", b"after")
        await until(lambda: got == [b"after"], 5, "a message read after the late answer")
        assert await round_trip(nc, 2.0)
        await nc.close()
