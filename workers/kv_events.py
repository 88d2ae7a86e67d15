"""Forward the engine's prefix-cache events to the routers (precise prefix routing).

Every `kv_events_ms` the engine's netted changes go out as one `KvEvents` on
`llm.kv.<worker_id>` (core NATS: a lost message costs a router a snapshot,
never a request). Each message has the next `seq` of this engine's `epoch`;
a router that sees a gap asks `llm.admin.kv.<worker_id>` and gets every block
held now. Large changes are split so a message stays well under max_payload.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cplane.bus.control import ADMIN_GUARD
from cplane.schemas.codec import encode
from cplane.schemas.messages import KvEvents
from cplane.schemas.subjects import Subjects
from cplane.workers.engines.base import KvEventSource

log = logging.getLogger(__name__)

MAX_HASHES_PER_MSG = 20_000  # ~400 kB of JSON at 19 digits a hash
MAX_SNAPSHOT_BLOCKS = 40_000  # the most recently used, when an engine holds more


class KvEventPump:
    def __init__(self, nc: NATS, subjects: Subjects, worker_id: str, engine: KvEventSource,
                 interval_ms: float) -> None:
        self._nc = nc
        self._subjects = subjects
        self.worker_id = worker_id
        self._engine = engine
        self._interval_s = interval_ms / 1000
        self.epoch = uuid.uuid4().hex[:12]
        self.seq = 0
        self.published = 0  # KvEvents messages sent (tests, stats)

    def _next(self, stored: list[int], removed: list[int], cleared: bool = False) -> KvEvents:
        self.seq += 1
        return KvEvents(worker_id=self.worker_id, epoch=self.epoch, seq=self.seq,
                        block_tokens=self._engine.block_tokens, stored=stored,
                        removed=removed, cleared=cleared)

    async def flush(self) -> None:
        delta = self._engine.kv_events()
        if delta is None:
            return
        subject = self._subjects.kv_events(self.worker_id)
        cleared = delta.cleared
        removed, stored = delta.removed, delta.stored
        n = MAX_HASHES_PER_MSG
        # Removals first, then stores: each block is in one list only (netted),
        # so splitting keeps every message's effect exact.
        parts = [(removed[i:i + n], True) for i in range(0, len(removed), n)] + [
            (stored[i:i + n], False) for i in range(0, len(stored), n)]
        for chunk, is_removal in parts or [([], False)]:
            ev = self._next([] if is_removal else chunk, chunk if is_removal else [], cleared)
            cleared = False
            await self._nc.publish(subject, encode(ev))
            self.published += 1

    async def _on_snapshot(self, msg: Msg) -> None:
        served = self._subjects.kv_snapshot(self.worker_id)
        if not ADMIN_GUARD.admit(msg, served) or not msg.reply:
            return
        blocks = self._engine.kv_blocks()[-MAX_SNAPSHOT_BLOCKS:]
        snap = KvEvents(worker_id=self.worker_id, epoch=self.epoch, seq=self.seq,
                        block_tokens=self._engine.block_tokens, stored=blocks, cleared=True)
        await self._nc.publish(msg.reply, encode(snap))

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self._nc.subscribe(self._subjects.kv_snapshot(self.worker_id),
                                       cb=self._on_snapshot)
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), self._interval_s)
                except TimeoutError:
                    pass
                try:
                    await self.flush()
                except Exception as exc:  # a broker outage: the routers resync by snapshot
                    log.warning("kv events not published: %s", exc)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass


__all__ = ["KvEventPump"]
