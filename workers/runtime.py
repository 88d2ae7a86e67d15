"""The worker service: pulls work within its capacity, serves it, heartbeats.

Consumes its role's pool subject (`llm.work.<role>.any`) and its own
(`llm.work.<role>.<worker_id>`). A work message is acked only when every
item in it has its outcome stored (serve.run_item). While it holds a message
it sends `in_progress()` so JetStream does not redeliver a long generation.

Drain (stop event): stop fetching, let held items finish for
`drain_timeout_s`, then hand the rest back to the pool with the tokens
streamed so far, ack, publish a last heartbeat (state=stopped), unregister.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus.connect import connect
from bus.jsmeta import stored_ms
from bus.outcome import StoredPublisher
from bus.provision import delete_work_consumer, ensure_streams, ensure_work_consumer
from bus.puller import Puller
from bus.recent import RecentIds
from schemas.codec import encode, work_decoder
from schemas.messages import Heartbeat, Role, WorkerState, WorkItem
from schemas.settings import Settings
from schemas.subjects import ANY_TARGET
from workers.engines.base import Engine
from workers.serve import ServeContext, finish_cancelled, run_item

log = logging.getLogger("cplane.worker")


@dataclass(slots=True)
class _Held:
    msg: Msg
    remaining: int


class Worker:
    def __init__(self, settings: Settings, engine: Engine, nc: NATS | None = None) -> None:
        self.settings = settings
        ws = settings.worker
        self.worker_id = ws.worker_id or f"w-{uuid.uuid4().hex[:8]}"
        self.role = Role(ws.role)
        self.engine = engine
        self.subjects = settings.subjects
        self._nc = nc
        self._own_nc = nc is None
        self._held: dict[int, _Held] = {}
        self._items: dict[str, asyncio.Task[None]] = {}  # request_id -> serving task
        self._cancelled = RecentIds(100_000)
        self._pullers: list[Puller] = []
        self._started_ms = time.time() * 1000
        self._state = WorkerState.READY
        self.ctx: ServeContext | None = None

    # -- lifecycle ------------------------------------------------------------
    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set, then drain. `ready` is set once consuming."""
        ws = self.settings.worker
        nc = self._nc or await connect(self.settings.nats.url, f"worker-{self.worker_id}")
        self._nc = nc
        js = nc.jetstream(publish_async_max_pending=4000)
        await ensure_streams(js, self.settings)
        self.ctx = ServeContext(
            nc=nc, store=StoredPublisher(nc, ws.publish_timeout_s), engine=self.engine,
            subjects=self.subjects, worker_id=self.worker_id, role=self.role,
            chunk_tokens=ws.chunk_tokens, chunk_interval_s=ws.chunk_interval_ms / 1000,
        )
        cancel_sub = await nc.subscribe(self.subjects.cancel_all, cb=self._on_cancel)
        hb_sub = await nc.subscribe(self.subjects.heartbeat_request, cb=self._on_hb_request)
        for target in (ANY_TARGET, self.worker_id):
            durable = await ensure_work_consumer(js, self.settings, self.role, target)
            puller = Puller(nc, self.settings.streams.work.name, durable, self._accept,
                            room=self._room_msgs, expires_s=ws.fetch_timeout_s)
            await puller.start()
            self._pullers.append(puller)
        tasks = [asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                 asyncio.create_task(self._in_progress_loop(), name="in-progress")]
        await self._publish_heartbeat()
        log.info("worker %s (%s, %s) consuming", self.worker_id, self.role, self.engine.name)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            await self._drain()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await cancel_sub.unsubscribe()
            await hb_sub.unsubscribe()
            self._state = WorkerState.STOPPED
            await self._publish_heartbeat()
            await delete_work_consumer(js, self.settings, self.role, self.worker_id)
            if self._own_nc:
                await nc.flush()
                await nc.close()

    async def _drain(self) -> None:
        self._state = WorkerState.DRAINING
        for puller in self._pullers:
            await puller.stop()
        await self._publish_heartbeat()
        deadline = time.monotonic() + self.settings.worker.drain_timeout_s
        while self._items and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._items and self.ctx is not None:
            log.info("drain: handing %d unfinished items back", len(self._items))
            self.ctx.handing_back = True
            for task in list(self._items.values()):
                task.cancel()
        deadline = time.monotonic() + self.settings.worker.publish_timeout_s
        while self._held and time.monotonic() < deadline:  # last acks go out as items end
            await asyncio.sleep(0.01)

    # -- intake ----------------------------------------------------------------
    @property
    def held_items(self) -> int:
        return len(self._items)

    def _room_msgs(self) -> int:
        """Work messages we can take now; a message may carry up to max_batch items."""
        free = self.settings.worker.capacity - len(self._items)
        if free <= 0 or self._state is not WorkerState.READY:
            return 0
        return max(1, free // max(1, self.settings.orchestrator.max_batch))

    async def _accept(self, msg: Msg) -> None:
        try:
            batch = work_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.error("undecodable work message terminated: %s", exc)
            await msg.term()
            return
        held = _Held(msg=msg, remaining=len(batch.items))
        key = id(msg)
        self._held[key] = held
        enqueued = stored_ms(msg.reply) if msg.reply else 0.0
        for item in batch.items:
            if not item.enqueued_ms:
                item = msgspec.structs.replace(item, enqueued_ms=enqueued)
            rid = item.request.request_id
            if rid in self._items:  # a redelivered duplicate of work running here
                log.info("duplicate work for %s ignored", rid)
                await self._item_done(key)
                continue
            task = asyncio.create_task(self._serve(key, item), name=f"item-{rid}")
            self._items[rid] = task
        if not batch.items:
            await self._item_done(key)

    async def _serve(self, key: int, item: WorkItem) -> None:
        assert self.ctx is not None
        rid = item.request.request_id
        try:
            if rid in self._cancelled:
                await finish_cancelled(self.ctx, item)
            else:
                await run_item(self.ctx, item)
        except Exception:
            # The outcome could not be stored: leave the message unacked so
            # JetStream redelivers it after ack_wait (to us or another worker).
            log.exception("outcome of %s not stored; message will be redelivered", rid)
            held = self._held.pop(key, None)
            if held is not None:
                await held.msg.nak(delay=1.0)
        finally:
            self._items.pop(rid, None)
            for puller in self._pullers:
                puller.poke()
        await self._item_done(key)

    async def _item_done(self, key: int) -> None:
        held = self._held.get(key)
        if held is None:
            return
        held.remaining -= 1
        if held.remaining <= 0:
            del self._held[key]
            await held.msg.ack()

    # -- control ---------------------------------------------------------------
    async def _on_cancel(self, msg: Msg) -> None:
        rid = self.subjects.last_token(msg.subject)
        self._cancelled.add(rid)
        if rid in self._items:
            await self.engine.abort(rid)

    async def _on_hb_request(self, msg: Msg) -> None:
        await self._publish_heartbeat()

    async def _in_progress_loop(self) -> None:
        every = self.settings.worker.in_progress_every_s
        while True:
            await asyncio.sleep(every)
            for held in list(self._held.values()):
                with contextlib.suppress(Exception):
                    await held.msg.in_progress()

    def heartbeat(self) -> Heartbeat:
        st = self.engine.stats()
        return Heartbeat(
            worker_id=self.worker_id,
            role=self.role,
            models=list(self.engine.models),
            engine=self.engine.name,
            capacity=self.settings.worker.capacity,
            running=st.running,
            waiting=st.waiting,
            held_items=self.held_items,
            kv_usage=st.kv_usage,
            prefix_hit_rate=st.prefix_hit_rate,
            prompt_tokens_per_s=st.prompt_tokens_per_s,
            gen_tokens_per_s=st.gen_tokens_per_s,
            state=self._state,
            ts_ms=time.time() * 1000,
            started_ms=self._started_ms,
        )

    async def _publish_heartbeat(self) -> None:
        if self._nc is not None and self._nc.is_connected:
            subject = self.subjects.heartbeat(self.worker_id)
            await self._nc.publish(subject, encode(self.heartbeat()))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker.heartbeat_s)
            try:
                await self._publish_heartbeat()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
