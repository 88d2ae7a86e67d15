"""The orchestrator service: the imperative shell around policy, PD decision and fleet.

- One durable pull consumer per priority on LLM_REQ, each with a fetch
  outstanding, filling a bounded per-priority hold queue (JetStream has no
  per-message priority; holding lets the policy choose among what is held).
- A dispatch loop that, whenever the fleet has room, asks the policy for the
  next requests, packs them into WorkBatch messages (one request alone goes
  out at once; a deep queue goes out in batches of up to `max_batch`), and
  acks the request messages only after JetStream acked the work publish.
- Held messages get `in_progress()` so ack_wait never expires under them.
- Room = fleet capacity (from heartbeats) * (1 + headroom) - requests in
  flight; a request leaves "in flight" when its Final/ErrorReply appears on
  `llm.done.>` (read from the subject, never decoded).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from itertools import islice
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus.connect import connect
from bus.jsmeta import stored_ms, stream_seq
from bus.outcome import StoredPublisher, cancelled_final, error_reply
from bus.provision import ensure_request_consumers, ensure_streams
from bus.puller import Puller
from bus.recent import RecentIds
from orchestrator.fleet import FleetView, Registry
from orchestrator.intake import Rejection, admit
from orchestrator.pd_decision import PdConfig, decide
from orchestrator.policy import PolicyConfig, QueueView, get_policy
from orchestrator.routing import choose_target
from schemas.codec import encode, heartbeat_decoder
from schemas.messages import PRIORITIES, ErrorCode, Role, WorkBatch, WorkItem
from schemas.settings import Settings
from schemas.subjects import ANY_TARGET, consumer_for_priority

log = logging.getLogger("cplane.orchestrator")


@dataclass(slots=True, eq=False)
class Held:
    msg: Msg
    item: WorkItem
    arrival_ms: float


def now_ms() -> float:
    return time.time() * 1000


class Orchestrator:
    def __init__(self, settings: Settings, nc: NATS | None = None) -> None:
        self.settings = settings
        o = settings.orchestrator
        self.id = o.orchestrator_id or f"orch-{uuid.uuid4().hex[:8]}"
        self.subjects = settings.subjects
        self.policy = get_policy(o.policy)
        self.policy_cfg = PolicyConfig(aging_s=o.aging_s)
        self.pd_cfg = PdConfig(mode=o.pd_mode, min_prompt_tokens=o.pd_min_prompt_tokens)
        self.registry = Registry(timeout_ms=o.worker_timeout_s * 1000)
        self._queues: list[deque[Held]] = [deque() for _ in PRIORITIES]
        self._held_by_id: dict[str, Held] = {}
        self._pullers: list[Puller] = []
        self._inflight: dict[str, Role] = {}
        self._sent_since_hb: dict[str, int] = {}  # worker id -> items sent it since its heartbeat
        self._seen = RecentIds(o.dedup_cache)
        self._cancelled = RecentIds(100_000)
        self._wake = asyncio.Event()
        self._publish_slots = asyncio.Semaphore(o.publish_window)
        self._tasks: set[asyncio.Task[None]] = set()
        self._nc = nc
        self._own_nc = nc is None
        self._store: StoredPublisher
        self.counters = {
            "accepted": 0, "rejected": 0, "duplicates": 0, "dispatched": 0,
            "batches": 0, "cancelled": 0, "publish_failures": 0, "pd": 0,
        }

    # -- lifecycle ------------------------------------------------------------
    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        nc = self._nc or await connect(self.settings.nats.url, self.id)
        self._nc = nc
        js = nc.jetstream(publish_async_max_pending=8000)
        self._store = StoredPublisher(nc, self.settings.orchestrator.publish_timeout_s)
        await ensure_streams(js, self.settings)
        await ensure_request_consumers(js, self.settings)
        subs = [
            await nc.subscribe(self.subjects.heartbeats_all, cb=self._on_heartbeat),
            await nc.subscribe(self.subjects.done_all, cb=self._on_done),
            await nc.subscribe(self.subjects.cancel_all, cb=self._on_cancel),
        ]
        o = self.settings.orchestrator
        for level, p in enumerate(PRIORITIES):
            puller = Puller(
                nc, self.settings.streams.req.name, consumer_for_priority(p), self._on_request,
                room=functools.partial(self._hold_room, level),
                expires_s=o.fetch_timeout_s, max_batch=o.fetch_batch,
            )
            await puller.start()
            self._pullers.append(puller)
        loops = [asyncio.create_task(self._dispatch_loop(), name="dispatch"),
                 asyncio.create_task(self._ticker(), name="ticker")]
        log.info("orchestrator %s consuming (policy=%s)", self.id, o.policy)
        await nc.publish(self.subjects.heartbeat_request, b"")  # workers answer at once
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            for puller in self._pullers:
                await puller.stop()
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            if self._tasks:  # let in-flight work publishes finish and ack
                await asyncio.wait(self._tasks, timeout=o.publish_timeout_s)
            for held in list(self._held_by_id.values()):
                with contextlib.suppress(Exception):
                    await held.msg.nak()  # another replica takes it at once
            for s in subs:
                with contextlib.suppress(Exception):
                    await s.unsubscribe()
            if self._own_nc:
                await nc.flush()
                await nc.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- intake ----------------------------------------------------------------
    def _hold_room(self, level: int) -> int:
        return self.settings.orchestrator.hold_per_priority - len(self._queues[level])

    async def _on_request(self, msg: Msg) -> None:
        await self._intake(msg)
        self._wake.set()

    async def _intake(self, msg: Msg) -> None:
        prio, slo = self.subjects.parse_request(msg.subject)
        arrival = stored_ms(msg.reply)
        result = admit(msg.data, prio, slo, arrival, now_ms(), self.id)
        if isinstance(result, Rejection):
            self.counters["rejected"] += 1
            self._spawn(self._reject(msg, result), "reject")
            return
        rid = result.request.request_id
        if rid in self._inflight or rid in self._held_by_id or not self._seen.add(rid):
            # Same request_id published twice without Nats-Msg-Id (or after the
            # dedup window): it is served once.
            self.counters["duplicates"] += 1
            await msg.term()
            return
        held = Held(msg=msg, item=result, arrival_ms=arrival)
        if rid in self._cancelled:
            self._spawn(self._finish_cancelled(held), "cancel")
            return
        level = result.priority.level
        self._queues[level].append(held)
        self._held_by_id[rid] = held
        self.counters["accepted"] += 1

    async def _reject(self, msg: Msg, rej: Rejection) -> None:
        assert self._nc is not None
        rid = rej.request_id or f"seq{stream_seq(msg.reply) if msg.reply else 0}"
        err = error_reply(rid, rej.code, rej.message)
        log.info("rejected %s: %s", rid, rej.message)
        try:
            await self._store.publish_terminal(self._nc, self.subjects, rej.group, err)
        except Exception as exc:
            log.warning("could not publish rejection of %s: %s", rid, exc)
            await msg.nak(delay=1.0)
            return
        await msg.term()

    async def _finish_cancelled(self, held: Held) -> None:
        assert self._nc is not None
        req = held.item.request
        await self._store.publish_terminal(
            self._nc, self.subjects, req.group, cancelled_final(held.item), req.reply_to
        )
        self.counters["cancelled"] += 1
        await held.msg.ack()

    # -- dispatch --------------------------------------------------------------
    def room(self, fleet: FleetView) -> int:
        o = self.settings.orchestrator
        cap = fleet.capacity(Role.UNIFIED) + fleet.pd_capacity()
        return int(cap * (1 + o.headroom)) - len(self._inflight)

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._dispatch_ready()
            except Exception:
                log.exception("dispatch step failed")

    def _take(self, k: int) -> list[Held]:
        """Pop up to k held requests in the policy's order."""
        now = now_ms()
        view = QueueView(tuple([h.arrival_ms for h in islice(q, k)] for q in self._queues))
        taken = []
        for level in self.policy(view, k, now, self.policy_cfg):
            held = self._queues[level].popleft()
            del self._held_by_id[held.item.request.request_id]
            taken.append(held)
        for puller in self._pullers:
            puller.poke()
        return taken

    async def _dispatch_ready(self) -> None:
        fleet = self.registry.snapshot(now_ms())
        room = self.room(fleet)
        if room <= 0 or not self._held_by_id:
            return
        by_dest: dict[tuple[Role, str], list[Held]] = {}
        keep: list[Held] = []
        for held in self._take(room):
            req = held.item.request
            if fleet.workers and not fleet.serves(req.model):
                self._spawn(self._reject(held.msg, Rejection(
                    req.request_id, req.group, ErrorCode.UNKNOWN_MODEL,
                    f"no worker serves model {req.model!r}; served: {sorted(fleet.models)}",
                )), "reject")
                continue
            role = decide(req, fleet, self.pd_cfg)
            target = None if role is None else choose_target(
                req.model, role, fleet, self._sent_since_hb
            )
            if role is None or target is None:  # no live pool for this model right now
                keep.append(held)
                continue
            if target != ANY_TARGET:
                self._sent_since_hb[target] = self._sent_since_hb.get(target, 0) + 1
            by_dest.setdefault((role, target), []).append(held)
        for held in reversed(keep):  # back to the front, in order
            self._queues[held.item.priority.level].appendleft(held)
            self._held_by_id[held.item.request.request_id] = held
        size = max(1, min(self.settings.orchestrator.max_batch, fleet.max_worker_capacity()))
        for (role, target), items in by_dest.items():
            for i in range(0, len(items), size):
                batch = items[i : i + size]
                for held in batch:
                    self._inflight[held.item.request.request_id] = role
                await self._publish_slots.acquire()
                self._spawn(self._publish_batch(role, target, batch), "publish")

    async def _publish_batch(self, role: Role, target: str, batch: list[Held]) -> None:
        t = now_ms()
        items = [msgspec.structs.replace(h.item, role=role, dispatched_ms=t) for h in batch]
        data = encode(WorkBatch(items=items))
        try:
            await self._store.publish(self.subjects.work(role, target), data)
        except Exception as exc:
            # Not dispatched: JetStream redelivers the requests shortly.
            log.warning("work publish failed (%d requests back to the queue): %s", len(batch), exc)
            self.counters["publish_failures"] += 1
            for held in batch:
                self._inflight.pop(held.item.request.request_id, None)
                self._seen.discard(held.item.request.request_id)
                await held.msg.nak(delay=1.0)
            return
        finally:
            self._publish_slots.release()
        for held in batch:
            await held.msg.ack()
        self.counters["dispatched"] += len(batch)
        self.counters["batches"] += 1
        if role is Role.PREFILL:
            self.counters["pd"] += len(batch)

    # -- subscriptions ---------------------------------------------------------
    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = heartbeat_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        self._sent_since_hb.pop(hb.worker_id, None)  # its heartbeat counts them now
        if self.registry.observe(hb, now_ms()):
            self._wake.set()

    async def _on_done(self, msg: Msg) -> None:
        if self._inflight.pop(self.subjects.last_token(msg.subject), None) is not None:
            self._wake.set()

    async def _on_cancel(self, msg: Msg) -> None:
        rid = self.subjects.last_token(msg.subject)
        self._cancelled.add(rid)
        held = self._held_by_id.pop(rid, None)
        if held is not None:  # not dispatched yet: it never runs
            self._queues[held.item.priority.level].remove(held)
            self._spawn(self._finish_cancelled(held), "cancel")

    async def _ticker(self) -> None:
        """Wakes dispatch for aging and worker expiry; keeps held messages alive."""
        o = self.settings.orchestrator
        last_progress = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            if self.registry.expire(now_ms()):
                live = len(self.registry.snapshot(now_ms()).workers)
                log.info("workers expired; %d live workers left", live)
            self._wake.set()
            if time.monotonic() - last_progress >= o.in_progress_every_s:
                last_progress = time.monotonic()
                for held in list(self._held_by_id.values()):
                    with contextlib.suppress(Exception):
                        await held.msg.in_progress()
