"""The worker service: pulls work within its capacity, serves it, heartbeats.

Consumes its role's pool (`llm.work.<role>.any`), one pool per model it
serves (`llm.work.<role>.m-<model>`) and its own subject
(`llm.work.<role>.<worker_id>`). Promises:

- Every item delivered here is a run in the run ledger (workers/runs.py),
  served by `serve()` (serve.py) to one stored outcome, which it returns.
- A work message is acked exactly when every item in it has its outcome
  stored, never earlier. Held messages are keyed by stream sequence; a
  redelivered copy of a held message replaces the Msg used for the ack while
  its items run on; an item whose request already runs here (from another
  message) is not started twice, and its message is acked when the running
  one has its outcome.
- Held messages get `in_progress()` every `in_progress_every_s`, so only a
  dead worker's work comes back (after `ack_wait_s`).
- A redelivered message (or an item flagged `redispatched`) is checked
  against LLM_DONE and LLM_OUT before it runs (migrate.prepare); one
  delivered more than 1 + max_migrations times is dead-lettered.
- Cancels come from the stored LLM_CANCEL stream (bus.cancels.CancelBook):
  a worker started after a cancel still honours it.
- Engine health: serve returns an engine fault before the item goes back;
  EngineDeadError, or `engine_error_limit` engine errors in a row, make the
  worker unhealthy: it stops pulling, says so in heartbeats and hands every
  held item back to its model's pool (the faulted one last).

Drain (stop event): stop fetching, move what is queued on the worker's own
subject to the model pools, wait (on the ledger) up to `drain_timeout_s` for
held items to finish, then hand the rest back with the tokens streamed so
far, publish a last heartbeat (state=stopped) and delete the own consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cplane.bus.cancels import CancelBook, cancel_names, key_request_id
from cplane.bus.claims import Claims
from cplane.bus.connect import connect, drop_pending, round_trip
from cplane.bus.control import ADMIN_GUARD
from cplane.bus.heartbeats import subscribe_heartbeats
from cplane.bus.jsmeta import delivery
from cplane.bus.outcome import StoredPublisher
from cplane.bus.provision import delete_work_consumer, ensure_work_consumer
from cplane.bus.puller import Puller
from cplane.bus.streams_ready import streams_ready
from cplane.bus.tasks import cancel_all
from cplane.schemas.codec import encode, work_decoder
from cplane.schemas.messages import Heartbeat, Role, WorkerState, WorkItem
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import ANY_TARGET, MODEL_TARGET_PREFIX, model_target, valid_token
from cplane.workers.context import Outcome, ServeContext
from cplane.workers.control import start_control
from cplane.workers.engines.base import Engine, KvEventSource
from cplane.workers.fence import Fence
from cplane.workers.kv_events import KvEventPump
from cplane.workers.migrate import move_queued, store_dead_letter, taken_over
from cplane.workers.run_fence import Superseded
from cplane.workers.runs import Letter, Run, RunLedger, RunState
from cplane.workers.serve import serve

log = logging.getLogger("cplane.worker")
_STORE_TRIES = 3  # an outcome that could not be stored is retried here before a nak
_FAULTS = frozenset({Outcome.ENGINE_FAULT, Outcome.ENGINE_DEAD})


def _continues(running: WorkItem, new: WorkItem) -> bool:
    """`new` carries `running` on (its hand-back or hand-off), rather than repeating it."""
    return new.attempt > running.attempt or new.role is not running.role or (
        new.next_seq > running.next_seq)


class Worker:
    def __init__(self, settings: Settings, engine: Engine, nc: NATS | None = None) -> None:
        self.settings = settings
        ws = settings.worker
        self.worker_id = ws.worker_id or f"w-{uuid.uuid4().hex[:8]}"
        if not valid_token(self.worker_id) or self.worker_id == ANY_TARGET or (
                self.worker_id.startswith(MODEL_TARGET_PREFIX)):
            raise ValueError(f"worker id {self.worker_id!r} must be a subject token, not "
                             f"{ANY_TARGET!r} nor starting with {MODEL_TARGET_PREFIX!r}")
        self.role = Role(ws.role)
        self.engine = engine
        self.subjects = settings.subjects
        self._nc = nc
        self._own_nc = nc is None
        self.runs = RunLedger()  # every item held here, from delivery to its acks
        self._cancels: CancelBook | None = None
        self._pullers: list[Puller] = []
        self.kv_pump: KvEventPump | None = None
        self._own_durable = ""
        self._engine_errors = 0  # in a row
        self.served = 0  # items served / failed by the engine, since start (heartbeats)
        self.faults = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._moving: asyncio.Task[int] | None = None
        self._started_ms = time.time() * 1000
        self._state = WorkerState.READY
        self._consuming = False  # its pull consumers are in place (/readyz)
        self.ctx: ServeContext | None = None

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def consuming(self) -> bool:
        """Its pull consumers are in place: work sent to it is taken."""
        return self._consuming

    # -- lifecycle ------------------------------------------------------------
    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set, then drain. `ready` is set once consuming."""
        ws = self.settings.worker
        nc = self._nc or await connect(self.settings.nats.url, f"worker-{self.worker_id}",
                                       on_reconnect=self._on_reconnect,
                                       on_disconnect=self._on_disconnect,
                                       settings=self.settings.nats)
        self._nc = nc
        js = nc.jetstream(publish_async_max_pending=4000)
        await streams_ready(js, self.settings)
        self.ctx = ServeContext(
            nc=nc, js=js, settings=self.settings, store=StoredPublisher(
                nc, ws.publish_timeout_s, signer=self.worker_id),
            engine=self.engine, worker_id=self.worker_id, role=self.role, runs=self.runs,
        )
        claims = self.ctx.claims = Claims(js, self.settings, self.worker_id,
                                          on_lost=self._on_claim_lost)
        await claims.start()
        self.ctx.fence = Fence(ws.ack_wait_s, self._refence,
                               claims_until=lambda: claims.valid_until)
        self._cancels = CancelBook(nc, self.settings, on_cancel=self._on_cancel)
        await self._cancels.start()
        self.ctx.cancelled = self._cancels
        ctx = self.ctx  # admin.metrics/instance/request, and /metrics
        self.control = await start_control(
            nc, self.settings, self.worker_id, request_status=ctx.stats.request_status,
            report=lambda: ctx.stats.report(self.heartbeat(), ctx.counts, self._engine_errors),
            not_ready=self.not_ready)
        hb_sub = await nc.subscribe(self.subjects.heartbeat_request, cb=self._on_hb_request)
        peers_sub = await subscribe_heartbeats(nc, self.subjects, self._on_peer)
        for target in self._targets():
            durable = await ensure_work_consumer(js, self.settings, self.role, target)
            if target == self.worker_id:
                self._own_durable = durable
            puller = Puller(nc, self.settings.streams.work.name, durable, self._accept,
                            room=self._room_msgs, expires_s=ws.fetch_timeout_s,
                            on_gone=functools.partial(self._consumer_gone, target))
            await puller.start()
            self._pullers.append(puller)
        tasks = [asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                 asyncio.create_task(self._in_progress_loop(), name="in-progress")]
        if ws.kv_events_ms > 0 and isinstance(self.engine, KvEventSource):
            self.kv_pump = KvEventPump(nc, self.subjects, self.worker_id, self.engine,
                                       ws.kv_events_ms)
            tasks.append(asyncio.create_task(self.kv_pump.run(stop), name="kv-events"))
        await self._publish_heartbeat()
        self._consuming = True
        log.info("worker %s (%s, %s) consuming", self.worker_id, self.role, self.engine.name)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            await self._drain()
            await cancel_all([*tasks, *self._background])
            await self._cancels.stop()
            await self.control.stop()
            await self.ctx.claims.stop()
            await hb_sub.unsubscribe()
            await peers_sub.unsubscribe()
            self._state = WorkerState.STOPPED
            await self._publish_heartbeat()
            with contextlib.suppress(Exception):
                await nc.flush()  # acks sent while still READY reach the server first
            await delete_work_consumer(js, self.settings, self.role, self.worker_id)
            if self._own_nc:
                await nc.flush()
                await nc.close()

    async def not_ready(self) -> str | None:
        """`/readyz`: why this worker takes no work now, None when it does. Its engine
        is started before the worker runs (the server starts after it), so ready =
        connected to NATS, its pull consumers in place, and state READY (not
        draining, not unhealthy after an engine failure)."""
        if self._nc is None or not self._nc.is_connected:
            return "not connected to NATS"
        if not self._consuming:
            return "not consuming yet"
        if self._state is not WorkerState.READY:
            return f"worker {self._state.value}"
        return None

    def _targets(self) -> list[str]:
        """Work subjects' targets: the role's pool, each model's pool, this worker."""
        models = dict.fromkeys(model_target(m) for m in self.engine.models)
        return [ANY_TARGET, *(t for t in models if t != ANY_TARGET), self.worker_id]

    async def _drain(self) -> None:
        if self._state is WorkerState.READY:
            self._state = WorkerState.DRAINING
        # Stop asking now; what pull requests already sent still bring is given back
        # at once (_accept) while the held runs finish.
        stopping = [asyncio.create_task(p.stop(linger=True)) for p in self._pullers]
        await asyncio.sleep(0)  # each stop cancels its loop before anything else runs
        await self._publish_heartbeat()
        await self._move_own_queue()
        ws = self.settings.worker
        if not await self.runs.idle(ws.drain_timeout_s):
            log.info("drain: handing %d unfinished items back", self.runs.held)
            self._hand_back_all()
            await self.runs.idle(ws.publish_timeout_s)  # the hand-backs and the last acks
        await asyncio.gather(*stopping, return_exceptions=True)

    def _hand_back_all(self) -> None:
        """Every run goes back to its model's pool (except those storing an outcome
        right now: they finish); runs not begun yet, or accepted later, leave when
        they begin."""
        for run in self.runs.close():
            if run.task is not None:
                run.task.cancel()

    async def _move_own_queue(self) -> None:
        if self.ctx is None or not self._own_durable:
            return
        if self._moving is None or self._moving.done():
            self._moving = asyncio.create_task(move_queued(self.ctx, self._own_durable))
        try:
            await asyncio.shield(self._moving)
        except Exception as exc:
            log.warning("could not move work queued for %s: %s", self.worker_id, exc)

    # -- engine health ----------------------------------------------------------
    async def _engine_failed(self, dead: bool) -> None:
        """The engine failed on a run, which leaves after this: judge the engine
        first, so an unhealthy worker stops pulling before the item goes back."""
        self._engine_errors += 1
        self.faults += 1
        if dead:
            await self._become_unhealthy("the engine is dead")
        elif self._engine_errors >= self.settings.worker.engine_error_limit:
            await self._become_unhealthy(f"{self._engine_errors} engine errors in a row")

    async def engine_down(self, why: str) -> None:
        """The engine is known to be down (a remote server's probes fail): unhealthy now,
        without waiting for requests to fail on it."""
        self._engine_errors = max(self._engine_errors, self.settings.worker.engine_error_limit)
        await self._become_unhealthy(why)

    async def _become_unhealthy(self, why: str) -> None:
        """Stop pulling, say so, hand everything held back to its model's pool."""
        if self._state is not WorkerState.READY:
            return
        log.error("worker %s unhealthy: %s; handing its work back", self.worker_id, why)
        self._state = WorkerState.UNHEALTHY  # no room: no new pull request goes out
        self._hand_back_all()
        await self._publish_heartbeat()
        # What pull requests already sent still bring (a hand-back included) is given
        # back at once (_accept), not left in a dead inbox until ack_wait_s.
        for puller in self._pullers:
            await puller.stop(linger=True)
        self._spawn(self._move_own_queue())

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- intake ----------------------------------------------------------------
    @property
    def held_items(self) -> int:
        return self.runs.held

    @property
    def _items(self) -> dict[str, asyncio.Task[None]]:
        """request_id -> the task serving it here (tests kill a worker through it)."""
        return {r.request_id: r.task for r in self.runs.runs() if r.task is not None}

    def _room_msgs(self) -> int:
        """Work messages we can take now; a message may carry up to max_batch items."""
        free = self.settings.worker.capacity - self.runs.held
        if free <= 0 or self._state is not WorkerState.READY:
            return 0
        return max(1, free // max(1, self.settings.orchestrator.max_batch))

    async def _accept(self, msg: Msg) -> None:
        """One delivery of a work message: start what is not running here yet."""
        assert self.ctx is not None
        seq, deliveries, enqueued = delivery(msg.reply)
        if self.runs.refresh(seq, msg):
            log.info("work message %d delivered again (%d) while held here", seq, deliveries)
            return
        if self._state is not WorkerState.READY:  # a pull request sent before it stopped
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        if self.kv_pump is not None:
            self.kv_pump.poke()
        try:
            batch = work_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.error("undecodable work message %d dead-lettered: %s", seq, exc)
            await store_dead_letter(self.ctx, seq=seq, subject=msg.subject, data=msg.data,
                                    deliveries=deliveries, reason=f"undecodable: {exc}")
            await msg.ack()
            return
        over = deliveries > 1 + self.settings.worker.max_migrations
        letter = Letter(seq, msg.subject, deliveries, msg.data) if over else None
        # Waited long in LLM_WORK: normal for a busy pool, but also what a message
        # looks like when a broker killed -9 forgot it was delivered. Check first.
        stale = time.time() * 1000 - enqueued > self.settings.worker.check_after_s * 1000
        waits: list[Run] = []
        starts: list[Run] = []
        for item in batch.items:
            running = self.runs.get(item.request.request_id)
            if running is not None and not _continues(running.item, item):
                # Runs here already: its outcome settles this message too.
                log.info("%s already runs here; message %d waits for it",
                         running.request_id, seq)
                waits.append(running)
                continue
            if not item.enqueued_ms:
                item = msgspec.structs.replace(item, enqueued_ms=enqueued)
            run = self.runs.add(item, check=deliveries > 1 or item.redispatched or stale,
                                after=running, letter=letter)
            waits.append(run)
            starts.append(run)
        if not self.runs.hold(seq, msg, waits):
            await msg.ack()
            return
        for run in starts:
            run.task = asyncio.create_task(self._serve(run), name=f"item-{run.request_id}")

    async def _serve(self, run: Run) -> None:
        """Bring one run to its stored outcome, then ack what waited for it."""
        assert self.ctx is not None
        try:
            try:  # the common case, without a retry loop's frame around it
                outcome: Outcome | None = await serve(self.ctx, run)
            except Superseded as exc:  # it settles once the run that took over has
                log.info("%s", exc)
                run.check = True
                outcome = await self._outcome(run, tried=1)
            except Exception:
                log.exception("outcome of %s not stored (try 1)", run.request_id)
                outcome = await self._outcome(run, tried=1)
            if outcome in _FAULTS:
                await self._engine_failed(outcome is Outcome.ENGINE_DEAD)
                outcome = await self._outcome(run, tried=0)
        except BaseException:  # cancelled: no ack, no nak (a redelivery settles them)
            self._end(run, stored=False)
            self.runs.transition(run, None)
            raise
        msgs = self._end(run, stored=outcome is not None)
        if outcome in (Outcome.FINAL, Outcome.HANDOFF):
            self._engine_errors = 0  # the engine works
            self.served += 1
        try:
            for msg in msgs:
                with contextlib.suppress(Exception):  # lost: redelivered, then found stored
                    if outcome is None:
                        await msg.nak(delay=1.0)
                    elif self._state is WorkerState.READY:
                        await msg.ack()
                    else:  # leaving: our consumer is deleted next, so the ack must land first
                        await msg.ack_sync(timeout=self.settings.worker.publish_timeout_s)
        finally:
            self.runs.transition(run, None)

    def _end(self, run: Run, *, stored: bool) -> list[Msg]:
        """The run is DONE: the messages to settle. No await between the run's end
        and settling its messages: a duplicate accepted in between would wait
        for an outcome already past."""
        msgs = self.runs.finish(run, stored=stored)
        if run.claimed and self.ctx is not None and self.ctx.claims is not None:
            self._spawn(self.ctx.claims.release(run.request_id))
        for puller in self._pullers:
            puller.poke()
        if self.kv_pump is not None:  # what the run left in the cache goes out at once
            self.kv_pump.poke()
        return msgs

    async def _outcome(self, run: Run, *, tried: int) -> Outcome | None:
        """serve() the run again until its outcome is stored (`tried` times failed
        so far); None when it never was. After an engine fault the run leaves
        (serve returns no second fault)."""
        assert self.ctx is not None
        for n in range(tried, _STORE_TRIES):
            if n:
                await asyncio.sleep(n)
            try:
                return await serve(self.ctx, run)
            except Exception:
                log.exception("outcome of %s not stored (try %d)", run.request_id, n + 1)
        return None

    async def _consumer_gone(self, target: str) -> None:
        """Our consumer on `target` was deleted (a leader took this worker for dead
        while it was only slow, or an operator): re-create it and go on pulling."""
        if self.ctx is None or self._state is not WorkerState.READY:
            return
        try:
            await ensure_work_consumer(self.ctx.js, self.settings, self.role, target)
            log.warning("worker %s re-created its consumer for %s", self.worker_id, target)
        except Exception as exc:  # the next failed pull reports it again
            log.warning("could not re-create the consumer for %s: %s", target, exc)

    # -- connection loss ---------------------------------------------------------
    async def _on_disconnect(self) -> None:
        """Hold every chunk from here on: after the reconnect we first make sure
        no other worker took our requests over (a broker killed -9 may hand a
        message out again), and send only then."""
        if self.ctx is not None:
            self.ctx.gate.clear()
        if self._nc is not None:  # chunks and terminals go out again only once checked
            n = drop_pending(self._nc, f"{self.subjects.prefix}.s.")
            if n:
                log.info("dropped %d output publishes buffered for the lost connection", n)

    async def _on_reconnect(self) -> None:
        """Streams and consumers back (a broker that lost its store), then claim
        every run that crossed the outage or give it up, then open the gate."""
        assert self.ctx is not None
        ctx = self.ctx
        ctx.connected_since = time.monotonic()
        await streams_ready(ctx.js, self.settings)
        for target in self._targets():
            if target != self.worker_id or self._own_durable:
                await ensure_work_consumer(ctx.js, self.settings, self.role, target)
        # Outputs being stored wait for the gate too (context._until_connected): a
        # run taken over is stopped before it publishes anything more.
        lost = await taken_over(ctx)
        for run in lost:
            log.warning("%s was taken over during the outage; giving up this run",
                        run.request_id)
            if run.task is not None:
                run.task.cancel()  # no ack, no nak: the other run owns the message now
        for run in ctx.runs.runs():  # gap-free again before any new chunk goes out
            if run not in lost and run.stream is not None and run.running is not None:
                try:
                    await ctx.resend_tail(run.running, run.stream)
                except Exception as exc:  # its terminal re-checks the whole stream first
                    log.info("could not re-send the tail of %s yet: %s", run.request_id, exc)
        ctx.gate.set()

    async def _on_claim_lost(self, request_id: str) -> None:
        """Another worker holds the request now: stop this run, unless it is
        storing its outcome already (or has not begun)."""
        run = self.runs.get(request_id)
        if run is None:
            return
        run.claimed = False
        if run.task is not None and run.state is not None and (
                RunState.CHECKING <= run.state <= RunState.RUNNING):
            run.task.cancel()

    # -- control ---------------------------------------------------------------
    async def _on_cancel(self, key: str) -> None:
        req = run.item.request if (run := self.runs.get(key_request_id(key))) else None
        if req is not None and cancel_names(key, req.group, req.request_id):
            await self.engine.abort(req.request_id)

    def _on_peer(self, hb: Heartbeat) -> None:
        """Another worker's heartbeat: it is alive (see ServeContext.peer_alive)."""
        if self.ctx is None:
            return
        self.ctx.peers[hb.worker_id] = (time.monotonic(), hb.started_ms)

    async def _on_hb_request(self, msg: Msg) -> None:
        if ADMIN_GUARD.admit(msg, self.subjects.heartbeat_request):
            await self._publish_heartbeat()

    async def _in_progress_loop(self) -> None:
        """in_progress() for every held message, then a PING: once the server has
        answered, none of them can be redelivered before `ack_wait_s` from the
        round's start, and the fence (workers/fence.py) opens that far."""
        ws = self.settings.worker
        me = asyncio.current_task()
        while me is None or not me.cancelling():  # a cancel lost in round_trip (bus/tasks.py)
            await asyncio.sleep(ws.in_progress_every_s)
            start = time.monotonic()
            for msg in self.runs.msgs():
                with contextlib.suppress(Exception):
                    await msg.in_progress()
            if self._nc is None or self.ctx is None or self.ctx.fence is None:
                continue
            if await round_trip(self._nc, ws.ack_wait_s / 2):
                self.ctx.fence.progress_confirmed(start)
            else:  # cut off or slow: the fence closes on time
                log.info("in_progress round not confirmed by the server")

    async def _refence(self) -> float:
        """The fence closed (this process was paused, starved or cut off past what
        it could vouch for): claim every run, stop the ones another worker took
        over. Returns when the check began (its result holds from then)."""
        assert self.ctx is not None
        start = time.monotonic()
        lost = await taken_over(self.ctx)
        for run in lost:
            log.warning("%s was taken over while this worker was away; giving up this run",
                        run.request_id)
            if run.task is not None:
                run.task.cancel()  # no ack, no nak: the other run owns the message now
        log.info("fence checked %d runs after a stall: %d lost", self.runs.held, len(lost))
        return start

    def heartbeat(self) -> Heartbeat:
        from cplane.workers import gpu

        st = self.engine.stats()
        g = (gpu.sample(self.settings.worker.heartbeat_s)
             if self.engine.name in gpu.GPU_ENGINES else None)
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
            price_in_per_1k=self.settings.worker.price_in_per_1k,
            price_out_per_1k=self.settings.worker.price_out_per_1k,
            # Engines that know their layout say so (VllmEngine); the setting wins.
            parallelism=self.settings.worker.parallelism or getattr(
                self.engine, "parallelism", 1),
            ttft_ms_avg=self.ctx.latency.ttft_ms if self.ctx else 0.0,
            tpot_ms_avg=self.ctx.latency.tpot_ms if self.ctx else 0.0,
            served=self.served,
            faults=self.faults,
            ts_ms=time.time() * 1000,
            started_ms=self._started_ms,
            gpu_util=g.util if g else None,
            gpu_mem_used_bytes=g.mem_used_bytes if g else None,
            gpu_mem_total_bytes=g.mem_total_bytes if g else None,
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
            if self._state is WorkerState.UNHEALTHY:  # work sent here before the news spread
                self._spawn(self._move_own_queue())
