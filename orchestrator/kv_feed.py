"""Workers' KV events into the prefix index (precise prefix routing): the shell.

Subscribes `llm.kv.*`; each KvEvents of a known worker is folded into the
PrefixIndex in order. A gap (a lost message, a broker restart, this
orchestrator meeting a worker mid-life) makes it ask that worker for a
snapshot of every block it holds; until the answer, the worker's blocks are
what the index already had. Events from ids with no heartbeat are dropped, so
a stray publisher cannot grow the index. A feed started while workers run (a
switch to a prefix router: orchestrator/switches.py) asks each of them for a
snapshot at once: their caches are filled already, and what the index kept
from an earlier feed may be stale.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cplane.bus.tasks import cancel_all
from cplane.orchestrator.prefix_router import PrefixIndex
from cplane.schemas.codec import kv_events_decoder
from cplane.schemas.messages import KvEvents
from cplane.schemas.subjects import Subjects

log = logging.getLogger(__name__)


class KvFeed:
    def __init__(self, nc: NATS, subjects: Subjects, index: PrefixIndex, block_tokens: int,
                 known: Callable[[str], bool], snapshot_timeout_s: float = 2.0) -> None:
        self._nc = nc
        self._subjects = subjects
        self._index = index
        self.block_tokens = block_tokens
        self._known = known
        self._timeout_s = snapshot_timeout_s
        self._asking: set[str] = set()
        self._warned: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None
        self.applied = 0
        self.snapshots = 0
        self.dropped = 0  # undecodable, unknown worker, other block size

    async def start(self, resync: Iterable[str] = ()) -> None:
        """Subscribe; then ask each worker in `resync` for a snapshot."""
        self._sub = await self._nc.subscribe(self._subjects.kv_events_all, cb=self._on_msg)
        for worker_id in resync:
            self._ask(worker_id)

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
        await cancel_all(list(self._tasks))

    def _usable(self, ev: KvEvents, subject_worker: str | None) -> bool:
        if subject_worker is not None and ev.worker_id != subject_worker:
            return False
        if not self._known(ev.worker_id):
            return False
        if ev.block_tokens != self.block_tokens:
            if ev.worker_id not in self._warned:
                self._warned.add(ev.worker_id)
                log.warning("worker %s caches blocks of %d tokens, routers hash %d "
                            "(orchestrator.prefix_block_tokens): its KV events are ignored",
                            ev.worker_id, ev.block_tokens, self.block_tokens)
            return False
        return True

    def fold(self, ev: KvEvents) -> bool:
        """Apply one message; False = events were missed (the caller resyncs)."""
        ok = self._index.apply(ev.worker_id, ev.epoch, ev.seq, ev.stored, ev.removed,
                               ev.cleared)
        if ok:
            self.applied += 1
        return ok

    async def _on_msg(self, msg: Msg) -> None:
        try:
            ev = kv_events_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self.dropped += 1
            return
        if not self._usable(ev, Subjects.last_token(msg.subject)):
            self.dropped += 1
            return
        if not self.fold(ev):
            self._ask(ev.worker_id)

    def _ask(self, worker_id: str) -> None:
        if worker_id in self._asking:
            return
        self._asking.add(worker_id)
        task = asyncio.create_task(self._resync(worker_id), name="kv-snapshot")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resync(self, worker_id: str) -> None:
        try:
            reply = await self._nc.request(self._subjects.kv_snapshot(worker_id), b"",
                                           timeout=self._timeout_s)
            ev = kv_events_decoder.decode(reply.data)
            if self._usable(ev, worker_id):
                self.snapshots += 1
                self.fold(ev)
        except Exception as exc:  # no answer: the next gap asks again
            log.info("kv snapshot of %s failed: %s", worker_id, exc)
        finally:
            self._asking.discard(worker_id)


__all__ = ["KvFeed"]
