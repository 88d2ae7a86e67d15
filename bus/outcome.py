"""Publishing a request's terminal message (Final or ErrorReply), stored by JetStream.

Used by workers (results) and the orchestrator (rejections, early cancels).
The dedup id `<request_id>:done` makes a repeated terminal publish (after a
redelivery) a no-op on LLM_DONE within the stream's duplicate window.
"""

from __future__ import annotations

import asyncio
import time

from nats.aio.client import Client as NATS

from nats.js import JetStreamContext as JetStream

from schemas.codec import encode
from schemas.messages import ErrorCode, ErrorReply, Final
from schemas.subjects import Subjects


async def publish_stored(
    js: JetStream, subject: str, data: bytes, msg_id: str | None, timeout_s: float
) -> None:
    """JetStream publish (with a dedup id when given), bounded in time (nats.py #985)."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    fut = await js.publish_async(subject, data, headers=headers)
    async with asyncio.timeout(timeout_s):
        await fut


async def publish_terminal(
    nc: NATS,
    js: JetStream,
    subjects: Subjects,
    group: str,
    msg: Final | ErrorReply,
    *,
    reply_to: str | None = None,
    timeout_s: float = 10.0,
) -> None:
    data = encode(msg)
    if reply_to:
        await nc.publish(reply_to, data)
    subject = subjects.done(group, msg.request_id)
    await publish_stored(js, subject, data, f"{msg.request_id}:done", timeout_s)


def error_reply(
    request_id: str, code: ErrorCode, message: str, retryable: bool = False
) -> ErrorReply:
    return ErrorReply(
        request_id=request_id,
        code=code,
        message=message,
        retryable=retryable,
        ts_ms=time.time() * 1000,
    )
