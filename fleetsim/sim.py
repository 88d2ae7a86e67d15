"""The fleet simulator: a trace through the live decision code, in virtual time.

Events (a heap ordered by virtual ms, ties by insertion, so runs replay):
arrivals reach the orchestrator `intake_ms` after their trace time and are
held by the live decision core (orchestrator/core.py: the live ledger,
decision state and plugins); a plan is the core's `step` over the fleet as
of its last heartbeats, applied by the core as the live orchestrator's is;
work messages land on the pool or a worker's own queue
`work_ms` later; workers take whole messages while they have a free slot
(as workers/runtime.py does) and run the live sim engine's `StepCore`; a
finished request reaches the core (`terminal`, with its TTFT) `done_ms` later.
Heartbeats refresh every worker's view each `heartbeat_ms`. What the client
sees adds `token_ms` (chunk publish and republish) to each token time.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cplane.fleetsim.records import RequestRecord, RunResult, TraceRequest
from cplane.fleetsim.worker import Item, Run, SimSeq, SimWorker
from cplane.orchestrator.core import DecisionCore, Journal
from cplane.orchestrator.dispatch import DispatchConfig
from cplane.orchestrator.fleet import FleetView, WorkerView
from cplane.orchestrator.ledger import Entry
from cplane.orchestrator.slo import resolve
from cplane.orchestrator.snapshot import Pending
from cplane.schemas.messages import Role
from cplane.schemas.settings import DEFAULT_SLO_CLASSES, SimSettings, SloClass
from cplane.schemas.subjects import ANY_TARGET
from cplane.workers.latency import LatencyAverages

_ARRIVE, _PLAN, _WORK, _STEP, _DONE, _BEAT, _WAKE, _TICK, _KV = range(9)


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """The simulated fleet and the messaging delays around it (ms)."""

    workers: int = 8  # unified workers
    prefill_workers: int = 0  # PD: a prefill pool ...
    decode_workers: int = 0  # ... and a decode pool
    capacity: int = 64  # slots per worker (worker.capacity)
    model: str = "sim"
    engine: SimSettings = field(default_factory=SimSettings)
    # Per-worker engines and slots (unified, then prefill, then decode workers, in
    # order; fleetsim/engine_model.py builds them from a parallel layout). Empty =
    # every worker runs `engine` with `capacity` slots.
    worker_engines: tuple[SimSettings, ...] = ()
    worker_capacities: tuple[int, ...] = ()
    # ...and the GPUs each engine spans (heartbeats: Request.parallelism_hint); empty = 1.
    worker_parallelism: tuple[int, ...] = ()
    # Messaging delays: medians measured on the live stack (bench/fidelity.py: one
    # nats-server, orchestrator and sim workers as processes on one 2-core host;
    # 2026-11-29). Under load they are shorter than on an idle stack (token 0.5 vs 1.0).
    heartbeat_ms: float = 1000.0  # worker.heartbeat_s
    intake_ms: float = 1.3  # publish -> held by the orchestrator (publish -> dispatched 1.2-1.4)
    work_ms: float = 0.9  # plan -> work message taken by a worker (0.8-1.2, zero-cost engine)
    done_ms: float = 1.0  # Final -> the orchestrator frees the slot (as Final -> client: 1.0)
    token_ms: float = 0.6  # token out of the engine -> at the client (0.4-0.6 under load)
    handoff_ms: float = 1.0  # PD: prefill Final -> decode work stored
    pull: str = "lru"  # which worker with room takes pool work: lru | random
    slo_classes: Mapping[str, SloClass] = field(default_factory=lambda: dict(DEFAULT_SLO_CLASSES))
    shed: bool = True  # sheddable classes are shed when late (admission control)
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    # Prices per 1000 tokens (in, out) by worker index: cost_optimized's fleet.
    prices: tuple[tuple[float, float], ...] = ()
    plan_ms: float = 1.0  # a plan and its publishes keep the orchestrator busy this long
    horizon_ms: float = 3_600_000.0  # stop this long after the last arrival
    max_run_steps: int = 0  # decode steps priced at once at most (0 = to the next finish)
    # A step with prefills and decodes is one forward pass (vLLM V1), not a prefill
    # pass then a decode pass (the engine model's sum): workers/engines/stepcore.py `fused_ms`.
    fused_steps: bool = False
    # Workers forward their engine's prefix-cache events this often (worker.kv_events_ms;
    # 0 = none: prefix routers know only what they sent). Arrive `kv_ms` later.
    kv_events_ms: float = 0.0
    kv_ms: float = 0.5


@dataclass(slots=True)
class _Msg:
    items: list[Item]


@dataclass(slots=True)
class _Orch:
    """The orchestrator: the live decision core, and when it plans (virtual ms)."""

    core: DecisionCore[RequestRecord]
    plan_at: float = -1.0  # a plan is scheduled at this time (coalesces wakes)
    busy_until: float = 0.0  # the plan in progress ends then
    tick_at: float = 0.0  # the live ticker: plan even without room (shedding, aging)


class Simulation:
    """One run: `Simulation(reqs, fleet, cfg, seed).run()` -> RunResult."""

    def __init__(self, reqs: Sequence[TraceRequest], fleet: FleetSpec, cfg: DispatchConfig,
                 *, seed: int = 0, progress: Callable[[int], None] | None = None,
                 journal: Journal | None = None) -> None:
        self.fleet = fleet
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.records = [RequestRecord(r) for r in sorted(reqs, key=lambda r: r.arrival_ms)]
        self.by_id = {rec.req.request_id: rec for rec in self.records}
        self.progress = progress
        self.workers: dict[str, SimWorker] = {}
        roles = ((Role.UNIFIED, fleet.workers, "u"), (Role.PREFILL, fleet.prefill_workers, "p"),
                 (Role.DECODE, fleet.decode_workers, "d"))
        n_all = fleet.workers + fleet.prefill_workers + fleet.decode_workers
        for seq, (role, i, tag) in enumerate((r, i, t) for r, n, t in roles for i in range(n)):
            wid = f"{tag}{i:03d}"
            self.workers[wid] = SimWorker(
                wid, role, fleet.model, _per_worker(fleet.worker_capacities, seq, n_all,
                                                    fleet.capacity),
                _per_worker(fleet.worker_engines, seq, n_all, fleet.engine), cfg.max_batch,
                fleet.max_run_steps, fleet.fused_steps)
        self._of_role = {r: [w for w in self.workers.values() if w.role is r] for r in Role}
        self.pools: dict[Role, list[_Msg]] = {r: [] for r in Role}  # the `any` subjects
        self.own: dict[str, list[_Msg]] = {w: [] for w in self.workers}
        self.orch = _Orch(DecisionCore(
            cfg, tenant_weights=fleet.tenant_weights, journal=journal,
            prefill_tokens_per_s=1000 / max(1e-9, fleet.engine.prefill_b_ms)))
        self.view = FleetView()
        self._heap: list[tuple[float, int, int, Any]] = []
        self._tie = itertools.count()
        self.now = 0.0
        self.events = 0
        self.finished = 0
        self.samples: list[tuple[float, tuple[int, ...]]] = []
        self._index = {wid: i for i, wid in enumerate(self.workers)}
        self._latency: dict[str, LatencyAverages] = {}  # per worker, for heartbeats
        self._pull_rng = random.Random(seed + 0x5EED)  # which waiting pull gets pool work

    # -- event plumbing -------------------------------------------------------
    def _at(self, t: float, kind: int, data: Any = None) -> None:
        heapq.heappush(self._heap, (t, next(self._tie), kind, data))

    def run(self) -> RunResult:
        t0 = time.perf_counter()
        for rec in self.records:
            self._at(rec.req.arrival_ms + self.fleet.intake_ms, _ARRIVE, rec)
        self._heartbeat()
        last = self.records[-1].req.arrival_ms if self.records else 0.0
        stop = last + self.fleet.horizon_ms
        handlers = (self._arrive, self._plan, self._work, self._step, self._done,
                    self._beat, self._wake, self._tick, self._kv)
        if self.fleet.kv_events_ms > 0:
            for w in self.workers.values():
                w.core.cache.record = True
            self._at(self.fleet.kv_events_ms, _KV)
        total = len(self.records)
        heap = self._heap
        while heap and self.finished < total:
            t, _, kind, data = heapq.heappop(heap)
            if t > stop:
                break
            self.now = t
            self.events += 1
            handlers[kind](data)
        first = self.records[0].req.arrival_ms if self.records else 0.0
        ends = [r.finished_ms for r in self.records if r.finished_ms is not None]
        s = self.fleet.engine
        return RunResult(
            records=self.records, workers=len(self.workers),
            duration_ms=(max(ends) if ends else self.now) - first,
            load_samples=self.samples,
            prefix_hit_tokens=sum(w.core.prefix_hit_tokens for w in self.workers.values()),
            prefix_query_tokens=sum(w.core.prefix_query_tokens for w in self.workers.values()),
            prefix_block_tokens=s.prefix_block_tokens,
            prefix_cache_blocks=s.prefix_cache_tokens // max(1, s.prefix_block_tokens),
            events=self.events, wall_s=time.perf_counter() - t0)

    # -- orchestrator ---------------------------------------------------------
    def _arrive(self, rec: RequestRecord) -> None:
        r = rec.req
        slo = resolve(r.slo_class, self.fleet.slo_classes, "standard")
        p = Pending(request_id=r.request_id, level=r.level, arrival_ms=r.arrival_ms,
                    held_ms=self.now, model=r.model or self.fleet.model,
                    prompt_tokens=r.prompt_tokens, output_tokens=r.output_tokens,
                    tenant=r.tenant, slo_class=slo.name, session=r.session,
                    block_hashes=r.block_hashes, ttft_target_ms=slo.ttft_ms,
                    tpot_target_ms=slo.tpot_ms, sheddable=slo.sheddable and self.fleet.shed,
                    cost_budget=r.cost_budget)
        self.orch.core.hold(Entry(p, rec))
        self._want_plan()

    def _want_plan(self) -> None:
        # One plan at a time: what arrives while the orchestrator plans and
        # publishes waits for the next plan (and goes out in the same batch).
        at = max(self.now, self.orch.busy_until)
        if self.orch.plan_at < at:
            self.orch.plan_at = at
            self._at(at, _PLAN)

    def _plan(self, _: Any) -> None:
        o = self.orch
        o.busy_until = self.now + self.fleet.plan_ms
        core = o.core
        if not core.ledger.held_count():
            return
        due = self.now >= o.tick_at
        step = core.step(self.view, now_ms=self.now, rng=self.rng, due=due)
        if step is None:
            return
        if due:
            o.tick_at = self.now + 250.0
        for rej, entry in step.rejected:  # its ErrorReply is at the client at once
            rec = entry.item
            rec.rejected = rej.code.value
            rec.finished_ms = self.now
            core.finished_own(entry, self.now)
            self._finished()
        for out in step.publish:
            items = []
            for e in out.entries:
                e.item.dispatched_ms = self.now
                items.append(Item(e.item, out.batch.pool, out.batch.role))
            core.stored(out.entries, self.now)  # the publish is acked at once here
            self._at(self.now + self.fleet.work_ms, _WORK,
                     (out.batch.role, out.batch.target, _Msg(items)))
        if core.ledger.held_count():  # the ticker: shedding and aging go on while pools are full
            self._at(o.tick_at, _TICK)

    def _done(self, rid: str) -> None:
        """A Final reached the orchestrator: its pool has room again, its TTFT counts."""
        ttft = self.by_id[rid].ttft_ms
        self.orch.core.terminal(rid, self.now, -1.0 if ttft is None else ttft)
        self._want_plan()

    def _tick(self, _: Any) -> None:
        if self.now >= self.orch.tick_at:
            self._want_plan()

    def _finished(self) -> None:
        self.finished += 1
        if self.progress is not None:
            self.progress(1)

    # -- workers --------------------------------------------------------------
    def _work(self, data: tuple[Role, str, _Msg]) -> None:
        role, target, msg = data
        if target == ANY_TARGET or target not in self.workers:
            self.pools[role].append(msg)
            # Pull consumers: JetStream serves the oldest waiting pull request;
            # a worker re-issues its pull after taking work, so among workers
            # with room the one that took work longest ago is served first.
            ready = [w for w in self._of_role[role] if w.room_msgs() > 0]
            if ready:
                if self.fleet.pull == "random":
                    w = ready[self._pull_rng.randrange(len(ready))]
                else:
                    w = min(ready, key=lambda w: w.last_pull)
                self._pull(w)
        else:
            self.own[target].append(msg)
            self._pull(self.workers[target])

    def _pull(self, w: SimWorker) -> None:
        took = False
        own, pool = self.own[w.worker_id], self.pools[w.role]
        while w.room_msgs() > 0 and (own or pool):
            msg = own.pop(0) if own else pool.pop(0)
            for it in msg.items:
                it.rec.worker = w.worker_id
            w.take(msg.items, self.now, self._kv_delay(w, msg.items))
            w.last_pull = self.now
            took = True
        if took:
            self._kick(w)

    def _kv_delay(self, w: SimWorker, items: list[Item]) -> float:
        s = w.core.s  # the receiving engine's link (the fleet's engine unless per worker)
        if not items or not items[0].transferred:
            return 0.0
        return s.kv_transfer_a_ms + s.kv_transfer_b_ms * items[0].rec.req.prompt_tokens

    def _kick(self, w: SimWorker) -> None:
        """New work on w: start stepping if idle, or cut a decode run short."""
        if w.run is None:
            self._schedule(w, w.plan(self.now))
        else:
            self._schedule(w, w.cut(self.now))

    def _schedule(self, w: SimWorker, run: Run | None) -> None:
        if run is not None:
            self._at(run.end_ms, _STEP, (w, run.version))
            return
        if w.run is None and w.core.waiting:  # only KV transfers in flight
            ready = w.core.next_ready(self.now)
            if ready is not None:
                self._at(max(ready, self.now), _WAKE, w)

    def _wake(self, w: SimWorker) -> None:
        if w.run is None:
            self._schedule(w, w.plan(self.now))

    def _step(self, data: tuple[SimWorker, int]) -> None:
        w, version = data
        run = w.run
        if run is None or run.version != version:
            return  # superseded by a cut
        done = w.finish_run(run)
        for q in done:
            self._seq_done(w, q)
        self._pull(w)
        if w.run is None:
            self._schedule(w, w.plan(self.now))

    def _seq_done(self, w: SimWorker, q: SimSeq) -> None:
        rec = q.rec
        assert rec is not None
        if q.prefill_only and rec.req.output_tokens > 1:
            # The prefill side streamed the first token; decode continues elsewhere.
            entry = self.orch.core.ledger.get(rec.req.request_id)
            assert entry is not None and entry.pool is not None
            item = Item(rec, entry.pool, Role.DECODE, True)
            self._at(self.now + self.fleet.handoff_ms, _WORK,
                     (Role.DECODE, ANY_TARGET, _Msg([item])))
            return
        tm = self.fleet.token_ms
        rec.output_tokens = q.produced
        avg = self._latency.setdefault(w.worker_id, LatencyAverages())
        avg.observe(rec.first_token_ms - rec.req.arrival_ms if rec.first_token_ms else 0.0,
                    rec.tpot_ms or 0.0)
        p_in, p_out = self._price(rec.worker)
        rec.cost = (rec.req.prompt_tokens * p_in + q.produced * p_out) / 1000
        rec.first_token_ms = (rec.first_token_ms or self.now) + tm
        rec.last_token_ms = (rec.last_token_ms or self.now) + tm
        rec.finished_ms = rec.last_token_ms
        self._at(self.now + self.fleet.done_ms, _DONE, rec.req.request_id)
        self._finished()

    def _price(self, wid: str) -> tuple[float, float]:
        prices = self.fleet.prices
        if not prices or wid not in self._index:
            return 0.0, 0.0
        return prices[self._index[wid] % len(prices)]

    # -- heartbeats -------------------------------------------------------------
    def _heartbeat(self) -> None:
        views = []
        prices = self.fleet.prices
        n_all = len(self.workers)
        for i, w in enumerate(self.workers.values()):
            core = w.core
            s = core.s
            p_in, p_out = prices[i % len(prices)] if prices else (0.0, 0.0)
            lat = self._latency.get(w.worker_id)
            views.append(WorkerView(
                worker_id=w.worker_id, role=w.role, models=(w.model,), capacity=w.capacity,
                held_items=w.held, running=len(core.running), waiting=len(core.waiting),
                kv_usage=core.kv_used / s.kv_tokens if s.kv_tokens else 0.0,
                last_seen_ms=self.now, price_in_per_1k=p_in, price_out_per_1k=p_out,
                ttft_ms_avg=lat.ttft_ms if lat else 0.0, tpot_ms_avg=lat.tpot_ms if lat else 0.0,
                parallelism=_per_worker(self.fleet.worker_parallelism, i, n_all, 1)))
        self.view = FleetView(tuple(views))
        self.orch.core.state.since.heard_all()
        self.samples.append((self.now, tuple(
            w.held + sum(len(m.items) for m in self.own[w.worker_id])
            for w in self.workers.values())))
        self._at(self.now + self.fleet.heartbeat_ms, _BEAT)

    def _beat(self, _: Any) -> None:
        self._heartbeat()
        self._want_plan()

    def _kv(self, data: Any) -> None:
        """Every `kv_events_ms` each worker drains its cache changes; they reach the
        orchestrator's index `kv_ms` later (data: the changes in flight)."""
        if data is not None:
            index = self.orch.core.state.prefix
            for wid, seq, stored, removed in data:
                index.apply(wid, "sim", seq, stored, removed, False)
            return
        batch = []
        for w in self.workers.values():
            stored, removed = w.core.cache.drain()
            if stored or removed:
                w.kv_seq += 1
                batch.append((w.worker_id, w.kv_seq, stored, removed))
        if batch:
            self._at(self.now + self.fleet.kv_ms, _KV, batch)
        if self.finished < len(self.records):
            self._at(self.now + self.fleet.kv_events_ms, _KV)


def _per_worker(values: Sequence[Any], seq: int, n: int, default: Any) -> Any:
    """Worker `seq`'s entry of a per-worker tuple (empty = `default` for all)."""
    if not values:
        return default
    if len(values) != n:
        raise ValueError(f"{len(values)} per-worker entries for {n} workers")
    return values[seq]


def simulate(reqs: Sequence[TraceRequest], fleet: FleetSpec, cfg: DispatchConfig, *,
             seed: int = 0, progress: Callable[[int], None] | None = None,
             journal: Journal | None = None) -> RunResult:
    """Run `reqs` through the fleet with the decision configuration `cfg`."""
    return Simulation(reqs, fleet, cfg, seed=seed, progress=progress, journal=journal).run()


__all__ = ["FleetSpec", "Simulation", "simulate"]
