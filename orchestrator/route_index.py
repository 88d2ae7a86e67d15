"""Candidates ordered by a router's key, kept between plans: what keeps a routing
decision's cost flat in the fleet's size. Derived data only, no I/O.

A router that scans its candidates pays O(workers) per request: 222 us per
request at 512 workers for least-loaded, measured (bench/decision_cost.py).
Here each (router key, candidate group) keeps its workers in a sorted list
of (key, position); a decision reads the lowest in O(log n). A worker's key
moves only when its load does: when a plan routes to it, when a request we
routed there finishes, when its heartbeat is folded in (a new FleetView,
whose groups are new tuples: rebuilt once per view, at most once a second).
The decision core reports those changes (`changed`); a plan's own routing
re-keys the workers it touched (`touch`), and the next plan re-keys them
again from the tables, so a plan that is never applied leaves nothing
behind. The index is a cache: dropping it (`invalidate`) changes no decision.

Also here, built once per candidate group: a consistent-hash ring (affinity,
locality: O(log n) instead of rendezvous over every worker) and cumulative
capacities (weighted round robin).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

from sortedcontainers import SortedList

from cplane.orchestrator.fleet import WorkerView

KeyFn = Callable[[WorkerView], Any]  # a float or a tuple of floats: ordered
T = TypeVar("T")
RING_POINTS = 64  # ring points per worker: keys spread within a few % of even


class _Keyed:
    """One group's workers with a key each, re-keyed as their loads move."""

    __slots__ = ("cands", "dirty", "keys", "pos", "used")

    def __init__(self, cands: Sequence[WorkerView], key: KeyFn) -> None:
        self.cands = cands
        self.pos = {w.worker_id: i for i, w in enumerate(cands)}
        self.keys = [key(w) for w in cands]
        self.dirty: set[str] = set()
        self.used = 0  # the last plan that read it

    def sync(self, key: KeyFn) -> None:
        """Re-key the workers whose load moved since."""
        if not self.dirty:
            return
        for wid in self.dirty:
            i = self.pos.get(wid)
            if i is not None:
                self.rekey(i, key(self.cands[i]))
        self.dirty.clear()

    def rekey(self, i: int, k: Any) -> None:
        raise NotImplementedError


class Ordered(_Keyed):
    """The group in key order, ties by position: walked from the lowest."""

    __slots__ = ("order",)

    def __init__(self, cands: Sequence[WorkerView], key: KeyFn) -> None:
        super().__init__(cands, key)
        self.order = SortedList(zip(self.keys, range(len(cands)), strict=True))

    def rekey(self, i: int, k: Any) -> None:
        old = self.keys[i]
        if old != k:
            self.order.remove((old, i))
            self.keys[i] = k
            self.order.add((k, i))

    def first(self) -> tuple[Any, int]:
        first: tuple[Any, int] = self.order[0]
        return first

    def ascending(self) -> Iterator[tuple[Any, int]]:
        return iter(self.order)


class Lowest(_Keyed):
    """The group's lowest key, ties in turn: positions bucketed by key (loads take few
    distinct values), the keys in a heap. Cheaper than a sorted list when only the
    lowest is read."""

    __slots__ = ("buckets", "heap")

    def __init__(self, cands: Sequence[WorkerView], key: KeyFn) -> None:
        super().__init__(cands, key)
        self.buckets: dict[Any, list[int]] = {}
        for i, k in enumerate(self.keys):  # positions ascending: each bucket sorted
            self.buckets.setdefault(k, []).append(i)
        self.heap = list(self.buckets)
        heapq.heapify(self.heap)

    def rekey(self, i: int, k: Any) -> None:
        old = self.keys[i]
        if old == k:
            return
        b = self.buckets[old]
        del b[bisect.bisect_left(b, i)]
        if not b:  # its key stays in the heap until it surfaces
            del self.buckets[old]
        self.keys[i] = k
        nb = self.buckets.get(k)
        if nb is None:
            self.buckets[k] = [i]
            heapq.heappush(self.heap, k)
            if len(self.heap) > 2 * len(self.buckets) + 64:
                self.heap = list(self.buckets)
                heapq.heapify(self.heap)
        else:
            bisect.insort(nb, i)

    def lowest(self, start: int) -> WorkerView:
        """The lowest key; among equal lowest keys the first at or after position
        `start`, cyclically (ties go round in turn, as a scan from `start` would)."""
        heap, buckets = self.heap, self.buckets
        while heap[0] not in buckets:
            heapq.heappop(heap)
        b = buckets[heap[0]]
        j = bisect.bisect_left(b, start)
        return self.cands[b[j] if j < len(b) else b[0]]


class Ring:
    """Consistent hashing over a group: a key goes to the worker owning the next
    point clockwise; when a worker goes, only the keys it owned move."""

    __slots__ = ("cands", "owners", "points")

    def __init__(self, cands: Sequence[WorkerView]) -> None:
        pts = sorted((zlib.crc32(f"{w.worker_id}#{k}".encode()), i)
                     for i, w in enumerate(cands) for k in range(RING_POINTS))
        self.cands = cands
        self.points = [h for h, _ in pts]
        self.owners = [i for _, i in pts]

    def owner(self, key: str) -> WorkerView:
        j = bisect.bisect_left(self.points, zlib.crc32(key.encode())) % len(self.points)
        return self.cands[self.owners[j]]


class Cumulative:
    """Running sums of capacity over a group: weighted round robin by bisection."""

    __slots__ = ("cands", "sums")

    def __init__(self, cands: Sequence[WorkerView]) -> None:
        self.cands = cands
        self.sums = list(itertools.accumulate(max(1, w.capacity) for w in cands))

    @property
    def total(self) -> int:
        return self.sums[-1]

    def at(self, slot: int) -> WorkerView:
        return self.cands[bisect.bisect_right(self.sums, slot)]


class RouteIndex:
    """Every group's ordered lists, rings and sums, by group identity. Owned by the
    decision core (orchestrator/decision_state.py), handed to plans in
    DecisionTables."""

    def __init__(self) -> None:
        self._ordered: dict[tuple[str, int], _Keyed] = {}
        self._rings: dict[tuple[str, ...], Ring] = {}
        self._ring_of: dict[int, Ring] = {}
        self._sums: dict[int, Cumulative] = {}
        self._memo: dict[tuple[object, int], tuple[Sequence[WorkerView], object]] = {}
        self._touched: set[str] = set()  # routed to by the plan under way
        self._plans = 0
        self.builds = 0  # lists built (tests: a steady fleet builds none per request)

    def ordered(self, name: str, cands: Sequence[WorkerView], key: KeyFn) -> Ordered:
        """`cands` in `key` order. Groups are the FleetView's tuples: a new view means
        new tuples and one rebuild; within a view, only moved workers are re-keyed."""
        return cast(Ordered, self._keyed(Ordered, name, cands, key))

    def lowest(self, name: str, cands: Sequence[WorkerView], key: KeyFn) -> Lowest:
        """`cands` by their lowest `key` (kept like `ordered`)."""
        return cast(Lowest, self._keyed(Lowest, name, cands, key))

    def _keyed(self, kind: type[_Keyed], name: str, cands: Sequence[WorkerView], key: KeyFn
               ) -> _Keyed:
        o = self._ordered.get((name, id(cands)))
        if o is None or o.cands is not cands or type(o) is not kind:
            o = self._ordered[name, id(cands)] = kind(cands, key)
            self.builds += 1
        else:
            o.sync(key)
        o.used = self._plans
        return o

    def ring(self, cands: Sequence[WorkerView]) -> Ring:
        r = self._ring_of.get(id(cands))
        if r is None or r.cands is not cands:
            ids = tuple(w.worker_id for w in cands)
            r = self._rings.get(ids)
            if r is None:  # the same members in a new view keep their ring
                if len(self._rings) > 16:
                    self._rings.clear()
                r = self._rings[ids] = Ring(cands)
            elif r.cands is not cands:
                r = self._rings[ids] = _rebind(r, cands)
            if len(self._ring_of) > 64:
                self._ring_of.clear()
            self._ring_of[id(cands)] = r
        return r

    def cumulative(self, cands: Sequence[WorkerView]) -> Cumulative:
        c = self._sums.get(id(cands))
        if c is None or c.cands is not cands:
            if len(self._sums) > 64:
                self._sums.clear()
            c = self._sums[id(cands)] = Cumulative(cands)
        return c

    def memo(self, name: object, cands: Sequence[WorkerView], compute: Callable[[], T]) -> T:
        """`compute()` once per candidate group (a figure over the group that moves
        only with its heartbeats: a mean, a filtered tuple, an id map)."""
        hit = self._memo.get((name, id(cands)))
        if hit is not None and hit[0] is cands:
            return cast(T, hit[1])
        if len(self._memo) > 256:
            self._memo.clear()
        value = compute()
        self._memo[name, id(cands)] = (cands, value)
        return value

    # -- what moved -------------------------------------------------------------------
    def changed(self, worker_id: str) -> None:
        """The worker's load (or placed work) moved outside a plan."""
        for o in self._ordered.values():
            o.dirty.add(worker_id)

    def begin_plan(self) -> None:
        """A plan starts: what the last one routed is re-keyed from the tables (its
        plan-local counts are gone, applied or not). Lists no plan read lately (of
        views gone by) are dropped: every move is marked on every list."""
        self._plans += 1
        if self._plans % 64 == 0:
            old = self._plans - 64
            self._ordered = {k: o for k, o in self._ordered.items() if o.used > old}
        if self._touched:
            for o in self._ordered.values():
                o.dirty |= self._touched
            self._touched.clear()

    def touch(self, worker_id: str) -> None:
        """The plan under way routed to the worker."""
        self._touched.add(worker_id)
        self.changed(worker_id)

    def invalidate(self) -> None:
        """Loads were replaced wholesale (a replay): rebuild on next use."""
        self._ordered.clear()


def _rebind(ring: Ring, cands: Sequence[WorkerView]) -> Ring:
    """The same members' ring over a new view's tuple (same order: same positions)."""
    r = Ring.__new__(Ring)
    r.cands, r.points, r.owners = cands, ring.points, ring.owners
    return r


__all__ = ["Cumulative", "KeyFn", "Lowest", "Ordered", "Ring", "RouteIndex"]
