"""Worker registry from heartbeats, and the fleet snapshot decisions read.

No I/O: the service feeds heartbeats in (bus/heartbeats.py
`subscribe_heartbeats`) and asks for a `FleetView`. The latest heartbeat per
worker lives in one `HeartbeatBook`, the same reader the gateway and the CLI
use; the registry adds breakers and cached views on top, and the control
subjects (orchestrator/control.py) read their worker list from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cplane.bus.heartbeats import HeartbeatBook
from cplane.orchestrator.breaker import Breakers, peer_median
from cplane.schemas.messages import Heartbeat, Role, WorkerState

POOL_UNIFIED = "unified"  # pool kinds: what a request occupies while it runs
POOL_PD = "pd"  # prefill then decode: counted against the decode side


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    role: Role
    models: tuple[str, ...]
    capacity: int
    held_items: int
    running: int
    waiting: int
    kv_usage: float
    last_seen_ms: float
    price_in_per_1k: float = 0.0
    price_out_per_1k: float = 0.0
    prompt_tokens_per_s: float = 0.0  # measured over its last seconds
    ttft_ms_avg: float = 0.0  # moving averages of its recent requests (0 = none yet)
    tpot_ms_avg: float = 0.0
    parallelism: int = 1  # GPUs its engine spans (TP x PP)

    def cost(self, prompt_tokens: int, output_tokens: int) -> float:
        return (prompt_tokens * self.price_in_per_1k + output_tokens * self.price_out_per_1k
                ) / 1000


@dataclass(frozen=True, slots=True)
class FleetView:
    """Live, ready workers at one instant, indexed once by role and model."""

    workers: tuple[WorkerView, ...] = ()
    _by_role: dict[Role, tuple[WorkerView, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _by_role_model: dict[tuple[Role, str], tuple[WorkerView, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _models: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)
    # (role, model, GPUs per engine) -> its workers: requests with a parallelism hint.
    _by_layout: dict[tuple[Role, str, int], tuple[WorkerView, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    # Counted once per snapshot (decisions read them per plan, some per request).
    # Roles with workers left out by their circuit breaker: those still pull from
    # the pool subjects, so work for these roles goes to chosen workers.
    fenced_roles: frozenset[Role] = frozenset()
    probes: frozenset[str] = frozenset()  # half-open workers owed one probe request
    _cap: dict[tuple[Role, str], int] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _max_cap: dict[tuple[Role, str], int] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _held: dict[tuple[Role, str], tuple[int, float]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    prefill_workers: int = field(default=1, init=False, repr=False, compare=False)
    max_prompt_tokens_per_s: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_role: dict[Role, list[WorkerView]] = {}
        by_rm: dict[tuple[Role, str], list[WorkerView]] = {}
        by_layout: dict[tuple[Role, str, int], list[WorkerView]] = {}
        for w in self.workers:
            by_role.setdefault(w.role, []).append(w)
            for m in w.models:
                by_rm.setdefault((w.role, m), []).append(w)
                by_layout.setdefault((w.role, m, w.parallelism), []).append(w)
        object.__setattr__(self, "_by_layout", {k: tuple(v) for k, v in by_layout.items()})
        object.__setattr__(self, "_by_role", {k: tuple(v) for k, v in by_role.items()})
        object.__setattr__(self, "_by_role_model", {k: tuple(v) for k, v in by_rm.items()})
        object.__setattr__(self, "_models", frozenset(m for w in self.workers for m in w.models))
        # Slot counts per (role, model) and per role ("" model): read per plan
        # and per work message, so summed here, once per snapshot.
        cap: dict[tuple[Role, str], int] = {}
        max_cap: dict[tuple[Role, str], int] = {}
        held: dict[tuple[Role, str], tuple[int, float]] = {}
        for key, ws in [*(((r, ""), v) for r, v in by_role.items()), *by_rm.items()]:
            cap[key] = sum(w.capacity for w in ws)
            max_cap[key] = max(w.capacity for w in ws)
            held[key] = (sum(w.held_items for w in ws), sum(w.kv_usage for w in ws) / len(ws))
        object.__setattr__(self, "_cap", cap)
        object.__setattr__(self, "_max_cap", max_cap)
        object.__setattr__(self, "_held", held)
        # Workers that prefill (unified and prefill roles); at least 1 for rates.
        object.__setattr__(self, "prefill_workers", max(1, len(self.workers) - len(
            by_role.get(Role.DECODE, ()))))
        object.__setattr__(self, "max_prompt_tokens_per_s", max(
            (w.prompt_tokens_per_s for w in self.workers), default=0.0))

    def of_role(self, role: Role, model: str = "") -> tuple[WorkerView, ...]:
        if not model:
            return self._by_role.get(role, ())
        return self._by_role_model.get((role, model), ())

    def of_layout(self, role: Role, model: str, parallelism: int) -> tuple[WorkerView, ...]:
        """The workers of `role` serving `model` whose engines span `parallelism` GPUs."""
        return self._by_layout.get((role, model, parallelism), ())

    def layouts(self, role: Role, model: str) -> list[int]:
        """The engine sizes (GPUs) the workers of `role` serving `model` have."""
        return sorted({n for (r, m, n) in self._by_layout if r is role and m == model})

    def whole_pool_serves(self, role: Role, model: str) -> bool:
        """Every live worker of `role` serves `model` (so the `any` subject is exact)."""
        return not model or len(self.of_role(role, model)) == len(self.of_role(role))

    def pool_capacity(self, pool: tuple[str, str]) -> int:
        kind, model = pool
        if kind == POOL_PD:
            return self.pd_capacity(model)
        return self.capacity(Role.UNIFIED, model)

    def pool_held(self, pool: tuple[str, str]) -> int:
        """Items the pool's workers said they hold at their last heartbeat."""
        kind, model = pool
        return self.held(Role.UNIFIED if kind == POOL_UNIFIED else Role.DECODE, model)

    def capacity(self, role: Role, model: str = "") -> int:
        return self._cap.get((role, model), 0)

    def held(self, role: Role, model: str = "") -> int:
        """Items the workers of `role` (serving `model`) held at their heartbeats."""
        return self._held.get((role, model), (0, 0.0))[0]

    def kv_mean(self, role: Role, model: str = "") -> float:
        """Mean KV usage of those workers (0 when none)."""
        return self._held.get((role, model), (0, 0.0))[1]

    def max_capacity(self, role: Role, model: str = "") -> int:
        """The most slots one worker of `role` (serving `model`) has."""
        return self._max_cap.get((role, model), 0)

    @property
    def total_capacity(self) -> int:
        """Slots of every worker, all roles."""
        return sum(c for (_, model), c in self._cap.items() if not model)

    @property
    def models(self) -> frozenset[str]:
        return self._models

    def serves(self, model: str) -> bool:
        return not model or model in self.models

    def pd_capacity(self, model: str = "") -> int:
        """Requests a prefill+decode pair can hold: the decode side is the long part."""
        if not self.of_role(Role.PREFILL, model):
            return 0
        return self.capacity(Role.DECODE, model)


class RoutedSince:
    """Per worker, what this orchestrator routed to it since its last heartbeat, and
    what of that finished since: routers add the difference to the heartbeat's
    count (orchestrator/routers.py `RouteContext.load`). The live registry and
    the fleet simulator both keep one."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.watch: Callable[[Mapping[str, int], float], None] | None = None
        # Told of every worker whose count moved, and of a wholesale reset (None):
        # the routers' ordered lists (orchestrator/route_index.py) follow them.
        self.moved: Callable[[str | None], None] | None = None

    def routed(self, sent: Mapping[str, int], now_ms: float = 0.0) -> None:
        for wid, n in sent.items():
            self.sent[wid] = self.sent.get(wid, 0) + n
            if self.moved is not None:
                self.moved(wid)
        if self.watch is not None and sent:
            self.watch(sent, now_ms)

    def finished_on(self, worker_id: str) -> None:
        self.done[worker_id] = self.done.get(worker_id, 0) + 1
        if self.moved is not None:
            self.moved(worker_id)

    def heard(self, worker_id: str) -> None:
        """A heartbeat from the worker (or its end): its own count is current again."""
        self.sent.pop(worker_id, None)
        self.done.pop(worker_id, None)
        if self.moved is not None:
            self.moved(worker_id)

    def heard_all(self) -> None:
        self.sent.clear()
        self.done.clear()
        if self.moved is not None:
            self.moved(None)

    def replace(self, sent: Mapping[str, int], done: Mapping[str, int]) -> None:
        """Both counts at once (a replay restores a step's)."""
        self.sent.clear()
        self.sent.update(sent)
        self.done.clear()
        self.done.update(done)
        if self.moved is not None:
            self.moved(None)


def _view_of(hb: Heartbeat, seen: float) -> WorkerView:
    return WorkerView(
        worker_id=hb.worker_id, role=hb.role, models=tuple(hb.models), capacity=hb.capacity,
        held_items=hb.held_items, running=hb.running, waiting=hb.waiting,
        kv_usage=hb.kv_usage, last_seen_ms=seen, price_in_per_1k=hb.price_in_per_1k,
        price_out_per_1k=hb.price_out_per_1k, prompt_tokens_per_s=hb.prompt_tokens_per_s,
        ttft_ms_avg=hb.ttft_ms_avg, tpot_ms_avg=hb.tpot_ms_avg, parallelism=hb.parallelism)


class Registry:
    """Latest heartbeat per worker; a worker unseen for `timeout_ms` is gone."""

    def __init__(self, timeout_ms: float, breakers: Breakers | None = None,
                 refresh_ms: float = 1000.0) -> None:
        self.timeout_ms = timeout_ms
        # The latest heartbeat per worker, on the service's clock (wall ms).
        self.book = HeartbeatBook(timeout_ms)
        self._view: FleetView | None = None  # built once per change, not per decision
        self._view_until = 0.0  # ...and valid until its oldest worker would go stale
        # Heartbeats that only move loads are folded in at most every `refresh_ms`:
        # 500 workers send 500 a second, and a view per heartbeat would make every
        # decision pay for the whole fleet. (Routers add what was routed since.)
        self.refresh_ms = refresh_ms
        self._built_ms = 0.0
        self._dirty: set[str] = set()
        self._views: dict[str, tuple[Heartbeat, WorkerView]] = {}
        self.rebuilds = 0
        self.since = RoutedSince()
        self.breakers = breakers
        # TPOT averages per role at the last view (breakers compare a worker to them).
        self._tpots: dict[Role, list[float]] = {}
        if breakers is not None:
            self.since.watch = self._routed

    def _routed(self, sent: Mapping[str, int], now_ms: float) -> None:
        if self.breakers is not None and self.breakers.routed(sent, now_ms):
            self._view = None  # a half-open worker's probe is out: no more until it ends

    def tick_breakers(self, now_ms: float) -> bool:
        """Breakers whose time is up move on (the service calls it every tick)."""
        if self.breakers is not None and self.breakers.tick(now_ms):
            self._view = None
            return True
        return False

    def _peer_tpot(self, hb: Heartbeat, prev: Heartbeat | None) -> float:
        peers = self._tpots.get(hb.role, [])
        if len(peers) == 1:  # a large role: its median, taken once per view
            return peers[0]
        return peer_median(peers, own=prev.tpot_ms_avg if prev is not None else 0.0)

    def observe(self, hb: Heartbeat, now_ms: float) -> bool:
        """Record a heartbeat; True when the fleet's shape changed (new, gone,
        capacity, state, breaker): the next view has it at once. Otherwise its
        loads join the view within `refresh_ms`."""
        wid = hb.worker_id
        seen = self.book.observe(hb, now_ms)
        if hb.state == WorkerState.STOPPED:
            self._view = None
            self.since.heard(wid)
            if self.breakers is not None:
                self.breakers.forget(wid)
            return seen is not None
        prev = seen.hb if seen is not None else None
        tripped = self.breakers is not None and self.breakers.observe(
            hb, now_ms, self._peer_tpot(hb, prev))
        shaped = (tripped or prev is None or prev.capacity != hb.capacity
                  or prev.state != hb.state)
        if shaped:
            self._view = None
            self.since.heard(wid)
        else:
            self._dirty.add(wid)  # `heard` when the view takes this heartbeat in
        return shaped

    def knows(self, worker_id: str) -> bool:
        return worker_id in self.book

    def heartbeats(self, now_ms: float) -> list[Heartbeat]:
        """Every worker heard within `timeout_ms`, whatever its state or breaker, by id
        (`<prefix>.admin.instances`, `cplane status`)."""
        return [s.hb for s in self.book.live(now_ms)]

    def expire(self, now_ms: float) -> list[str]:
        return [hb.worker_id for hb in self.expire_workers(now_ms)]

    def grace(self, stalled_ms: float) -> None:
        """This process heard nothing for `stalled_ms` (it stalled): HeartbeatBook.grace."""
        self.book.grace(stalled_ms)
        self._view = None

    def expire_workers(self, now_ms: float) -> list[Heartbeat]:
        """Forget workers unseen for `timeout_ms`; their last heartbeats (they died:
        a worker that stops says so and is forgotten at once)."""
        gone = self.book.expire(now_ms)
        if gone:
            self._view = None
            for hb in gone:
                self.since.heard(hb.worker_id)
                if self.breakers is not None:
                    self.breakers.forget(hb.worker_id)
        return gone

    def snapshot(self, now_ms: float) -> FleetView:
        """Ready workers seen within `timeout_ms` (cached until a heartbeat or expiry;
        the service expires workers every quarter second)."""
        if self._view is not None and now_ms <= self._view_until and (
                not self._dirty or now_ms - self._built_ms < self.refresh_ms):
            return self._view
        for wid in self._dirty:
            self.since.heard(wid)
        self._dirty.clear()
        self._built_ms = now_ms
        self.rebuilds += 1
        workers = []
        until = float("inf")
        fenced: set[Role] = set()
        probes: set[str] = set()
        tpots: dict[Role, list[float]] = {}
        not_closed = self.breakers.fenced() if self.breakers is not None else {}
        views = self._views
        for hb, seen in self.book:
            if now_ms - seen > self.timeout_ms or hb.state != WorkerState.READY:
                continue
            tpots.setdefault(hb.role, []).append(hb.tpot_ms_avg)
            if not_closed and hb.worker_id in not_closed:
                fenced.add(hb.role)
                if self.breakers is not None and not self.breakers.allows(hb.worker_id):
                    continue
                probes.add(hb.worker_id)
            view = views.get(hb.worker_id)
            if view is None or view[0] is not hb:  # a heartbeat's view is made once
                view = views[hb.worker_id] = (hb, _view_of(hb, seen))
            workers.append(view[1])
            until = min(until, seen + self.timeout_ms)
        if len(views) > 2 * len(self.book) + 16:  # gone workers' views
            self._views = {w: v for w, v in views.items() if w in self.book}
        self._tpots = {r: [peer_median(v)] if len(v) > 16 else v for r, v in tpots.items()}
        self._view, self._view_until = FleetView(tuple(workers), frozenset(fenced),
                                                 frozenset(probes)), until
        return self._view
