"""Publish a request until a stream answers it, within the caller's timeout."""

from __future__ import annotations

import asyncio
import time

from nats.js import JetStreamContext
from nats.js.api import PubAck

from cplane.client.errors import NOT_STORED

_FIRST_WAIT_S = 0.05
_MAX_WAIT_S = 0.5


async def publish_request(js: JetStreamContext, subject: str, data: bytes,
                          headers: dict[str, str], timeout: float) -> PubAck:
    """JetStream-publish until a stream answers, for at most `timeout` seconds: sent
    again while the answer says nothing was stored (NOT_STORED: a cluster electing
    the stream's leader). The last such error propagates at the deadline; any
    other at once."""
    deadline = time.monotonic() + timeout
    wait = _FIRST_WAIT_S
    while True:
        left = deadline - time.monotonic()
        try:
            return await js.publish(subject, data, timeout=max(left, 0.001), headers=headers)
        except NOT_STORED:
            if deadline - time.monotonic() <= wait:
                raise
        await asyncio.sleep(wait)
        wait = min(wait * 2, _MAX_WAIT_S)
