"""The orchestrator service: the imperative shell around the ledger and `plan_dispatch`.

Table of contents:
- `run`: connect, provision, follow heartbeats / terminals / cancels, and
  compete for the leader lease (orchestrator/lease.py). Only the leader
  pulls requests; a standby takes over within `lease_ttl_s`.
- `_on_request`: one LLM_REQ delivery -> dead letter, rejection, duplicate,
  re-check of a redelivery (orchestrator/recheck.py), or a HELD ledger entry.
- `_dispatch_step`: snapshot -> `plan_dispatch` -> apply the plan: publish
  each batch (Nats-Msg-Id from its request ids, retried with the same id
  until JetStream answers), then ack its requests; publish each rejection,
  then ack.
- `_on_done`: a request's terminal frees its pool slot (ledger).
- `_ticker`: in_progress() for held messages, reconcile slots whose
  terminal was missed (LLM_DONE lookup), wake dispatch for aging/expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import asdict, replace
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError

from bus.cancels import CancelBook
from bus.connect import connect
from bus.fins import fin_ids
from bus.jsmeta import delivery
from bus.outcome import StoredPublisher, cancelled_final
from bus.provision import ensure_all, ensure_request_consumers, ensure_streams
from bus.puller import Puller
from bus.recent import RecentIds
from bus.replay import stored_terminal
from orchestrator.control import start_control
from orchestrator.decision_state import DecisionState
from orchestrator.dispatch import (
    Batch,
    DispatchPlan,
    Pending,
    dispatch_config,
    free_slots,
)
from orchestrator.health_admin import build_registry, serve_breakers
from orchestrator.intake import Rejection, admit
from orchestrator.kv_feed import KvFeed
from orchestrator.lease import LeaderLease
from orchestrator.ledger import Entry, Ledger, RequestState
from orchestrator.outcomes import Outcomes, Recheck, recheck
from orchestrator.pd_decision import estimate_prompt_tokens
from orchestrator.prefix_router import PREFIX_ROUTERS
from orchestrator.prompt_hash import PromptHasher
from orchestrator.rescue import ORPHAN_SWEEP_S, rescue_orphans, rescue_queue
from orchestrator.runtime_config import PolicySwitch, policy_order
from orchestrator.slo import resolve
from orchestrator.stats import OrchestratorStats
from schemas import trace
from schemas.codec import encode, heartbeat_decoder
from schemas.messages import PRIORITIES, Role, WorkBatch, WorkerState, WorkItem
from schemas.settings import Settings
from schemas.subjects import consumer_for_priority, valid_token

log = logging.getLogger("cplane.orchestrator")
_PUBLISH_RETRY_S = 0.5


def now_ms() -> float:
    return time.time() * 1000


def batch_msg_id(batch: Batch) -> str:
    """Deterministic per content: a retried or repeated publish of the same batch is one."""
    h = hashlib.blake2b(digest_size=12)
    h.update(batch.role.value.encode())
    for rid in batch.request_ids:
        h.update(b"\0" + rid.encode())
    return f"w:{h.hexdigest()}"


class Orchestrator:
    def __init__(self, settings: Settings, nc: NATS | None = None) -> None:
        self.settings = settings
        o = settings.orchestrator
        self.id = o.orchestrator_id or f"orch-{uuid.uuid4().hex[:8]}"
        if not valid_token(self.id):  # it names subjects (llm.fin.<id>, llm.admin...)
            raise ValueError(f"orchestrator id {self.id!r} must be a subject token")
        self.subjects = settings.subjects
        self.cfg = dispatch_config(o)
        self.policy_name = o.policy  # in force now: `cplane policy set` changes it (use_policy)
        self.registry = build_registry(settings)
        # Routers read the registry's counts of items routed since each heartbeat.
        self.decisions = DecisionState(tenant_weights=o.tenant_weights,
                                       prefill_tokens_per_s=o.prefill_tokens_per_s,
                                       routed_since=self.registry.since)
        self._rng = random.Random(o.route_seed or None)
        self.ledger = Ledger(len(PRIORITIES), observer=self._ledger_changed)
        self.stats = OrchestratorStats()
        self._seen = RecentIds(o.dedup_cache)  # ids dispatched or finished: served once
        self._pullers: list[Puller] = []
        self._wake = asyncio.Event()
        # Set by the ticker: plan even without room (model-wait timeouts, aging).
        self._tick_due = True
        self._takeover_until = 0.0  # until then, heartbeats' held items floor the ledger
        self._publish_slots = asyncio.Semaphore(o.publish_window)
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        self._nc = nc
        self._own_nc = nc is None
        self._js: JetStreamContext
        self._store: StoredPublisher
        self._out: Outcomes
        self._cancels: CancelBook
        self._policy: PolicySwitch
        self.lease: LeaderLease | None = None
        self._hasher = (PromptHasher(o.prefix_tokenizer, o.prefix_block_tokens,
                                     settings.sim.vocab_size)
                        if o.router in PREFIX_ROUTERS else None)
        self._kv: KvFeed | None = None

    @property
    def leading(self) -> bool:
        return self.lease is not None and self.lease.leading

    @property
    def counters(self) -> dict[str, int]:
        return asdict(self.stats)

    # -- lifecycle ------------------------------------------------------------
    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        o = self.settings.orchestrator
        nc = self._nc or await connect(self.settings.nats.url, self.id,
                                       on_reconnect=self._on_reconnect)
        self._nc = nc
        self._js = nc.jetstream(publish_async_max_pending=8000)
        self._store = StoredPublisher(nc, o.publish_timeout_s, signer=self.id)
        self._out = Outcomes(nc, self._store, self.settings)
        await ensure_streams(self._js, self.settings)
        await ensure_request_consumers(self._js, self.settings)
        subs = [
            await nc.subscribe(self.subjects.heartbeats_all, cb=self._on_heartbeat),
            # A terminal was stored (empty body, the request id is the subject's
            # last token): frees its slot. One lost is reconciled from LLM_DONE.
            await nc.subscribe(self.subjects.fin_all, cb=self._on_done),
            await serve_breakers(nc, self.settings, self.registry, lambda: self.leading),
        ]
        self._cancels = CancelBook(nc, self.settings, on_cancel=self._on_cancel)
        await self._cancels.start()
        if self._hasher is not None:  # a prefix router: workers' KV events feed its index
            self._kv = KvFeed(nc, self.subjects, self.decisions.prefix, o.prefix_block_tokens,
                              known=self.registry.knows)
            await self._kv.start()
        # Before the lease: a replica that leads at once dispatches by the stored choice.
        self._policy = PolicySwitch(nc, self._js, self.settings, self.id, self.use_policy)
        await self._policy.start()
        self.control = await start_control(self)  # admin.status/metrics/request, /metrics
        self.lease = LeaderLease(self._js, self.settings, self.id, on_change=self._on_leadership)
        lease_stop = asyncio.Event()
        loops = [asyncio.create_task(self._dispatch_loop(), name="dispatch"),
                 asyncio.create_task(self._ticker(), name="ticker"),
                 asyncio.create_task(self.lease.run(lease_stop), name="lease")]
        await nc.publish(self.subjects.heartbeat_request, b"")  # workers answer at once
        log.info("orchestrator %s up (policy=%s)", self.id, self.policy_name)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            lease_stop.set()  # steps down (naks what it holds) and releases the lease
            await asyncio.gather(loops[2], return_exceptions=True)
            for t in loops[:2]:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._cancels.stop()
            await self._policy.stop()
            await self.control.stop()
            if self._kv is not None:
                await self._kv.stop()
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
        await self._policy.resume()
        self._wake.set()

    def use_policy(self, name: str, params: Mapping[str, Any]) -> None:
        """Dispatch by policy `name` from the next step on (called by PolicySwitch).

        Raises (and changes nothing) when the plugin does not build. Steps are
        synchronous, so no step sees half a switch.
        """
        self.cfg = replace(self.cfg, order=policy_order(self.settings.orchestrator, name, params))
        self.policy_name = name
        self.decisions.mode, self.decisions.mode_since = "", -1.0  # adaptive starts afresh
        log.info("orchestrator %s: policy %s %s", self.id, name, dict(params))
        self._tick_due = True  # re-plan what is held under the new order
        self._wake.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- leadership ------------------------------------------------------------
    async def _on_leadership(self, leading: bool) -> None:
        if leading:
            self._takeover_until = (time.monotonic()
                                    + self.settings.orchestrator.takeover_window_s)
            await self._start_pulling()
            self._wake.set()
        else:
            await self._stop_pulling()

    async def _start_pulling(self) -> None:
        assert self._nc is not None
        o = self.settings.orchestrator
        await ensure_request_consumers(self._js, self.settings)
        for level, p in enumerate(PRIORITIES):
            puller = Puller(
                self._nc, self.settings.streams.req.name, consumer_for_priority(p),
                self._on_request, room=functools.partial(self._hold_room, level),
                expires_s=o.fetch_timeout_s, max_batch=o.fetch_batch,
            )
            await puller.start()
            self._pullers.append(puller)

    async def _stop_pulling(self) -> None:
        """Stop taking requests; finish publishes in flight; hand held ones back at once."""
        pullers, self._pullers = self._pullers, []
        for puller in pullers:
            await puller.stop()
        if self._tasks:
            timeout = self.settings.orchestrator.publish_timeout_s
            await asyncio.wait(set(self._tasks), timeout=timeout)
        for e in list(self.ledger.entries(RequestState.HELD)):
            self.ledger.transition(e, None)
            for m in (e.msg, *e.extra_msgs):
                with contextlib.suppress(Exception):
                    await m.nak()  # the next leader gets it without waiting for ack_wait

    # -- intake ----------------------------------------------------------------
    def _hold_room(self, level: int) -> int:
        return self.settings.orchestrator.hold_per_priority - self.ledger.held_count(level)

    async def _on_request(self, msg: Msg) -> None:
        try:
            await self._intake(msg)
        except Exception:  # never let one message stop the puller; it is redelivered
            log.exception("intake failed; the message will be redelivered")
        self._wake.set()

    async def _intake(self, msg: Msg) -> None:
        seq, deliveries, stored = delivery(msg.reply)
        if not self.leading:
            await msg.nak()
            return
        if deliveries > self.settings.orchestrator.max_deliveries:
            self.stats.dead_letters += 1
            self._spawn(self._out.dead_letter_request(msg, seq, deliveries, self._known),
                        "dead-letter")
            return
        prio, slo = self.subjects.parse_request(msg.subject)
        result = admit(msg.data, prio, slo, stored, now_ms(), self.id,
                       self.settings.limits)
        if isinstance(result, Rejection):
            self.stats.reject(result.code)
            self._spawn(self._out.reject(msg, seq, result, self._known), "reject")
            return
        if msg.headers and trace.parse(tp := msg.headers.get(trace.HEADER)):  # W3C, per item
            result = msgspec.structs.replace(result, traceparent=tp)
        rid = result.request.request_id
        entry = self.ledger.get(rid)
        if entry is not None:
            if entry.seq == seq:  # a redelivery of a message we hold: keep the newest handle
                entry.msg = msg
            elif entry.state in (RequestState.HELD, RequestState.DISPATCHING):
                entry.extra_msgs.append(msg)  # the same id published twice: acked with it
                self.stats.duplicates += 1
            else:
                self.stats.duplicates += 1
                await msg.ack()
            return
        if rid in self._seen:
            self.stats.duplicates += 1
            await msg.ack()
            return
        entry = Entry(item=result, seq=seq, arrival_ms=result.enqueued_ms, held_ms=now_ms(),
                      msg=msg)
        if deliveries > 1:  # an earlier delivery may have been dispatched: look first
            self._spawn(self._recheck(entry), "recheck")
            return
        await self._hold(entry)

    def _known(self, request_id: str) -> bool:
        """A live or recently finished request: a rejection must not become its terminal."""
        return request_id in self.ledger or request_id in self._seen

    async def _recheck(self, entry: Entry) -> None:
        found = await recheck(self._js, self.settings, entry.item.request)
        if found is Recheck.NOT_FOUND:
            entry.redispatched = True
            if entry.request_id not in self.ledger:
                await self._hold(entry)
            return
        # Finished, or streaming on a worker (its work message migrates if that
        # worker dies): the request message has done its job.
        self.stats.redeliveries_settled += 1
        self._seen.add(entry.request_id)
        await entry.msg.ack()

    async def _hold(self, entry: Entry) -> None:
        self.ledger.transition(entry, RequestState.HELD)
        self.stats.accept(entry.item.priority.value, entry.item.slo_class)
        if entry.request_id in self._cancels:
            await self._finish_cancelled(entry)

    async def _finish_cancelled(self, entry: Entry) -> None:
        self.ledger.transition(entry, RequestState.FINISHING)
        self.stats.cancelled += 1
        self._spawn(self._finish(entry, cancelled_final(entry.item)), "cancel")

    async def _finish(self, entry: Entry, terminal: Any) -> None:
        """Publish our own terminal for a held request, then ack; on failure JetStream retries."""
        ok = await self._out.terminal(entry.item.request, terminal)
        if ok:
            self._seen.add(entry.request_id)
        for m in (entry.msg, *entry.extra_msgs):
            with contextlib.suppress(Exception):
                await (m.ack() if ok else m.nak(delay=1.0))
        self.ledger.transition(entry, None)

    # -- dispatch --------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.leading or not self.ledger.held_count():
                continue
            try:
                plan = self._plan()
                if plan is not None:
                    await self._apply(plan)
            except Exception:
                log.exception("dispatch step failed")

    def _ledger_changed(self, e: Entry, frm: RequestState | None,
                        to: RequestState | None) -> None:
        tenant = e.item.request.tenant or ""
        if frm is None and to is RequestState.HELD:
            self.decisions.held(tenant)
        elif frm is RequestState.HELD and to is RequestState.DISPATCHING:
            self.decisions.dispatched((self._pending(e),), getattr(self.cfg.order, "fair", None))
        elif to is None:
            ran = frm in (RequestState.DISPATCHING, RequestState.DISPATCHED)
            self.decisions.finished(tenant, now_ms(), ran)
            if ran and e.target:
                self.registry.since.finished_on(e.target)

    def _plan(self) -> DispatchPlan | None:
        """None when no pool has room and nothing is due (most wakes at saturation)."""
        t = now_ms()
        fleet = self.registry.snapshot(t)
        # What each pool holds: our own ledger. Right after a takeover, also what
        # the workers report holding (work a previous leader dispatched), whichever
        # is more; only then, since heartbeats lag by up to a second and would
        # hold back dispatch that the ledger knows is safe.
        if time.monotonic() < self._takeover_until:
            in_flight = {pool: max(self.ledger.in_flight(pool), fleet.pool_held(pool))
                         for pool in free_slots(fleet, {}, 0.0)}
        else:
            in_flight = self.ledger.in_flight_by_pool()

        def held(k: int) -> tuple[tuple[Pending, ...], ...]:
            return tuple(tuple(self._pending(e) for e in self.ledger.held_heads(level, k))
                         for level in range(len(PRIORITIES)))

        plan = self.decisions.plan(self.cfg, fleet, in_flight, held, now_ms=t, rng=self._rng,
                                   due=self._tick_due)
        if plan is not None:
            self._tick_due = False
        return plan

    def _pending(self, e: Entry) -> Pending:
        """The entry as decisions see it; built once per entry (no per-step cost)."""
        p: Pending | None = e.pending
        if p is None or p.redispatched != e.redispatched:
            req = e.item.request
            o = self.settings.orchestrator
            slo = resolve(e.item.slo_class, o.slo_classes, o.default_slo_class,
                          ttft_ms=req.ttft_target_ms, tpot_ms=req.tpot_target_ms,
                          deadline_ms=req.slo_deadline_ms)
            p = e.pending = Pending(
                request_id=e.request_id, level=e.level, arrival_ms=e.arrival_ms,
                held_ms=e.held_ms, model=req.model, prompt_tokens=estimate_prompt_tokens(req),
                deadline_ms=e.arrival_ms + slo.deadline_ms if slo.deadline_ms else None,
                redispatched=e.redispatched, output_tokens=req.max_tokens,
                tenant=req.tenant or "", slo_class=slo.name,
                session=req.session_id or req.user_id or "", ttft_target_ms=slo.ttft_ms,
                tpot_target_ms=slo.tpot_ms, sheddable=slo.sheddable,
                cost_budget=req.cost_budget,
                # Hashed only for routers that read it (a cost per prompt byte).
                block_hashes=self._hasher.blocks(req) if self._hasher is not None else ())
        return p

    async def _apply(self, plan: DispatchPlan) -> None:
        for rej in plan.rejections:
            entry = self.ledger.get(rej.request_id)
            if entry is None or entry.state is not RequestState.HELD:
                continue
            self.ledger.transition(entry, RequestState.FINISHING)
            self.stats.reject(rej.code)
            err = self._out.error(rej.request_id, rej.code, rej.message, rej.retryable,
                                  retry_after_ms=rej.retry_after_ms)
            self._spawn(self._finish(entry, err), "reject")
        for batch in plan.batches:
            entries = [e for rid in batch.request_ids if (e := self.ledger.get(rid)) is not None
                       and e.state is RequestState.HELD]
            if not entries:
                continue
            for e in entries:
                self.ledger.transition(e, RequestState.DISPATCHING, batch.pool)
            self.stats.route(batch.role.value, batch.target in plan.sent, len(entries))
            if batch.target in plan.sent:  # routed to one worker, not a pool
                self.decisions.sent_to(batch.target, [self._pending(e) for e in entries])
                for e in entries:
                    e.target = batch.target
            await self._publish_slots.acquire()
            self._spawn(self._publish_batch(batch, entries), "publish")
        for puller in self._pullers:
            puller.poke()

    async def _publish_batch(self, batch: Batch, entries: list[Entry]) -> None:
        try:
            stored = await self._store_batch(batch, entries)
        finally:
            self._publish_slots.release()
        if not stored:  # refused, so not stored: plan them again
            for e in entries:
                self.ledger.transition(e, RequestState.HELD)
            self._wake.set()
            return
        t = now_ms()
        for e in entries:
            for m in (e.msg, *e.extra_msgs):
                with contextlib.suppress(Exception):
                    await m.ack()
            self._seen.add(e.request_id)
            self.ledger.transition(e, RequestState.DISPATCHED)
            e.dispatched_ms = t
            if e.terminal_seen:  # its Final raced our ack (zero-cost engines)
                self.ledger.transition(e, None)
        self.stats.dispatched += len(entries)
        self.stats.batches += 1
        if batch.role.value == "prefill":
            self.stats.pd += len(entries)

    async def _store_batch(self, batch: Batch, entries: list[Entry]) -> bool:
        """True once JetStream stored the batch; False when it refused it (not stored).

        A timeout is no answer: the batch may be stored. Retry with the same
        Nats-Msg-Id (JetStream keeps one copy) while we lead, within the
        duplicate window; a request is never published under two ids at once.
        """
        t = now_ms()
        items = [msgspec.structs.replace(e.item, role=batch.role, dispatched_ms=t,
                                         redispatched=e.redispatched) for e in entries]
        data = encode(WorkBatch(items=items))
        subject = self.subjects.work(batch.role, batch.target)
        msg_id = batch_msg_id(batch)
        window_s = self.settings.streams.work.duplicate_window_s
        deadline = time.monotonic() + window_s / 2
        while True:
            try:
                await self._store.publish(subject, data, msg_id)
                return True
            except NoStreamResponseError:  # the stream vanished with the broker's store
                with contextlib.suppress(Exception):
                    await ensure_streams(self._js, self.settings)
            except APIError as exc:  # refused (stream full...): not stored
                log.warning("work publish refused (%d requests stay held): %s", len(entries), exc)
                self.stats.publish_failures += 1
                return False
            except Exception as exc:  # timeout / disconnected: unknown, retry the same id
                self.stats.publish_retries += 1
                log.debug("work publish unanswered, retrying: %s", exc)
            if time.monotonic() > deadline:
                for e in entries:  # past half the dedup window: redispatch alone, checked
                    e.redispatched = True
                return False
            await asyncio.sleep(_PUBLISH_RETRY_S)

    # -- subscriptions ---------------------------------------------------------
    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = heartbeat_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if self.registry.observe(hb, now_ms()):
            if hb.state == WorkerState.STOPPED:
                self.decisions.forget_worker(hb.worker_id)
            self._wake.set()

    async def _on_done(self, msg: Msg) -> None:
        for rid in fin_ids(self.subjects.last_token(msg.subject), msg.data):
            entry = self.ledger.get(rid)
            if entry is None:
                continue
            if entry.state is RequestState.DISPATCHED:
                self.ledger.transition(entry, None)
                self._wake.set()
            elif entry.state is RequestState.DISPATCHING:
                entry.terminal_seen = True

    async def _on_cancel(self, request_id: str) -> None:
        entry = self.ledger.get(request_id)
        if entry is not None and entry.state is RequestState.HELD:  # never runs
            await self._finish_cancelled(entry)

    # -- housekeeping ----------------------------------------------------------
    async def _ticker(self) -> None:
        o = self.settings.orchestrator
        last_progress = last_reconcile = last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            t = now_ms()
            self.registry.tick_breakers(t)
            for hb in self.registry.expire_workers(t):
                log.info("worker %s expired; %d live", hb.worker_id,
                         len(self.registry.snapshot(t).workers))
                self.decisions.forget_worker(hb.worker_id)
                if self.leading:
                    self._spawn(self._rescue(hb.role, hb.worker_id, list(hb.models)), "rescue")
            self._tick_due = True
            self._wake.set()
            mono = time.monotonic()
            if mono - last_progress >= o.in_progress_every_s:
                last_progress = mono
                await self._keep_alive()
            if mono - last_reconcile >= 1.0:
                last_reconcile = mono
                await self._reconcile(t)
            # Own queues of dead workers no leader saw expire; once this process
            # has heard heartbeats for a worker timeout (every live one is known).
            if (self.leading and mono - last_sweep >= ORPHAN_SWEEP_S
                    and mono - self._started >= o.worker_timeout_s):
                last_sweep = mono
                self._spawn(rescue_orphans(self._js, self._store, self.settings,
                                           self.registry.knows), "orphans")

    async def _rescue(self, role: Role, worker_id: str, models: list[str]) -> None:
        try:
            await rescue_queue(self._js, self._store, self.settings, role, worker_id, models)
        except Exception as exc:  # the next expiry (or its drain) tries again
            log.warning("could not move the work of dead worker %s: %s", worker_id, exc)

    async def _keep_alive(self) -> None:
        for e in list(self.ledger.entries()):
            if e.state in (RequestState.HELD, RequestState.DISPATCHING):
                for m in (e.msg, *e.extra_msgs):
                    with contextlib.suppress(Exception):
                        await m.in_progress()

    async def _reconcile(self, t: float, limit: int = 64) -> None:
        """Free the slots of dispatched requests whose terminal we missed (a reconnect)."""
        after = self.settings.orchestrator.reconcile_after_s * 1000
        due = [e for e in self.ledger.entries(RequestState.DISPATCHED)
               if t - max(e.dispatched_ms, e.checked_ms) > after][:limit]
        for e in due:
            e.checked_ms = t
            try:
                term = await stored_terminal(self._js, self.settings, e.item.request.group,
                                             e.request_id)
            except Exception:
                return
            if term is not None and e.state is RequestState.DISPATCHED:
                self.stats.reconciled += 1
                self.ledger.transition(e, None)
                self._wake.set()


__all__ = ["Orchestrator", "WorkItem"]
