"""What decisions need from before the current plan. Pure state, no I/O.

The decision core (orchestrator/core.py) owns one `DecisionState` and tells
it every event (a request held, dispatched, finished; a plan applied) in the
same call that changes the ledger, so the live orchestrator and the fleet
simulator hand the plugins the same `Measured` and `DecisionTables`:

- the drain rate: requests finished per second over the last `window_s`;
- the prefill speed per worker: the configured estimate, raised to the
  fastest a worker has reported (heartbeats carry prompt tokens per second);
- tenant virtual counters (orchestrator/fairness.py): charged at dispatch;
  a tenant that comes back from idle is lifted to the smallest active
  counter, so idling banks no credit;
- the prefill backlog: prompt tokens dispatched, less what the fleet can
  have prefilled since at its speed (slo_aware keeps it short);
- the round-robin position and adaptive's (mode, since).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from cplane.orchestrator.dispatch import DispatchPlan
from cplane.orchestrator.fairness import FairParams, charge
from cplane.orchestrator.fleet import FleetView, RoutedSince
from cplane.orchestrator.placed_work import PlacedWork
from cplane.orchestrator.prefix_index import PrefixIndex
from cplane.orchestrator.route_index import RouteIndex
from cplane.orchestrator.snapshot import DecisionTables, Measured, Pending

MAX_IDLE_TENANTS = 10_000  # counters kept for tenants with nothing held or running


class DecisionState:
    def __init__(self, *, tenant_weights: Mapping[str, float] | None = None,
                 prefill_tokens_per_s: float = 40_000.0, window_s: float = 10.0,
                 routed_since: RoutedSince | None = None) -> None:
        self.weights = dict(tenant_weights or {})
        self.prefill_tps = prefill_tokens_per_s
        self.window_ms = window_s * 1000
        self.prefix = PrefixIndex()
        self.since = routed_since or RoutedSince()
        self.placed = PlacedWork()  # decaying tokens routed per worker
        self.index = RouteIndex()  # routers' ordered candidates, following loads
        self.since.moved = self._moved
        self.work: dict[str, float] = {}
        self.active: dict[str, int] = {}  # tenant -> requests held or running
        self.mode = ""
        self.mode_since = -1.0
        self._done: deque[float] = deque()  # finish times within the window
        self._missed: deque[tuple[float, bool]] = deque()  # (time, TTFT target missed)
        self._misses = 0  # how many of `_missed` are True (the rate in O(1) per plan)
        self.backlog = 0.0  # prompt tokens sent, not yet prefilled (estimate)
        self._backlog_ms = 0.0  # when it was last decayed
        # The live tables every plan reads (the dicts above, by reference).
        self.tables = DecisionTables(0, self.since.sent, self.since.done, self.placed,
                                     self.prefix, self.work, self.weights, self.index)

    def _moved(self, worker_id: str | None) -> None:
        if worker_id is None:
            self.index.invalidate()
        else:
            self.index.changed(worker_id)

    # -- events ---------------------------------------------------------------
    def held(self, tenant: str) -> None:
        n = self.active.get(tenant, 0)
        if n == 0:
            busy = [self.work.get(t, 0.0) for t, c in self.active.items() if c > 0]
            if busy:
                self.work[tenant] = max(self.work.get(tenant, 0.0), min(busy))
        self.active[tenant] = n + 1

    def dispatched(self, pendings: Iterable[Pending], params: FairParams) -> None:
        for p in pendings:
            self.backlog += p.prompt_tokens
            self.work[p.tenant] = self.work.pop(p.tenant, 0.0) + charge(p, params) / max(
                1e-9, self.weights.get(p.tenant, 1.0))

    def sent_to(self, worker_id: str, pendings: Iterable[Pending]) -> None:
        """Work routed to one worker (not a pool): its prefix blocks join the index,
        its tokens the worker's placed work. (The route index re-keys it at the next
        plan: `applied` marked every worker the plan sent to.)"""
        tokens = 0.0
        for p in pendings:
            self.prefix.add(worker_id, p.block_hashes)
            tokens += p.prompt_tokens + p.output_tokens
        if worker_id not in self.placed and self.placed:
            # A newcomer starts level with the least placed, not at 0 (which
            # would draw every request until it caught up).
            self.placed.set(worker_id, min(self.placed.values()))
        self.placed.add(worker_id, tokens)

    def decay_placed(self, now_ms: float) -> None:
        epoch = self.placed.epoch
        self.placed.decay(now_ms)
        if self.placed.epoch != epoch:  # stored values rewritten: lists keyed by them too
            self.index.invalidate()

    def forget_worker(self, worker_id: str) -> None:
        self.prefix.forget(worker_id)
        self.placed.forget(worker_id)
        self.index.changed(worker_id)

    def finished(self, tenant: str, now_ms: float, ran: bool = True,
                 missed: bool | None = None) -> None:
        """A request left: it ran (counts toward the drain rate) or was refused;
        `missed`: whether its TTFT was over its target, when the shell knows."""
        if missed is not None:
            self._missed.append((now_ms, missed))
            self._misses += missed
        n = self.active.get(tenant, 0) - 1
        if n > 0:
            self.active[tenant] = n
        else:
            self.active.pop(tenant, None)
            self._forget_idle_tenants()
        if ran:
            self._done.append(now_ms)

    def _forget_idle_tenants(self) -> None:
        """Tenant names come from requests: keep the counters of idle ones bounded
        (the oldest idle go first; one that returns is lifted to the active minimum)."""
        if len(self.work) <= MAX_IDLE_TENANTS:
            return
        busy = sum(1 for t in self.active if t in self.work)
        extra = len(self.work) - busy - MAX_IDLE_TENANTS
        if extra <= 0:
            return
        idle = []
        for t in self.work:  # least recently charged first (charging re-inserts)
            if t not in self.active:
                idle.append(t)
                if len(idle) == extra:
                    break
        for t in idle:
            del self.work[t]

    def applied(self, plan: DispatchPlan, now_ms: float) -> None:
        """Fold a plan's routing back: items sent per worker, round-robin steps, mode."""
        self.since.routed(plan.sent, now_ms)
        self.tables.step += plan.route_steps
        self.mode, self.mode_since = plan.mode, plan.mode_since_ms

    # -- what the next plan reads -----------------------------------------------
    def measured(self, fleet: FleetView, now_ms: float) -> Measured:
        done = self._done
        while done and now_ms - done[0] > self.window_ms:
            done.popleft()
        # Over the window, or since the first finish when younger than that.
        span = min(self.window_ms, now_ms - done[0]) if done else 0.0
        drain = len(done) / (span / 1000) if span >= 500 else 0.0
        self.prefill_tps = max(self.prefill_tps, fleet.max_prompt_tokens_per_s)
        # The fleet prefills what it was sent at its speed: decay the estimate.
        elapsed = max(0.0, now_ms - self._backlog_ms) / 1000
        self.backlog = max(0.0, self.backlog - elapsed * self.prefill_tps * fleet.prefill_workers)
        self._backlog_ms = now_ms
        return Measured(drain, self.prefill_tps, self.mode, self.mode_since, self.backlog,
                        self.miss_rate(now_ms))

    def miss_rate(self, now_ms: float) -> float:
        """The share of requests finished within the window that missed their TTFT target."""
        missed = self._missed
        while missed and now_ms - missed[0][0] > self.window_ms:
            self._misses -= missed.popleft()[1]
        return self._misses / len(missed) if missed else 0.0


__all__ = ["DecisionState"]
