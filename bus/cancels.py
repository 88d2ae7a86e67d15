"""Which requests were cancelled: stored in LLM_CANCEL, known to every process.

`llm.cancel.<request_id>` is a plain publish that the LLM_CANCEL stream
captures (one hour by default). A `CancelBook` loads the stream once at start
and again after every reconnect (cancels sent while this process was away),
and follows live cancels on a core subscription. So a worker started after a
cancel, or an orchestrator restarted, still honours it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from cplane.bus.recent import RecentIds
from cplane.schemas.settings import Settings

log = logging.getLogger("cplane.cancels")
OnCancel = Callable[[str], Awaitable[None]]


class CancelBook:
    def __init__(self, nc: NATS, settings: Settings, on_cancel: OnCancel | None = None,
                 limit: int = 1_000_000) -> None:
        self._nc = nc
        self._settings = settings
        self._on_cancel = on_cancel
        self._ids = RecentIds(limit)
        self._sub: Subscription | None = None

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._settings.subjects.cancel_all, cb=self._on_msg)
        await self.load()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        await self._add(self._settings.subjects.last_token(msg.subject))

    async def _add(self, request_id: str) -> None:
        if self._ids.add(request_id) and self._on_cancel is not None:
            await self._on_cancel(request_id)

    async def load(self, timeout_s: float = 5.0) -> int:
        """Read every cancel stored in LLM_CANCEL; returns how many were read."""
        js = self._nc.jetstream()
        n = 0
        try:
            info = await js.stream_info(self._settings.streams.cancel.name)
            if not info.state.messages:
                return 0
            sub = await js.subscribe(self._settings.subjects.cancel_all, ordered_consumer=True,
                                     deliver_policy=DeliverPolicy.ALL)
            try:
                async with asyncio.timeout(timeout_s):
                    while True:
                        msg = await sub.next_msg(timeout_s)
                        n += 1
                        await self._add(self._settings.subjects.last_token(msg.subject))
                        if msg.metadata.num_pending == 0:
                            break
            finally:
                await sub.unsubscribe()
        except Exception as exc:  # the live subscription still works; say what was missed
            log.warning("could not load stored cancels (%d read): %s", n, exc)
        return n
