"""Continuous pulling from a durable JetStream consumer, one message at a time.

nats-py's `fetch(n, timeout)` returns a batch only when it is full or the
timeout passes, once its long poll has started: a lone message can wait the
whole timeout (measured: p99 publish->first token of 2 s with a 2 s timeout).
This puller keeps pull requests outstanding for as many messages as its owner
has room for, and hands each message to `handler` the moment it arrives.

Credits: each pull request asks for `batch` messages and expires after
`expires_s`. Delivered messages consume the oldest request's credits first;
a request whose expiry has passed (plus a grace) returns its unused credits,
so the count heals itself after a reconnect or a lost status message.

A consumer that is gone (deleted under us: `409 Consumer Deleted`, or pull
requests with no responder: `503`, `404`) is reported to `on_gone` at most
once per `_GONE_EVERY_S`: the owner re-creates it. Pulls do not fail silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("cplane.puller")
_GRACE_S = 0.5
_GONE_EVERY_S = 1.0


class Puller:
    def __init__(
        self,
        nc: NATS,
        stream: str,
        durable: str,
        handler: Callable[[Msg], Awaitable[None]],
        room: Callable[[], int],
        *,
        expires_s: float = 5.0,
        min_batch: int = 1,
        max_batch: int = 256,
        api_prefix: str = "$JS.API",
        on_gone: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self._nc = nc
        self._handler = handler
        self._room = room  # how many more messages the owner can take now
        self._expires_s = expires_s
        self._min_batch = min_batch
        self._max_batch = max_batch
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._requests: deque[list[float]] = deque()  # [expires_at, credits left]
        self._outstanding = 0
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.delivered = 0
        self._on_gone = on_gone
        self._gone_at = -_GONE_EVERY_S
        self._gone_task: asyncio.Task[None] | None = None

    @property
    def outstanding(self) -> int:
        return self._outstanding

    async def start(self) -> None:
        inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(inbox, cb=self._on_msg, pending_msgs_limit=-1,
                                             pending_bytes_limit=-1)
        self._inbox = inbox
        self._task = asyncio.create_task(self._loop(), name=f"puller-{self._next_subject}")
        # One ticker wakes the loop to expire requests; cheaper than a timeout per wait.
        self._ticker = asyncio.create_task(self._tick(), name="puller-tick")

    async def stop(self, linger: bool = False) -> None:
        """Stop asking for messages and unsubscribe. `linger`: in between, keep receiving
        until the pull requests already sent are used up or expired (at most
        `expires_s` + a grace): what the server still delivers for them reaches the
        handler (which can give it back at once) instead of an abandoned inbox, where
        it would wait out the consumer's ack_wait before anyone else may have it."""
        for task in (self._task, self._ticker, self._gone_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._ticker = self._gone_task = None
        if linger and self._requests:
            deadline = max(r[0] for r in self._requests) + _GRACE_S
            while self._outstanding > 0 and (left := deadline - time.monotonic()) > 0:
                self._wake.clear()  # set by every delivery and status message
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(min(_GRACE_S, self._expires_s / 2))
            self._wake.set()

    def poke(self) -> None:
        """The owner's room grew: request more."""
        self._wake.set()

    def _expire(self, now: float) -> None:
        while self._requests and self._requests[0][0] + _GRACE_S < now:
            self._outstanding -= int(self._requests.popleft()[1])

    async def _loop(self) -> None:
        while True:
            now = time.monotonic()
            self._expire(now)
            want = min(self._room() - self._outstanding, self._max_batch)
            if want >= self._min_batch or (want > 0 and self._outstanding == 0):
                req = {"batch": want, "expires": int(self._expires_s * 1e9)}
                self._requests.append([now + self._expires_s, want])
                self._outstanding += want
                try:
                    await self._nc.publish(self._next_subject, orjson.dumps(req), self._inbox)
                except Exception as exc:  # disconnected: credits expire and heal
                    log.debug("pull request failed: %s", exc)
                    await asyncio.sleep(0.2)
                continue
            self._wake.clear()
            await self._wake.wait()

    def _gone(self) -> None:
        now = time.monotonic()
        if self._on_gone is None or now - self._gone_at < _GONE_EVERY_S or (
                self._gone_task is not None and not self._gone_task.done()):
            return
        self._gone_at = now
        log.warning("consumer of %s is gone: re-creating it", self._next_subject)
        self._gone_task = asyncio.create_task(self._on_gone(), name="puller-gone")

    def _consume_credit(self) -> None:
        while self._requests:
            head = self._requests[0]
            if head[1] > 0:
                head[1] -= 1
                self._outstanding -= 1
                if head[1] == 0:
                    self._requests.popleft()
                return
            self._requests.popleft()

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.data and msg.headers and "Status" in msg.headers:
            # 408 request expired / 409 limits / 100 heartbeat: the server says a
            # request ended early; drop the oldest request's credits.
            status = msg.headers.get("Status")
            if status in ("408", "409", "404", "503") and self._requests:
                self._outstanding -= int(self._requests.popleft()[1])
                self._wake.set()
            description = str(msg.headers.get("Description", ""))
            if status in ("404", "503") or "Consumer Deleted" in description:
                self._gone()
            return
        self._consume_credit()
        self.delivered += 1
        try:
            await self._handler(msg)
        finally:
            self._wake.set()
