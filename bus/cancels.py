"""Which requests were cancelled: stored in LLM_CANCEL, known to every process.

`llm.cancel.<request_id>` is a plain publish that the LLM_CANCEL stream
captures (one hour by default). A tenant's cancel arrives as
`llm.cancel.<tenant>.<request_id>` (the server maps it from the tenant's
account) and cancels that tenant's request of that id only (`cancels`); an
operator's plain cancel names the id in any scope. A `CancelBook` loads the stream once at start
and again after every reconnect (cancels sent while this process was away),
and follows live cancels on a core subscription. So a worker started after a
cancel, or an orchestrator restarted, still honours it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Container

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from cplane.bus.recent import RecentIds
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import Subjects

log = logging.getLogger("cplane.cancels")
OnCancel = Callable[[str], Awaitable[None]]  # called with the cancel key


def cancel_names(key: str, group: str, request_id: str) -> bool:
    """True when a cancel key (`Subjects.cancel_key`) names this request: its plain
    id, or `<tenant>.<id>` from the tenant that owns it (a scoped group)."""
    return key == request_id or ("." in group and key == Subjects.scoped_id(group, request_id))


def key_request_id(key: str) -> str:
    """The request id a cancel key names."""
    return key.rpartition(".")[2]


def is_cancelled(book: Container[str], group: str, request_id: str) -> bool:
    """A cancel that names this request is in `book` (see `cancel_names`)."""
    return request_id in book or (
        "." in group and Subjects.scoped_id(group, request_id) in book)


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
        await self._add(self._settings.subjects.cancel_key(msg.subject))

    def cancels(self, group: str, request_id: str) -> bool:
        return is_cancelled(self._ids, group, request_id)

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
                        await self._add(self._settings.subjects.cancel_key(msg.subject))
                        if msg.metadata.num_pending == 0:
                            break
            finally:
                await sub.unsubscribe()
        except Exception as exc:  # the live subscription still works; say what was missed
            log.warning("could not load stored cancels (%d read): %s", n, exc)
        return n
