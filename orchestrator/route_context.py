"""What a router reads while one plan routes: the tables, and what this plan routed."""

from __future__ import annotations

import random
from collections.abc import Sequence

from cplane.orchestrator.fleet import WorkerView
from cplane.orchestrator.route_index import KeyFn, Ordered, RouteIndex
from cplane.orchestrator.snapshot import DecisionTables, Pending


class RouteContext:
    """One plan's routing scratch over the core's tables (read only): load as of the
    heartbeats plus what was routed since, prefix matches, placed work, and the
    ordered candidate lists (orchestrator/route_index.py). The core folds `sent`
    and `steps` back into its tables when it applies the plan."""

    __slots__ = ("_done", "_holders", "_overlay", "_placed", "_placed_now", "_placed_now_total",
                 "_prefix", "_since", "_unfolded", "index", "rng", "sent", "step", "steps")

    def __init__(self, tables: DecisionTables, rng: random.Random) -> None:
        self._since = tables.sent_since
        self._done = tables.done_since
        self._prefix = tables.prefix
        # Blocks routed by this plan, not yet in the index: worker -> blocks, and
        # block -> workers (prefix routers look up who holds a block).
        self._overlay: dict[str, set[int]] = {}
        self._holders: dict[int, set[str]] = {}
        # ...folded in only when a prefix router asks: others never pay for it.
        self._unfolded: list[tuple[str, tuple[int, ...]]] = []
        self._placed = tables.placed
        self._placed_now: dict[str, float] = {}  # tokens routed by this plan
        self._placed_now_total = 0.0
        self.index = tables.index if tables.index is not None else RouteIndex()
        self.index.begin_plan()
        self.step = tables.step
        self.steps = 0  # round-robin steps taken by this plan
        self.sent: dict[str, int] = {}
        self.rng = rng

    def load(self, w: WorkerView) -> int:
        """Items on the worker: held at its last heartbeat, plus routed since, less
        what we routed there that finished since."""
        wid = w.worker_id
        known = w.held_items + self._since.get(wid, 0) - self._done.get(wid, 0)
        return max(0, known) + self.sent.get(wid, 0)

    def per_slot(self, w: WorkerView) -> float:
        """`load` per slot of the worker: what least-loaded choices compare."""
        return self.load(w) / max(1, w.capacity)

    def _fold(self) -> None:
        for wid, blocks in self._unfolded:
            mine = self._overlay.get(wid)
            if mine is None:
                self._overlay[wid] = set(blocks)
            else:
                mine.update(blocks)
            for h in blocks:
                self._holders.setdefault(h, set()).add(wid)
        self._unfolded.clear()

    def prefix_match(self, w: WorkerView, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` the worker was sent (index, or earlier this plan)."""
        if self._unfolded:
            self._fold()
        wid = w.worker_id
        n = self._prefix.match(wid, hashes) if self._prefix is not None else 0
        mine = self._overlay.get(wid)
        if mine:
            for h in hashes[n:]:
                if h not in mine:
                    break
                n += 1
        return n

    def holders(self, block: int) -> tuple[set[str] | frozenset[str], set[str] | None]:
        """Workers that may hold `block`: the index's, and this plan's (may overlap).
        A superset to check with `prefix_match`, found without asking every worker."""
        if self._unfolded:
            self._fold()
        held = self._prefix.holders(block) if self._prefix is not None else frozenset()
        return held, self._holders.get(block)

    def next_step(self) -> int:
        self.steps += 1
        return self.step + self.steps - 1

    def placed(self, w: WorkerView) -> float:
        """Tokens routed to the worker lately (decaying), this plan's included."""
        wid = w.worker_id
        return self._placed.get(wid, 0.0) + self._placed_now.get(wid, 0.0)

    def placed_key(self, w: WorkerView) -> float:
        """`placed` in the store's own units: ordered alike, unchanged by decay."""
        wid = w.worker_id
        return self._placed.raw(wid) + self._placed.to_raw(self._placed_now.get(wid, 0.0))

    def placed_mean(self, n_cands: int) -> float:
        """Placed work per worker: the fleet's total (this plan's included) over the
        workers it was placed on, or the candidates if more (O(1): no pass)."""
        total = self._placed.total + self._placed_now_total
        return total / max(1, len(self._placed), n_cands)

    def ordered(self, name: str, cands: Sequence[WorkerView], key: KeyFn) -> Ordered:
        """`cands` in `key` order (kept between plans; `name` says which key)."""
        return self.index.ordered(name, cands, key)

    def lowest(self, name: str, cands: Sequence[WorkerView], key: KeyFn) -> WorkerView:
        """The candidate with the lowest `key`; ties in turn (round-robin position)."""
        start = self.next_step() % len(cands)
        return self.index.lowest(name, cands, key).lowest(start)

    def routed(self, w: WorkerView, p: Pending | None = None) -> None:
        wid = w.worker_id
        self.sent[wid] = self.sent.get(wid, 0) + 1
        self.index.touch(wid)
        if p is not None:
            tokens = p.prompt_tokens + p.output_tokens
            self._placed_now[wid] = self._placed_now.get(wid, 0.0) + tokens
            self._placed_now_total += tokens
        if p is not None and p.block_hashes and self._prefix is not None:
            self._unfolded.append((wid, p.block_hashes))


__all__ = ["RouteContext"]
