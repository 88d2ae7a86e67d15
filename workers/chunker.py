"""Streams one request's tokens as TokenChunks on core NATS.

What one engine step produced for the request (one `add`) goes out at once:
at most one message per request per step, and no token waits for a timer.
An engine that falls behind hands over several steps' tokens at a time (the
sim engine and vLLM merge them), so the message count drops under load by
itself. Operators who want fewer messages set `min_interval_s`: after a
chunk, tokens gather until it has passed (or `max_tokens` are waiting); the
first token always goes alone and at once (TTFT). Never one JetStream ack per
token: chunks are plain core publishes that the LLM_OUT stream captures.

Fenced: each chunk carries `Nats-Msg-Id: <request id>:<seq>`, so LLM_OUT
stores the first content of a seq and drops any other inside its duplicate
window (two workers writing one request after a pause), and the run's fence
headers (`store_fence`: LLM_OUT stores it only while no newer run fence was
written for the request, however late it arrives), and no chunk goes out
while this worker's fence is closed (workers/fence.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from cplane.schemas.codec import encode
from cplane.schemas.messages import TokenChunk
from cplane.workers.fence import Fence, cancel_requested, fenced


class Publish(Protocol):
    """nats-py's `Client.publish` (core publish), or a test's sink."""

    async def __call__(self, subject: str, payload: bytes = b"", reply: str = "",
                       headers: dict[str, str] | None = None) -> None: ...


def chunk_msg_id(request_id: str, seq: int) -> str:
    """A chunk's Nats-Msg-Id: one content per seq is stored."""
    return f"{request_id}:{seq}"


class ChunkStream:
    def __init__(
        self,
        publish: Publish,
        subjects: list[str],
        request_id: str,
        worker_id: str,
        *,
        next_seq: int = 0,
        max_tokens: int = 16,
        min_interval_s: float = 0.0,
        epoch: int = 0,
        gate: asyncio.Event | None = None,
        fence: Fence | None = None,
        msg_key: str | None = None,
        store_fence: dict[str, str] | None = None,
    ) -> None:
        self._publish = publish
        # Headers LLM_OUT checks (run_fence.py), on every chunk and the stream's Final.
        self.store_fence = store_fence or {}
        # Names the chunks' Nats-Msg-Ids: the request scoped by tenant (`<tenant>.<id>`).
        self._msg_key = msg_key or request_id
        self._subjects = subjects  # output subject, plus reply_to when asked for
        self.request_id = request_id
        self.worker_id = worker_id
        self.next_seq = next_seq
        self.first_seq = next_seq
        # The connection's reconnect count when this stream began: if it changed,
        # a chunk may have died in a socket buffer and is re-sent from `sent`.
        self.epoch = epoch
        self.sent: list[bytes] = []  # encoded chunk first_seq + i, exactly as published
        # Closed while the connection is down and until the worker knows it still
        # owns the request: chunks wait here instead of in nats-py's reconnect buffer.
        self._gate = gate
        self._fence = fence
        self._max_tokens = max_tokens
        self._min_interval_s = min_interval_s
        self._ids: list[int] = []
        self._text: list[str] = []
        self._last_flush = 0.0  # monotonic time of the last chunk
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Future[None] | None = None  # a timer's flush, kept referenced
        self._sent_any = False
        self.first_token_ms: float | None = None
        self.last_token_ms: float | None = None
        self.tokens_sent = 0
        self.token_ids: list[int] = []  # everything sent, for hand-back and Final
        self.text_parts: list[str] = []

    async def add(self, token_ids: list[int], text: str) -> None:
        if not token_ids and not text:
            return
        now = time.time() * 1000
        if self.first_token_ms is None:
            self.first_token_ms = now
        self.last_token_ms = now
        self._ids.extend(token_ids)
        self._text.append(text)
        if self._min_interval_s <= 0 or not self._sent_any or len(self._ids) >= self._max_tokens:
            await self.flush()
            return
        wait = self._last_flush + self._min_interval_s - time.monotonic()
        if wait <= 0:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._ids or self._text:
            self._flushing = asyncio.ensure_future(self.flush())

    async def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._gate is not None and not self._gate.is_set():
            await self._gate.wait()
        if self._fence is not None and (not self._fence.open() or cancel_requested()):
            await fenced(self._fence)  # raises CancelledError when this run was lost
        if not self._ids and not self._text:
            return
        ids, self._ids = self._ids, []
        text = "".join(self._text)
        self._text = []
        chunk = TokenChunk(
            request_id=self.request_id,
            seq=self.next_seq,
            token_ids=ids,
            text=text,
            ts_ms=time.time() * 1000,
            worker_id=self.worker_id,
        )
        # seq, bookkeeping and the publish happen without an await in between,
        # so concurrent flushes (timer vs. add) still go out in seq order.
        self.next_seq += 1
        self._sent_any = True
        self._last_flush = time.monotonic()
        self.tokens_sent += len(ids)
        self.token_ids.extend(ids)
        self.text_parts.append(text)
        data = encode(chunk)
        self.sent.append(data)
        await self._send(chunk.seq, data)

    async def resend(self, seqs: list[int]) -> None:
        """Publish chunks again, byte for byte (readers drop the seqs they have);
        none when this run was lost (cancelled), though a read swallowed it."""
        if cancel_requested():
            raise asyncio.CancelledError
        for seq in seqs:
            await self._send(seq, self.sent[seq - self.first_seq])

    async def _send(self, seq: int, data: bytes) -> None:
        store, *copies = self._subjects  # the stored subject, then reply_to
        await self._publish(store, data, headers={
            "Nats-Msg-Id": chunk_msg_id(self._msg_key, seq), **self.store_fence})
        for subject in copies:
            await self._publish(subject, data)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
