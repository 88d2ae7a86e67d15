"""What a router reads while one plan routes: the tables, and what this plan routed."""

from __future__ import annotations

import random
from collections.abc import Sequence

from cplane.orchestrator.fleet import WorkerView
from cplane.orchestrator.snapshot import DecisionTables, Pending


class RouteContext:
    """One plan's routing scratch over the core's tables (read only): load as of the
    heartbeats plus what was routed since, prefix matches, placed work. The core
    folds `sent` and `steps` back into its tables when it applies the plan."""

    __slots__ = ("_done", "_overlay", "_placed", "_placed_now", "_prefix", "_since", "rng",
                 "sent", "step", "steps")

    def __init__(self, tables: DecisionTables, rng: random.Random) -> None:
        self._since = tables.sent_since
        self._done = tables.done_since
        self._prefix = tables.prefix
        # Blocks routed by this plan, not yet in the index: (worker, block).
        self._overlay: set[tuple[str, int]] = set()
        self._placed = tables.placed
        self._placed_now: dict[str, float] = {}  # tokens routed by this plan
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

    def prefix_match(self, w: WorkerView, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` the worker was sent (index, or earlier this plan)."""
        wid = w.worker_id
        n = self._prefix.match(wid, hashes) if self._prefix is not None else 0
        for h in hashes[n:]:
            if (wid, h) not in self._overlay:
                break
            n += 1
        return n

    def next_step(self) -> int:
        self.steps += 1
        return self.step + self.steps - 1

    def placed(self, w: WorkerView) -> float:
        """Tokens routed to the worker lately (decaying), this plan's included."""
        wid = w.worker_id
        return self._placed.get(wid, 0.0) + self._placed_now.get(wid, 0.0)

    def routed(self, w: WorkerView, p: Pending | None = None) -> None:
        self.sent[w.worker_id] = self.sent.get(w.worker_id, 0) + 1
        if p is not None:
            self._placed_now[w.worker_id] = (self._placed_now.get(w.worker_id, 0.0)
                                             + p.prompt_tokens + p.output_tokens)
        if p is not None and p.block_hashes and self._prefix is not None:
            self._overlay.update((w.worker_id, h) for h in p.block_hashes)


__all__ = ["RouteContext"]
