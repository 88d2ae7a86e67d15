"""The request ledger: every request the orchestrator holds, in one place. Pure.

Each request is an `Entry` keyed by request id, with the stream sequence of
its LLM_REQ message and one ordered `RequestState`. `transition()` is the
only way a state changes, and it refuses illegal moves, so "held twice",
"dispatched after its terminal" or "acked while dispatching" cannot happen
silently. What the orchestrator did with the message (ack, nak) is the
shell's business; the ledger only knows what each request is waiting for.

    (absent) -> HELD -> DISPATCHING -> DISPATCHED -> (removed when its terminal is seen)
                 |          |
                 |          +-> HELD        the work publish was refused: plan it again
                 +-> FINISHING -> (removed) a terminal of our own (reject, cancel) is stored
                 +-> (removed)              handed back to JetStream (nak on step-down)

Capacity: every DISPATCHING or DISPATCHED entry counts against its pool
(role class x model); `in_flight(pool)` is O(1). The ledger tells nobody
about a transition: the decision core (orchestrator/core.py) makes every
transition and updates the decision state beside it, in the same call.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from cplane.orchestrator.snapshot import Pending, PoolKey


class RequestState(enum.IntEnum):
    """Ordered: `state >= DISPATCHING` means the fleet has (or is getting) it."""

    HELD = 1  # unacked in LLM_REQ, waiting for the plan
    DISPATCHING = 2  # its work publish is in flight
    DISPATCHED = 3  # work stored, request acked; waiting for its terminal
    FINISHING = 4  # the orchestrator publishes its terminal itself (reject, cancel)


_ALLOWED: dict[RequestState | None, frozenset[RequestState | None]] = {
    None: frozenset({RequestState.HELD}),
    RequestState.HELD: frozenset({RequestState.DISPATCHING, RequestState.FINISHING, None}),
    RequestState.DISPATCHING: frozenset({RequestState.DISPATCHED, RequestState.HELD}),
    RequestState.DISPATCHED: frozenset({None}),
    RequestState.FINISHING: frozenset({None}),
}


class IllegalTransition(RuntimeError):
    pass


T = TypeVar("T")


@dataclass(slots=True, eq=False)
class Entry(Generic[T]):
    """One request: what decisions see of it (`pending`) and the shell's own payload
    (`item`: the WorkItem live, the trace record in the simulator; opaque here)."""

    pending: Pending  # the frozen view decisions see (redispatched kept in step)
    item: T
    seq: int = 0  # LLM_REQ stream sequence
    msg: Any = None  # the shell's handle of its LLM_REQ message
    state: RequestState | None = None
    pool: PoolKey | None = None  # set while DISPATCHING / DISPATCHED
    target: str = ""  # the worker it was routed to ("" = a pool subject)
    dispatched_ms: float = 0.0
    checked_ms: float = 0.0  # last reconcile lookup in LLM_DONE
    # Its terminal arrived while its dispatch was being acked: (TTFT ms, -1 = none).
    terminal_seen: float | None = None
    extra_msgs: list[Any] = field(default_factory=list)  # duplicates acked with it
    level: int = field(init=False)  # 0 = critical ... 4 = background
    request_id: str = field(init=False)  # read on every transition

    def __post_init__(self) -> None:
        self.level = self.pending.level
        self.request_id = self.pending.request_id

    @property
    def redispatched(self) -> bool:
        """Redelivered: an earlier dispatch cannot be ruled out (goes out alone)."""
        return self.pending.redispatched

    @property
    def arrival_ms(self) -> float:
        return self.pending.arrival_ms


class Ledger(Generic[T]):
    def __init__(self, levels: int) -> None:
        self._by_id: dict[str, Entry[T]] = {}
        self._held: list[deque[str]] = [deque() for _ in range(levels)]  # FIFO per level
        self._held_count = [0] * levels
        self._in_flight: dict[PoolKey, int] = {}

    # -- reads ------------------------------------------------------------------
    def get(self, request_id: str) -> Entry[T] | None:
        return self._by_id.get(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def held_count(self, level: int | None = None) -> int:
        return sum(self._held_count) if level is None else self._held_count[level]

    def in_flight(self, pool: PoolKey) -> int:
        return self._in_flight.get(pool, 0)

    def in_flight_by_pool(self) -> dict[PoolKey, int]:
        return dict(self._in_flight)

    def held_heads(self, level: int, k: int) -> list[Entry[T]]:
        """Up to k HELD entries of one level, oldest first (skipping stale ids)."""
        out: list[Entry[T]] = []
        seen: set[str] = set()  # a request planned back to HELD appears twice
        for rid in self._held[level]:
            if len(out) >= k:
                break
            e = self._by_id.get(rid)
            if e is not None and e.state is RequestState.HELD and rid not in seen:
                seen.add(rid)
                out.append(e)
        return out

    def entries(self, state: RequestState | None = None) -> Iterator[Entry[T]]:
        return (e for e in list(self._by_id.values()) if state is None or e.state is state)

    # -- the one transition function -----------------------------------------------
    def transition(self, entry: Entry[T], to: RequestState | None, pool: PoolKey | None = None
                   ) -> None:
        """Move `entry` to `to` (None = leave the ledger); refuses illegal moves."""
        frm = entry.state
        rid = entry.request_id
        if to not in _ALLOWED[frm]:
            raise IllegalTransition(f"{rid}: {frm!r} -> {to!r}")
        # leave the old state
        if frm is None:
            if rid in self._by_id:
                raise IllegalTransition(f"{rid} is already in the ledger")
        elif frm is RequestState.HELD:
            self._held_count[entry.level] -= 1
            self._compact(entry.level)
        elif frm in (RequestState.DISPATCHING, RequestState.DISPATCHED) and entry.pool:
            if to is not RequestState.DISPATCHED:
                self._in_flight[entry.pool] -= 1
                entry.pool = None
        # enter the new one
        if to is None:
            self._by_id.pop(rid, None)
        elif to is RequestState.HELD:
            self._by_id[rid] = entry
            self._held[entry.level].append(rid)
            self._held_count[entry.level] += 1
        elif to is RequestState.DISPATCHING:
            if pool is None:
                raise IllegalTransition(f"{entry.request_id}: dispatching needs a pool")
            entry.pool = pool
            self._in_flight[pool] = self._in_flight.get(pool, 0) + 1
        entry.state = to

    def _compact(self, level: int) -> None:
        """Drop ids at the front of a level's FIFO that are no longer HELD (amortised O(1))."""
        q = self._held[level]
        while q:
            e = self._by_id.get(q[0])
            if e is not None and e.state is RequestState.HELD:
                return
            q.popleft()
        if len(q) > 4 * (self._held_count[level] + 64):  # many stale ids mid-queue
            live = (rid for rid in q
                    if (e := self._by_id.get(rid)) is not None and e.state is RequestState.HELD)
            self._held[level] = deque(dict.fromkeys(live))
