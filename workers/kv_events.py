"""Forward the engine's prefix-cache events to the routers (precise prefix routing).

Every `kv_events_ms` while the engine works (and at least once a second while
it idles) the engine's netted changes go out as one `KvEvents` on
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
QUIET_TICKS = 10  # ticks with no change before the pump idles until poked
IDLE_CHECK_S = 1.0  # an idle pump still looks this often (an engine others feed too)
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
        self.ticks = 0  # looks at the engine (tests: an idle pump rarely looks)
        self._quiet = 0  # ticks in a row that found nothing
        self._poked = asyncio.Event()

    def poke(self) -> None:
        """Work arrived: the cache will change, look every tick again."""
        self._quiet = 0
        self._poked.set()

    def _next(self, stored: list[int], removed: list[int], cleared: bool = False) -> KvEvents:
        self.seq += 1
        return KvEvents(worker_id=self.worker_id, epoch=self.epoch, seq=self.seq,
                        block_tokens=self._engine.block_tokens, stored=stored,
                        removed=removed, cleared=cleared)

    async def flush(self) -> None:
        self.ticks += 1
        delta = self._engine.kv_events()
        if delta is None:
            self._quiet += 1
            return
        self._quiet = 0
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

    async def _idle(self, stop: asyncio.Event) -> None:
        """Until poked, stopped, or IDLE_CHECK_S."""
        self._poked.clear()
        waits = {asyncio.ensure_future(self._poked.wait()), asyncio.ensure_future(stop.wait())}
        _, pending = await asyncio.wait(waits, timeout=IDLE_CHECK_S,
                                        return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            w.cancel()

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self._nc.subscribe(self._subjects.kv_snapshot(self.worker_id),
                                       cb=self._on_snapshot)
        try:
            while not stop.is_set():
                if self._quiet >= QUIET_TICKS:  # idle: a tick 50 times a second cost an
                    await self._idle(stop)      # idle worker 8 ms of CPU a second
                    if stop.is_set():
                        break
                await asyncio.sleep(self._interval_s)  # a stop waits one tick
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
