"""The decision core: every scheduling decision, from a snapshot to its effects. No I/O.

The live orchestrator (orchestrator/service.py) and the fleet simulator
(fleetsim/sim.py) are two thin shells around one `DecisionCore`: they feed
it the same inputs (a request held, a fleet snapshot and the clock, a work
publish stored or refused, a terminal seen) and carry out what it returns
with their own clock (real NATS, virtual time). The core owns the request
ledger (orchestrator/ledger.py) and the decision state
(orchestrator/decision_state.py) and changes both in the same call, so
nothing else folds a plan back, and no observer runs behind a transition.

One step, as both shells take it:

    step = core.step(fleet, now_ms=..., rng=..., due=...)   # plan_dispatch + apply
    for rejected in step.rejected:   publish its ErrorReply, then core.finished_own(entry)
    for out in step.publish:         publish the batch; core.stored(entries) or core.refused(...)
    ...later: core.terminal(request_id, now_ms, ttft_ms)    # frees the slot, counts a miss

A `Journal` (optional) records every input and every plan, so a run of either
shell can be replayed through a fresh core (`replay`) and must plan the same.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import msgspec

from cplane.orchestrator.decision_state import DecisionState
from cplane.orchestrator.dispatch import (
    Batch,
    DispatchConfig,
    DispatchPlan,
    QueueSnapshot,
    Rejection,
    free_slots,
    headroom,
    plan_dispatch,
)
from cplane.orchestrator.fleet import FleetView, RoutedSince
from cplane.orchestrator.ledger import Entry, Ledger, RequestState
from cplane.orchestrator.plugin_types import Policy, Router
from cplane.orchestrator.snapshot import PoolKey

T = TypeVar("T")
LEVELS = 5  # priority levels: 0 = critical ... 4 = background


@dataclass(frozen=True, slots=True)
class Publish(Generic[T]):
    """Publish `batch` as one WorkBatch, then ack its requests: `stored` or `refused`."""

    batch: Batch
    entries: tuple[Entry[T], ...]  # in the batch's order; DISPATCHING now
    routed: bool  # to one worker (not a pool subject)


@dataclass(frozen=True, slots=True)
class Step(Generic[T]):
    """What one step decided, already applied to the ledger and the decision state."""

    plan: DispatchPlan
    publish: tuple[Publish[T], ...] = ()
    # Publish an ErrorReply for each, then `finished_own` (FINISHING now).
    rejected: tuple[tuple[Rejection, Entry[T]], ...] = ()


@dataclass(slots=True)
class Journal:
    """Every input a core was given and every plan it made, in order (tests, replay).

    Each event is (name, args). Two inputs reach the core's tables from outside
    it and are recorded with each step instead: the routed-since counters (the
    fleet registry resets a worker's on its heartbeat) and the random state.
    Workers' KV events (orchestrator/kv_feed.py) fold into the prefix index
    unrecorded: a run with precise prefix routing does not replay exactly."""

    events: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    plans: list[DispatchPlan] = field(default_factory=list)

    def add(self, name: str, *args: Any) -> None:
        self.events.append((name, args))


class DecisionCore(Generic[T]):
    def __init__(self, cfg: DispatchConfig, *, tenant_weights: Mapping[str, float] | None = None,
                 prefill_tokens_per_s: float = 40_000.0, routed_since: RoutedSince | None = None,
                 journal: Journal | None = None) -> None:
        self.cfg = cfg
        self.ledger: Ledger[T] = Ledger(LEVELS)
        self.state = DecisionState(tenant_weights=tenant_weights,
                                   prefill_tokens_per_s=prefill_tokens_per_s,
                                   routed_since=routed_since)
        self.journal = journal

    # -- configuration ------------------------------------------------------------
    def use_policy(self, policy: Policy) -> None:
        """Plan by `policy` from the next step on; adaptive starts afresh."""
        if self.journal is not None:
            self.journal.add("use_policy", policy)
        self.cfg = replace(self.cfg, policy=policy)
        self.state.mode, self.state.mode_since = "", -1.0

    def use_router(self, router: Router) -> None:
        """Route with `router` from the next step on (a policy with its own keeps it)."""
        if self.journal is not None:
            self.journal.add("use_router", router)
        self.cfg = replace(self.cfg, router=router)

    # -- requests in --------------------------------------------------------------
    def hold(self, entry: Entry[T]) -> None:
        """A new request waits for a plan (HELD)."""
        if self.journal is not None:
            self.journal.add("hold", entry.pending)
        self.ledger.transition(entry, RequestState.HELD)
        self.state.held(entry.pending.tenant)

    def release(self, entry: Entry[T]) -> None:
        """A held request handed back to JetStream (this replica stops leading)."""
        if self.journal is not None:
            self.journal.add("release", entry.request_id)
        self.ledger.transition(entry, None)
        self.state.finished(entry.pending.tenant, 0.0, ran=False)

    def finish_own(self, entry: Entry[T]) -> None:
        """A held request gets a terminal of ours (cancelled): FINISHING until stored."""
        if self.journal is not None:
            self.journal.add("finish_own", entry.request_id)
        self.ledger.transition(entry, RequestState.FINISHING)

    def finished_own(self, entry: Entry[T], now_ms: float) -> None:
        """Our own terminal (rejection, cancel) is stored, or will be retried by
        JetStream's redelivery: the request leaves the ledger without having run."""
        if self.journal is not None:
            self.journal.add("finished_own", entry.request_id, now_ms)
        self.ledger.transition(entry, None)
        self.state.finished(entry.pending.tenant, now_ms, ran=False)

    # -- the step -----------------------------------------------------------------
    def room(self, fleet: FleetView, in_flight: Mapping[PoolKey, int]) -> int:
        spare = free_slots(fleet, in_flight, headroom(self.cfg, self.state.mode))
        return sum(max(0, f) for f in spare.values())

    def in_flight(self, inherited: Mapping[PoolKey, int] | None = None) -> dict[PoolKey, int]:
        """What each pool holds: the ledger's count, plus `inherited` (after a takeover,
        until it drained: what workers report holding, an earlier leader's work
        among it, for every pool the fleet serves; counting this replica's own
        running work twice errs toward dispatching less, never more)."""
        if inherited is None:
            return self.ledger.in_flight_by_pool()
        return {pool: self.ledger.in_flight(pool) + n for pool, n in inherited.items()}

    def step(self, fleet: FleetView, *, now_ms: float, rng: random.Random, due: bool,
             inherited: Mapping[PoolKey, int] | None = None) -> Step[T] | None:
        """Plan what is held and apply the plan. None when no pool has room and nothing
        is `due` (the shell's ticker: shedding, aging and model waits go on while
        pools are full)."""
        st = self.state
        if self.journal is not None:
            self.journal.add("step", fleet, now_ms, due,
                             None if inherited is None else dict(inherited),
                             dict(st.since.sent), dict(st.since.done), rng.getstate())
        in_flight = self.in_flight(inherited)
        st.prefix.now_ms = now_ms  # sent blocks count as held for a while (pending_ms)
        st.decay_placed(now_ms)
        room = self.room(fleet, in_flight)
        if room <= 0 and not due:
            return None
        k = room + self.cfg.policy.lookahead
        levels = tuple(tuple(e.pending for e in self.ledger.held_heads(level, k))
                       for level in range(LEVELS))
        plan = plan_dispatch(QueueSnapshot(levels, in_flight), fleet, self.cfg, now_ms=now_ms,
                             tables=st.tables, rng=rng, measured=st.measured(fleet, now_ms))
        st.applied(plan, now_ms)
        if self.journal is not None:
            self.journal.plans.append(plan)
        return self._apply(plan)

    def _apply(self, plan: DispatchPlan) -> Step[T]:
        ledger = self.ledger
        rejected: list[tuple[Rejection, Entry[T]]] = []
        for rej in plan.rejections:
            entry = ledger.get(rej.request_id)
            if entry is not None and entry.state is RequestState.HELD:
                ledger.transition(entry, RequestState.FINISHING)
                rejected.append((rej, entry))
        publish: list[Publish[T]] = []
        fair = self.cfg.policy.fair
        for batch in plan.batches:
            entries = tuple(e for rid in batch.request_ids if (e := ledger.get(rid)) is not None
                            and e.state is RequestState.HELD)
            if not entries:
                continue
            routed = batch.target in plan.sent  # to one worker, not a pool
            pendings = [e.pending for e in entries]
            for e in entries:
                ledger.transition(e, RequestState.DISPATCHING, batch.pool)
                e.target = batch.target if routed else ""
            self.state.dispatched(pendings, fair)
            if routed:
                self.state.sent_to(batch.target, pendings)
            publish.append(Publish(batch, entries, routed))
        return Step(plan, tuple(publish), tuple(rejected))

    # -- effects reported back ----------------------------------------------------------
    def stored(self, entries: Sequence[Entry[T]], now_ms: float) -> list[Entry[T]]:
        """Their work is stored (acks may go): DISPATCHED, holding their pool's slot.
        Returns those whose terminal was seen meanwhile (they left the ledger)."""
        if self.journal is not None:
            self.journal.add("stored", tuple(e.request_id for e in entries), now_ms)
        done = []
        for e in entries:
            self.ledger.transition(e, RequestState.DISPATCHED)
            e.dispatched_ms = now_ms
            if e.terminal_seen is not None:  # its Final raced our ack (zero-cost engines)
                self._left(e, now_ms, e.terminal_seen)
                done.append(e)
        return done

    def refused(self, entries: Iterable[Entry[T]], *, redispatch: bool = False) -> None:
        """Their work was not stored: HELD again, planned anew (`redispatch`: it may
        have been stored after all, so each goes alone, checked)."""
        entries = list(entries)
        if self.journal is not None:
            self.journal.add("refused", tuple(e.request_id for e in entries), redispatch)
        for e in entries:
            self.ledger.transition(e, RequestState.HELD)
            e.target = ""
            if redispatch:
                self.mark_redispatched(e)

    def mark_redispatched(self, entry: Entry[T]) -> None:
        """An earlier dispatch of this request cannot be ruled out: it goes out alone."""
        if not entry.pending.redispatched:
            entry.pending = msgspec.structs.replace(entry.pending, redispatched=True)

    def terminal(self, request_id: str, now_ms: float, ttft_ms: float = -1.0) -> bool:
        """A request's terminal is stored (`ttft_ms`: its first token's latency, -1 when
        it produced none). True when that freed a slot."""
        if self.journal is not None:
            self.journal.add("terminal", request_id, now_ms, ttft_ms)
        entry = self.ledger.get(request_id)
        if entry is None:
            return False
        if entry.state is RequestState.DISPATCHED:
            self._left(entry, now_ms, ttft_ms)
            return True
        if entry.state is RequestState.DISPATCHING:
            entry.terminal_seen = ttft_ms
        return False

    def _left(self, e: Entry[T], now_ms: float, ttft_ms: float) -> None:
        self.ledger.transition(e, None)
        missed = None if ttft_ms < 0 else ttft_ms > e.pending.ttft_target_ms
        self.state.finished(e.pending.tenant, now_ms, True, missed)
        if e.target:
            self.state.since.finished_on(e.target)

    # -- the fleet --------------------------------------------------------------------
    def forget_worker(self, worker_id: str) -> None:
        """A worker stopped or expired: its prefix blocks and placed work go."""
        if self.journal is not None:
            self.journal.add("forget_worker", worker_id)
        self.state.forget_worker(worker_id)


def replay(journal: Journal, cfg: DispatchConfig, **core_kw: Any) -> list[DispatchPlan]:
    """Run a recorded journal's inputs through a fresh core; the plans it makes.

    A shell that adds no decision of its own replays to the very plans it made."""
    out = Journal()
    core: DecisionCore[None] = DecisionCore(cfg, journal=out, **core_kw)
    rng = random.Random()
    for name, args in journal.events:
        if name == "hold":
            core.hold(Entry(args[0], None))
        elif name == "step":
            fleet, now_ms, due, inherited, sent, done, rng_state = args
            core.state.since.replace(sent, done)
            rng.setstate(rng_state)
            core.step(fleet, now_ms=now_ms, rng=rng, due=due, inherited=inherited)
        elif name == "use_policy":
            core.use_policy(args[0])
        elif name == "use_router":
            core.use_router(args[0])
        elif name == "forget_worker":
            core.forget_worker(args[0])
        elif name == "terminal":
            core.terminal(*args)
        else:
            _replay_entries(core, name, args)
    return out.plans


def _replay_entries(core: DecisionCore[None], name: str, args: tuple[Any, ...]) -> None:
    # A replay that diverged (another configuration) skips effects on requests its
    # own plans did not dispatch: it runs on, and its plans differ.
    ledger = core.ledger
    if name in ("stored", "refused"):
        entries = [e for rid in args[0] if (e := ledger.get(rid)) is not None
                   and e.state is RequestState.DISPATCHING]
        if name == "stored":
            core.stored(entries, args[1])
        else:
            core.refused(entries, redispatch=args[1])
    elif (e := ledger.get(args[0])) is not None:
        if name == "release" and e.state is RequestState.HELD:
            core.release(e)
        elif name == "finish_own" and e.state is RequestState.HELD:
            core.finish_own(e)
        elif name == "finished_own" and e.state is RequestState.FINISHING:
            core.finished_own(e, args[1])


__all__ = ["LEVELS", "DecisionCore", "Journal", "Publish", "Step", "replay"]
