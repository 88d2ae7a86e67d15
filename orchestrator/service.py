"""The orchestrator service: the imperative shell around the decision core.

- `run`: connect, provision, follow heartbeats / terminals / cancels, compete for
  the lease(s) (leads.py); only a leader with a fresh lease acts, and pulls its
  partitions' requests (leadership.py); the default partition's leader rescues.
- `_intake`: one LLM_REQ delivery -> dead letter, forward to its model's partition,
  rejection, duplicate, re-check of a redelivery, a stored-terminal lookup, HELD.
- `_dispatch_step`: the core plans and applies; each batch is published (a
  Nats-Msg-Id from its requests and their LLM_REQ sequences, retried while
  leading) and then acked; each rejection is published, then acked.
- `_on_done`: terminals stored free their slots (the Fin signal).
- `_ticker`: keep-alives, missed terminals (reconcile.py), worker expiry and
  rescue (rescue.py), a stall detector.
- `cplane policy set` / `cplane router set`: the runtime switches (switches.py)
  swap the core's policy or router between two steps and wake dispatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Coroutine, Iterable
from dataclasses import asdict
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from cplane.bus.cancels import CancelBook, cancel_names, key_request_id
from cplane.bus.connect import connect, revive_reader
from cplane.bus.fins import read_fin
from cplane.bus.heartbeats import subscribe_heartbeats
from cplane.bus.jsmeta import delivery
from cplane.bus.outcome import StoredPublisher, cancelled_final
from cplane.bus.provision import ensure_all, ensure_streams
from cplane.bus.recent import RecentIds
from cplane.bus.stored_retry import StoreResult, publish_until_stored
from cplane.bus.tasks import cancel_all
from cplane.orchestrator.control import start_control
from cplane.orchestrator.core import DecisionCore, Journal
from cplane.orchestrator.dispatch import Batch, DispatchConfig, batch_msg_id, dispatch_config
from cplane.orchestrator.forwarding import Forwarded, Forwarder
from cplane.orchestrator.health_admin import build_registry
from cplane.orchestrator.intake import (
    NOT_LEADING_NAK_S,
    Intake,
    Rejection,
    classify,
    held_as,
    scoped_key,
    sniff_id,
)
from cplane.orchestrator.known_ids import KnownIds
from cplane.orchestrator.kv_feed import KvFeed
from cplane.orchestrator.leadership import Leadership
from cplane.orchestrator.leads import Leads
from cplane.orchestrator.ledger import Entry, Ledger, RequestState
from cplane.orchestrator.outcomes import Outcomes, Recheck, recheck
from cplane.orchestrator.partitions import PartitionMap
from cplane.orchestrator.pending import pending_of
from cplane.orchestrator.prompt_hash import PromptHasher
from cplane.orchestrator.reconcile import keep_held_alive, reconcile_missed
from cplane.orchestrator.rescue import ORPHAN_SWEEP_S, rescue_orphans, rescue_queue
from cplane.orchestrator.stats import OrchestratorStats
from cplane.orchestrator.switches import Switches
from cplane.orchestrator.tenancy import TenantGate, known_in_scope
from cplane.schemas import trace
from cplane.schemas.codec import encode
from cplane.schemas.messages import Heartbeat, Role, WorkBatch, WorkerState, WorkItem
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import valid_token

log = logging.getLogger("cplane.orchestrator")
_PUBLISH_RETRY_S = 0.5
_TICK_S = 0.25  # housekeeping period
_STALLED_S = 1.0  # a tick this late means the process stalled (see _ticker)


def now_ms() -> float:
    return time.time() * 1000


class Orchestrator:
    def __init__(self, settings: Settings, nc: NATS | None = None, *,
                 journal: Journal | None = None) -> None:
        self.settings = settings
        o = settings.orchestrator
        self.id = o.orchestrator_id or f"orch-{uuid.uuid4().hex[:8]}"
        if not valid_token(self.id):  # it names subjects (llm.fin.<id>, llm.admin...)
            raise ValueError(f"orchestrator id {self.id!r} must be a subject token")
        self.subjects = settings.subjects
        self.registry = build_registry(settings)
        # Every decision: the ledger, the decision state, plan and apply (no I/O).
        # Routers read the registry's counts of items routed since each heartbeat.
        self.core: DecisionCore[WorkItem] = DecisionCore(
            dispatch_config(o), tenant_weights=o.tenant_weights,
            prefill_tokens_per_s=o.prefill_tokens_per_s, routed_since=self.registry.since,
            journal=journal)
        self._rng = random.Random(o.route_seed or None)
        self.stats = OrchestratorStats()
        self._seen = RecentIds(o.dedup_cache)  # ids dispatched or finished: served once
        self._tenants = TenantGate(o, self.subjects, self.settings.limits)
        # One lease per partition when partitions are configured (docs/replicas.md).
        self.partitions = PartitionMap.of(o.partitions)
        self._leads = Leads(self.partitions)
        # While leading: pullers; after a takeover, workers' held items count too.
        self._leader = Leadership(settings, self.id, self._on_request, self._hold_room,
                                  self.partitions)
        self._wake = asyncio.Event()
        self._forwarder = Forwarder(self.subjects, self.partitions, self._leads.leads,
                                    o.publish_timeout_s, self.stats)
        # Set by the ticker: plan even without room (model-wait timeouts, aging).
        self._tick_due = True
        self._publish_slots = asyncio.Semaphore(o.publish_window)
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        self._nc = nc
        self._own_nc = nc is None
        self._js: JetStreamContext
        self._store: StoredPublisher
        self._out: Outcomes
        self._cancels: CancelBook
        # `cplane policy` / `cplane router`: the core's policy and router, the prefix inputs
        self.switches = Switches(settings, self.core, self.registry, self.id, self._replan)
        self._known_ids: KnownIds | None = None

    @property
    def ledger(self) -> Ledger[WorkItem]:
        return self.core.ledger

    @property
    def cfg(self) -> DispatchConfig:
        return self.core.cfg

    @property
    def leading(self) -> bool:
        """Leads (some partition) by a lease fresh enough to act on (leads.py)."""
        return self._leads.leading

    @property
    def counters(self) -> dict[str, int]:
        return asdict(self.stats)

    @property
    def policy_name(self) -> str:
        """The policy in force (`cplane policy set` changes it)."""
        return self.switches.policy_name

    @property
    def _hasher(self) -> PromptHasher | None:
        """Hashes prompts at intake while a prefix router is in use."""
        return self.switches.hasher

    @property
    def _kv(self) -> KvFeed | None:
        """Workers' KV events into the prefix index, while a prefix router is in use."""
        return self.switches.kv

    # -- lifecycle ------------------------------------------------------------
    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        o = self.settings.orchestrator
        nc = self._nc or await connect(self.settings.nats.url, self.id,
                                       on_reconnect=self._on_reconnect,
                                       settings=self.settings.nats)
        self._nc = nc
        self._js = nc.jetstream(publish_async_max_pending=8000)
        self._store = StoredPublisher(nc, o.publish_timeout_s, signer=self.id)
        self._out = Outcomes(nc, self._store, self.settings)
        if o.check_stored_terminals:
            self._known_ids = KnownIds(nc, self.settings, self._hold, self._seen.add)
        await ensure_all(self._js, self.settings)  # every stream, consumer and store
        subs = [
            await subscribe_heartbeats(nc, self.subjects, self._on_heartbeat),
            # A terminal was stored (empty body, the request id is the subject's
            # last token): frees its slot. One lost is reconciled from LLM_DONE.
            await nc.subscribe(self.subjects.fin_all, cb=self._on_done),
        ]
        self._cancels = CancelBook(nc, self.settings, on_cancel=self._on_cancel)
        await self._cancels.start()
        # Before the lease: a replica that leads at once dispatches by the stored choices.
        await self.switches.start(nc, self._js)
        # admin.status/metrics/instances/request/breakers, and /metrics
        self.control = await start_control(nc, self._js, self.settings, self.registry, self)
        lease_stop = asyncio.Event()
        leases = self._leads.start(self._js, self.settings, self.id, self._on_leadership,
                                   lease_stop)
        loops = [asyncio.create_task(self._dispatch_loop(), name="dispatch"),
                 asyncio.create_task(self._ticker(), name="ticker"),
                 asyncio.create_task(leases, name="lease")]
        await nc.publish(self.subjects.heartbeat_request, b"")  # workers answer at once
        log.info("orchestrator %s up (policy=%s, router=%s)", self.id, self.policy_name,
                 self.cfg.router_in_use.name)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            lease_stop.set()  # steps down (naks what it holds) and releases the lease
            await asyncio.gather(loops[2], return_exceptions=True)
            await cancel_all(loops)
            await self._cancels.stop()
            await self.switches.stop()
            await self.control.stop()
            for s in subs:
                with contextlib.suppress(Exception):
                    await s.unsubscribe()
            if self._own_nc:
                with contextlib.suppress(Exception):
                    await nc.flush()
                await nc.close()

    async def _on_reconnect(self) -> None:
        """After a broker restart: streams and consumers back, cancels sent meanwhile."""
        await ensure_all(self._js, self.settings)
        await self._cancels.load()
        await self.switches.resume()
        self._wake.set()

    def _replan(self) -> None:
        """A switch changed the policy or the router: plan what is held again at once."""
        self._tick_due = True
        self._wake.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- leadership ------------------------------------------------------------
    async def _on_leadership(self, pool: str, leading: bool) -> None:
        """A partition's lease (unpartitioned: the one lease) gained or lost. Lost: stop
        taking its requests, let its publishes in flight finish, hand back the rest."""
        if leading:
            assert self._nc is not None
            await self._leader.begin(self._nc, self._js, pool)
            self._wake.set()
            return
        await self._leader.end(pool)
        mine = [t for t in self._tasks
                if not self.partitions.enabled or t.get_name() == f"publish-{pool}"]
        if mine:
            await asyncio.wait(mine, timeout=self.settings.orchestrator.publish_timeout_s)
        of_model = self.partitions.of_model
        await self._hand_back([e for e in self.ledger.entries(RequestState.HELD)
                               if of_model(e.pending.model) == pool])

    # -- intake ----------------------------------------------------------------
    def _hold_room(self, level: int) -> int:
        looking = self._known_ids.waiting(level) if self._known_ids is not None else 0
        return (self.settings.orchestrator.hold_per_priority - self.ledger.held_count(level)
                - looking - self._forwarder.busy)

    async def _on_request(self, msg: Msg) -> None:
        try:
            await self._intake(msg)
        except Exception:  # never let one message stop the puller; it is redelivered
            log.exception("intake failed; the message will be redelivered")
        self._wake.set()

    async def _intake(self, msg: Msg) -> None:
        seq, deliveries, stored = delivery(msg.reply)
        o = self.settings.orchestrator
        pool, elsewhere = self._forwarder.partition_of(msg)
        leading = self._leads.leads(pool)
        admitted: WorkItem | Rejection | None = None
        held: Entry[WorkItem] | None = None
        seen = False
        if leading and deliveries <= o.max_deliveries and not elsewhere:
            admitted, held, seen = self._tenants.admit(
                msg.subject, msg.data, stored, now_ms(), deliveries, self.id, self.core.ledger.get,
                self.core.state.active, self._seen)
        action = classify(
            leading=leading, deliveries=deliveries, max_deliveries=o.max_deliveries,
            admitted=admitted, seq=seq, held_seq=held.seq if held is not None else None,
            held_waiting=held is not None and held.state in (RequestState.HELD,
                                                             RequestState.DISPATCHING),
            seen=seen, elsewhere=elsewhere)
        match action:
            case Intake.NAK:  # not leading: from a pull of ours still open (intake.py)
                await msg.nak(delay=NOT_LEADING_NAK_S)
            case Intake.FORWARD:
                self._spawn(self._forward(msg, seq), "forward")
            case Intake.DEAD_LETTER:
                self._dead_letter(msg, seq, deliveries)
            case Intake.REJECT:
                assert isinstance(admitted, Rejection)
                self.stats.reject(admitted.code)
                self._spawn(self._out.reject(msg, seq, admitted, self._known), "reject")
            case Intake.SAME_MESSAGE:  # a redelivery of a message we hold: the newest handle
                assert held is not None
                held.msg = msg
            case Intake.DUPLICATE_HELD:  # the same id published twice: acked with it
                assert held is not None
                held.extra_msgs.append(msg)
                self.stats.duplicates += 1
            case Intake.DUPLICATE_DONE:  # the same id again, after its first run's windows
                assert isinstance(admitted, WorkItem)
                self.stats.duplicates += 1
                self._spawn(self._duplicate(admitted, msg, seq), "duplicate")
            case Intake.RECHECK | Intake.HOLD:
                assert isinstance(admitted, WorkItem)
                entry = self._entry(admitted, msg, seq)
                if action is Intake.RECHECK:
                    self._spawn(self._recheck(entry), "recheck")
                elif self._known_ids is not None and not admitted.request.fresh_id:
                    # answered already? (orchestrator/known_ids.py)
                    self._known_ids.check(entry)
                else:
                    await self._hold(entry)

    async def _forward(self, msg: Msg, seq: int) -> None:
        """Its model is another partition's: republished there (forwarding.py); refused
        (overloaded, retryable) when LLM_REQ stays full."""
        if await self._forwarder.forward(self._js, msg, seq) is Forwarded.FULL:
            rej = self._tenants.refuse_overloaded(msg.subject, msg.data, now_ms(), self.id)
            self.stats.reject(rej.code)
            await self._out.reject(msg, seq, rej, self._known)

    async def _duplicate(self, item: WorkItem, msg: Msg, seq: int) -> None:
        """An id this replica dispatched or finished, published again (a client retrying
        after its timeout, an id used as an idempotency key): never run twice. A
        stored terminal is sent again; one still running answers on the same
        subject when it ends; an id with no trace anywhere (forgotten) is new."""
        if self._known_ids is not None and await self._known_ids.answer_again(item, msg):
            return
        running = item.request.request_id in self.ledger  # its terminal answers this too
        if not running and self._leads.leads(self.partitions.of_model(item.request.model)):
            await self._hold(self._entry(item, msg, seq))
            return
        with contextlib.suppress(Exception):  # not ours to answer now: the leader's
            await (msg.ack() if running else msg.nak(delay=NOT_LEADING_NAK_S))

    def _entry(self, item: WorkItem, msg: Msg, seq: int) -> Entry[WorkItem]:
        if msg.headers and trace.parse(tp := msg.headers.get(trace.HEADER)):  # W3C, per item
            item = msgspec.structs.replace(item, traceparent=tp)
        blocks = self._hasher.blocks if self._hasher is not None else None
        return Entry(pending_of(item, now_ms(), self.settings.orchestrator, blocks), item,
                     seq=seq, msg=msg)

    def _dead_letter(self, msg: Msg, seq: int, deliveries: int) -> None:
        """Delivered too often. Held here (naked at each change of leader), it ends on
        its own subject and leaves the ledger, never run (at once: no dispatch between)."""
        self.stats.dead_letters += 1
        own = held_as(self.ledger.get(sniff_id(msg.data) or ""), seq)
        if own is not None:
            self.core.finish_own(own)

        async def settle() -> None:
            stored = await self._out.dead_letter_request(msg, seq, deliveries, self._known,
                                                         own=own is not None)
            if own is not None:
                if stored:
                    self._seen.add(scoped_key(own.item.request))
                self.core.finished_own(own, now_ms())

        self._spawn(settle(), "dead-letter")

    def _known(self, request_id: str, group: str) -> bool:
        return known_in_scope(self.ledger.get(request_id), self._seen, request_id, group)

    async def _recheck(self, entry: Entry[WorkItem]) -> None:
        found = await recheck(self._js, self.settings, entry.item.request)
        if found is Recheck.NOT_FOUND:
            self.core.mark_redispatched(entry)
            if entry.request_id not in self.ledger:
                await self._hold(entry)
            return
        # Finished (its terminal goes again to whoever published this copy, perhaps
        # an id published again), or streaming on a worker (its work message
        # migrates if that worker dies): the request message has done its job.
        self.stats.redeliveries_settled += 1
        self._seen.add(scoped_key(entry.item.request))
        if found is Recheck.FINISHED and self._known_ids is not None and (
                await self._known_ids.answer_again(entry.item, entry.msg)):
            return
        await entry.msg.ack()

    async def _hold(self, entry: Entry[WorkItem]) -> None:
        if not self._leads.entries([entry]):  # stepped down while it was looked up
            await self._hand_back([entry])
            return
        held = self.ledger.get(entry.request_id)
        if held is not None:  # a copy held while this one was looked up: acked with it
            if held.seq != entry.seq:
                held.extra_msgs.append(entry.msg)
            return
        self.core.hold(entry)
        self._wake.set()  # held after a lookup or a re-check too: plan it now
        self.stats.accept(entry.item.priority.value, entry.item.slo_class)
        if self._cancels.cancels(entry.item.request.group, entry.request_id):
            await self._finish_cancelled(entry)

    async def _finish_cancelled(self, entry: Entry[WorkItem]) -> None:
        self.core.finish_own(entry)
        self.stats.cancelled += 1
        self._spawn(self._finish(entry, cancelled_final(entry.item)), "cancel")

    async def _finish(self, entry: Entry[WorkItem], terminal: Any) -> None:
        """Publish our own terminal for a held request, then ack; on failure JetStream retries."""
        ok = await self._out.terminal(entry.item.request, terminal)
        if ok:
            self._seen.add(scoped_key(entry.item.request))
        for m in (entry.msg, *entry.extra_msgs):
            with contextlib.suppress(Exception):
                await (m.ack() if ok else m.nak(delay=1.0))
        self.core.finished_own(entry, now_ms())

    # -- dispatch --------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.leading or not self.ledger.held_count():
                continue
            try:
                await self._dispatch_step()
            except Exception:
                log.exception("dispatch step failed")

    async def _dispatch_step(self) -> None:
        """One decision (the core plans and applies it), then its effects: each
        rejection published, each batch published (then acked), pullers poked."""
        if self._leads.stale():
            # A partition's lease too old to act on (this process stalled): what it
            # holds goes back now, before a plan could send it.
            await self._hand_back([e for e in self.ledger.entries(RequestState.HELD)
                                   if not self._leads.entries([e])])
        t = now_ms()
        fleet = self.registry.snapshot(t)
        step = self.core.step(fleet, now_ms=t, rng=self._rng, due=self._tick_due,
                              inherited=self._leader.inherited(fleet, self.ledger))
        if step is None:  # no room and nothing due (most wakes at saturation)
            return
        self._tick_due = False
        for rej, entry in step.rejected:
            self.stats.reject(rej.code)
            err = self._out.error(rej.request_id, rej.code, rej.message, rej.retryable,
                                  retry_after_ms=rej.retry_after_ms)
            self._spawn(self._finish(entry, err), "reject")
        for out in step.publish:
            self.stats.route(out.batch.role.value, out.routed, len(out.entries))
            await self._publish_slots.acquire()
            pool = self.partitions.of_model(out.entries[0].pending.model)
            self._spawn(self._publish_batch(out.batch, out.entries), f"publish-{pool}")
        self._leader.poke()

    async def _publish_batch(self, batch: Batch, entries: tuple[Entry[WorkItem], ...]) -> None:
        try:
            result = await self._store_batch(batch, entries)
        finally:
            self._publish_slots.release()
        if not result.stored:  # not stored (or not known to be): plan again
            self.core.refused(entries, redispatch=result is StoreResult.GAVE_UP)
            if not self._leads.entries(entries):  # ...by the next leader: held here
                await self._hand_back(entries)
            self._wake.set()
            return
        for e in entries:
            for m in (e.msg, *e.extra_msgs):
                with contextlib.suppress(Exception):
                    await m.ack()
            self._seen.add(scoped_key(e.item.request))
        if self.core.stored(entries, now_ms()):
            self._wake.set()  # terminals that raced the acks freed slots
        self.stats.dispatched += len(entries)
        self.stats.batches += 1
        if batch.role.value == "prefill":
            self.stats.pd += len(entries)

    async def _hand_back(self, entries: Iterable[Entry[WorkItem]]) -> None:
        """Held requests this replica may no longer keep (it does not lead): out of
        the ledger and naked, so the leader gets them now, not after ack_wait."""
        for e in entries:
            if e.state is RequestState.HELD:
                self.core.release(e)
            for m in (e.msg, *e.extra_msgs):
                with contextlib.suppress(Exception):
                    await m.nak()

    async def _store_batch(self, batch: Batch, entries: tuple[Entry[WorkItem], ...]
                           ) -> StoreResult:
        """Publish the batch until JetStream answers (bus/stored_retry.py): STORED,
        REFUSED (not stored: stream full...) or GAVE_UP (no answer within half the
        duplicate window: maybe stored, or this replica stopped leading). A
        request is never published under two ids at once: the Nats-Msg-Id is the
        batch's content."""
        t = now_ms()
        items = [msgspec.structs.replace(e.item, role=batch.role, dispatched_ms=t,
                                         redispatched=e.redispatched) for e in entries]

        async def on_retry(exc: Exception) -> None:
            self.stats.publish_retries += 1
            if isinstance(exc, NoStreamResponseError):  # the stream vanished with the store
                with contextlib.suppress(Exception):
                    await ensure_streams(self._js, self.settings)

        result = await publish_until_stored(
            self._store, self.subjects.work(batch.role, batch.target),
            encode(WorkBatch(items=items)),
            batch_msg_id(batch, ((e.request_id, e.seq) for e in entries)),
            window_s=self.settings.streams.work.duplicate_window_s, on_retry=on_retry,
            retry_s=_PUBLISH_RETRY_S, still_valid=lambda: self._leads.entries(entries))
        if result is StoreResult.REFUSED:
            log.warning("work publish refused (%d requests stay held)", len(entries))
            self.stats.publish_failures += 1
        return result

    # -- subscriptions ---------------------------------------------------------
    def _on_heartbeat(self, hb: Heartbeat) -> None:
        if self.registry.observe(hb, now_ms()):
            if hb.state == WorkerState.STOPPED:
                self.core.forget_worker(hb.worker_id)
            self._wake.set()

    async def _on_done(self, msg: Msg) -> None:
        """The in-flight signal: terminals stored (their slots free, their TTFTs count)."""
        t = now_ms()
        freed = False
        for fin in read_fin(msg.data):
            freed |= self.core.terminal(fin.request_id, t, fin.ttft_ms)
        if freed:
            self._wake.set()

    async def _on_cancel(self, key: str) -> None:
        entry = self.ledger.get(key_request_id(key))
        if entry is not None and entry.state is RequestState.HELD and cancel_names(
                key, entry.item.request.group, entry.request_id):  # never runs
            await self._finish_cancelled(entry)

    # -- housekeeping ----------------------------------------------------------
    async def _ticker(self) -> None:
        o = self.settings.orchestrator
        last_progress = last_reconcile = last_sweep = last_tick = time.monotonic()
        while True:
            await asyncio.sleep(_TICK_S)
            t = now_ms()
            mono = time.monotonic()
            late, last_tick = mono - last_tick - _TICK_S, mono
            if late > _STALLED_S:
                # This process stalled (a pause, CPU starvation): heartbeats that came
                # meanwhile wait unread. Its own silence counts against no worker.
                log.warning("orchestrator %s stalled %.1f s: no worker expires for it",
                            self.id, late)
                self.registry.grace(late * 1000)
            self.registry.tick_breakers(t)
            for hb in self.registry.expire_workers(t):
                log.info("worker %s expired; %d live", hb.worker_id,
                         len(self.registry.snapshot(t).workers))
                self.core.forget_worker(hb.worker_id)
                if self._leads.fleet:
                    self._spawn(self._rescue(hb.role, hb.worker_id, list(hb.models)), "rescue")
            self._tick_due = True
            self._wake.set()
            if mono - last_progress >= o.in_progress_every_s:
                last_progress = mono
                await self._keep_alive()
            if mono - last_reconcile >= 1.0:
                last_reconcile = mono
                if self._nc is not None:
                    await revive_reader(self._nc)  # nats-py can stop reading (bus/connect.py)
                await self._reconcile(t)
            # Own queues of dead workers no leader saw expire; once this process
            # has heard heartbeats for a worker timeout (every live one is known).
            if (self._leads.fleet and mono - last_sweep >= ORPHAN_SWEEP_S
                    and mono - self._started >= o.worker_timeout_s):
                last_sweep = mono
                self._spawn(rescue_orphans(self._js, self._store, self.settings,
                                           self.registry.knows), "orphans")

    async def _rescue(self, role: Role, worker_id: str, models: list[str]) -> None:
        def still_dead() -> bool:  # a worker that was only slow keeps its queue
            return self._leads.fleet and not self.registry.knows(worker_id)

        try:
            await rescue_queue(self._js, self._store, self.settings, role, worker_id, models,
                               still_dead=still_dead)
        except Exception as exc:  # the next expiry (or its drain) tries again
            log.warning("could not move the work of dead worker %s: %s", worker_id, exc)

    async def _keep_alive(self) -> None:
        """While leading only: a replica that stepped down (or may have: its lease is
        stale) lets what it holds go to the next leader."""
        if self.leading:
            await keep_held_alive(self.core)

    async def _reconcile(self, t: float) -> None:
        found = await reconcile_missed(self.core, self._js, self.settings, t)
        if found:
            self.stats.reconciled += found
            self._wake.set()


__all__ = ["Orchestrator", "WorkItem"]
