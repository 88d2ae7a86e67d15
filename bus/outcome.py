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
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import APIError, NoStreamResponseError

from cplane.bus.fins import FinSignals
from cplane.schemas.codec import encode
from cplane.schemas.messages import (
    ErrorCode,
    ErrorReply,
    Final,
    FinishReason,
    Timings,
    Usage,
    WorkItem,
)
from cplane.schemas.subjects import Subjects


class StoredPublisher:
    """JetStream publishes with pipelined acks on one wildcard inbox.

    nats-py's publish_async costs a NUID, an urandom call, a stdlib-json parse
    and a PubAck dataclass per message; on the hot path (one Final per
    request, one work message per batch) this does the same protocol with a
    counter and orjson. At most `max_pending` acks are outstanding; every ack
    is bounded in time by one sweeper task (nats.py #985: an error reply must
    never leave a publisher waiting forever).
    """

    def __init__(self, nc: NATS, timeout_s: float, max_pending: int = 4000,
                 signer: str = "") -> None:
        self.nc = nc
        self.signer = signer  # names this publisher's in-flight signals (llm.fin.<signer>)
        self.fins = FinSignals(nc)
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._next = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._room = asyncio.Event()
        self._room.set()
        self._deadlines: deque[tuple[float, int]] = deque()
        self._sweeper: asyncio.Task[None] | None = None

    async def publish(
        self, subject: str, data: bytes, msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Store `data` on `subject`; returns the ack (`seq`, `duplicate`...).

        Raises TimeoutError without an ack in time, NoStreamResponseError when
        no stream takes the subject, APIError when the stream refuses it.
        """
        if self._sub is None:
            self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        while len(self._pending) >= self.max_pending:
            self._room.clear()
            await self._room.wait()
        n = self._next
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[n] = fut
        self._deadlines.append((time.monotonic() + self.timeout_s, n))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="ack-deadlines")
        if msg_id:
            headers = {**(headers or {}), "Nats-Msg-Id": msg_id}
        try:
            await self.nc.publish(subject, data, reply=f"{self._inbox}.{n}", headers=headers)
        except BaseException:
            self._pending.pop(n, None)
            raise
        return await fut

    def _resolve(self, n: int) -> asyncio.Future[dict[str, Any]] | None:
        fut = self._pending.pop(n, None)
        if len(self._pending) < self.max_pending:
            self._room.set()
        return fut if fut is not None and not fut.done() else None

    async def _on_ack(self, msg: Msg) -> None:
        fut = self._resolve(int(msg.subject.rpartition(".")[2]))
        if fut is None:
            return
        if not msg.data:
            status = msg.headers.get("Status") if msg.headers else None
            fut.set_exception(NoStreamResponseError() if status == "503" else
                              APIError(description=f"unexpected status {status}"))
            return
        resp = orjson.loads(msg.data)
        error = resp.get("error")
        if error:
            try:
                APIError.from_error(error)  # raises the specific subclass
            except APIError as exc:
                fut.set_exception(exc)
            return
        fut.set_result(resp)

    async def _sweep(self) -> None:
        tick = min(0.25, self.timeout_s / 4)
        while self._deadlines:
            await asyncio.sleep(tick)
            now = time.monotonic()
            while self._deadlines and self._deadlines[0][0] <= now:
                fut = self._resolve(self._deadlines.popleft()[1])
                if fut is not None:
                    fut.set_exception(TimeoutError(f"no JetStream ack within {self.timeout_s} s"))

    async def publish_terminal(
        self,
        nc: NATS,
        subjects: Subjects,
        group: str,
        msg: Final | ErrorReply,
        reply_to: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Final/ErrorReply to `llm.done.<group>.<id>` (stored), and to reply_to if asked;
        `headers` (a traceparent) go with both."""
        data = encode(msg)
        if reply_to:
            await nc.publish(reply_to, data, headers=headers)
        await self.publish(subjects.done_store(group, msg.request_id), data,
                           terminal_msg_id(group, msg.request_id), headers)
        self.terminal_stored(subjects, msg)

    def terminal_stored(self, subjects: Subjects, msg: Final | ErrorReply) -> None:
        """Tell the orchestrators that `msg` is stored, without the payload (batched,
        best effort). Called after the store, never before."""
        ttft = (msg.timings.ttft_ms if isinstance(msg, Final) and msg.usage.completion_tokens
                else -1.0)
        self.fins.add(subjects.fin(self.signer or msg.request_id), msg.request_id, ttft)


def terminal_msg_id(group: str, request_id: str) -> str:
    """The Nats-Msg-Id of a request's terminal: a repeat within the window is a no-op.
    Scoped like the request (`<tenant>.<id>`): two tenants' ids never dedupe each other."""
    return f"{Subjects.scoped_id(group, request_id)}:done"


def cancelled_final(item: WorkItem, worker_id: str | None = None) -> Final:
    """Final(cancelled) for a request stopped before (or between) runs: what was
    already streamed stays its result; `worker_id` is the one that stopped it."""
    now = time.time() * 1000
    waited = max(0.0, now - (item.enqueued_ms or now))
    return Final(
        request_id=item.request.request_id,
        finish_reason=FinishReason.CANCELLED,
        usage=Usage(completion_tokens=len(item.resume_token_ids)),
        timings=Timings(queue_ms=waited, e2e_ms=waited),
        text=item.resume_text,
        chunks=item.next_seq,
        workers=[*item.served_by, *([worker_id] if worker_id else [])],
        ts_ms=now,
    )


def error_reply(
    request_id: str, code: ErrorCode, message: str, retryable: bool = False,
    retry_after_ms: float | None = None,
) -> ErrorReply:
    return ErrorReply(
        request_id=request_id,
        code=code,
        message=message,
        retryable=retryable,
        retry_after_ms=retry_after_ms,
        ts_ms=time.time() * 1000,
    )


async def send_again(nc: NATS, subjects: Subjects, item: WorkItem,
                     term: Final | ErrorReply) -> bool:
    """A request's stored terminal, sent again (core: not stored a second time) on its
    live subject and reply_to, to a copy published after it was stored (an id
    published again); a copy published before it had its readers subscribed when
    the stored one went out, and they get it once. True when sent."""
    req = item.request
    if term.ts_ms >= item.enqueued_ms:
        return False
    await publish_again(nc, subjects, req.group, req.request_id, req.reply_to, term)
    return True


async def publish_again(nc: NATS, subjects: Subjects, group: str, request_id: str,
                        reply_to: str | None, term: Final | ErrorReply) -> None:
    """A stored terminal, published again with a core publish on its id's done
    subject and its reply_to (never stored twice)."""
    data = encode(term)
    await nc.publish(subjects.done(group, request_id), data)
    if reply_to:
        await nc.publish(reply_to, data)
