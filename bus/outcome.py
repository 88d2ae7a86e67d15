"""Publishing to JetStream with a bounded wait, and a request's terminal message.

`StoredPublisher` bounds every `publish_async` ack in time (nats.py #985: a
future can hang forever when the server answers with an error) with one
sweeper task for all of them, instead of a timer per publish. Used by
workers (results, hand-offs) and the orchestrator (work, rejections, early
cancels). The dedup id `<request_id>:done` makes a repeated terminal publish
(after a redelivery) a no-op on LLM_DONE within the duplicate window.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext as JetStream
from nats.js.api import PubAck

from schemas.codec import encode
from schemas.messages import ErrorCode, ErrorReply, Final
from schemas.subjects import Subjects


class StoredPublisher:
    def __init__(self, js: JetStream, timeout_s: float) -> None:
        self.js = js
        self.timeout_s = timeout_s
        self._deadlines: deque[tuple[float, asyncio.Future[PubAck]]] = deque()
        self._sweeper: asyncio.Task[None] | None = None

    async def publish(self, subject: str, data: bytes, msg_id: str | None = None) -> PubAck:
        """Store `data` on `subject`; raises TimeoutError when no ack comes in time."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        fut = await self.js.publish_async(subject, data, headers=headers)
        self._deadlines.append((time.monotonic() + self.timeout_s, fut))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="ack-deadlines")
        return await fut

    async def _sweep(self) -> None:
        tick = min(0.25, self.timeout_s / 4)
        while self._deadlines:
            await asyncio.sleep(tick)
            now = time.monotonic()
            while self._deadlines:
                deadline, fut = self._deadlines[0]
                if deadline > now and not fut.done():
                    break
                self._deadlines.popleft()
                if not fut.done():
                    fut.set_exception(TimeoutError(f"no JetStream ack within {self.timeout_s} s"))

    async def publish_terminal(
        self,
        nc: NATS,
        subjects: Subjects,
        group: str,
        msg: Final | ErrorReply,
        reply_to: str | None = None,
    ) -> None:
        """Final/ErrorReply to `llm.done.<group>.<id>` (stored), and to reply_to if asked."""
        data = encode(msg)
        if reply_to:
            await nc.publish(reply_to, data)
        await self.publish(subjects.done(group, msg.request_id), data, f"{msg.request_id}:done")


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
