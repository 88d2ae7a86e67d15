"""Which prefix blocks each worker holds: the prefix routers' index. Pure data.

Fed by the decision core with what it dispatched (approximate: recently sent
blocks, LRU per worker) and by workers' KV events (precise: orchestrator/kv_feed.py).
Mutable: the shell owns it and hands it to routers explicitly (RouteTables).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

_NONE: frozenset[str] = frozenset()


class PrefixIndex:
    """Per worker, which prefix blocks it holds: what it reported in its KV events
    (precise), else what it was sent recently (approximate, LRU, bounded).

    For a worker that reports events, blocks sent within `pending_ms` count too:
    its engine reports them once prefilled, and a burst sharing a new prefix
    should not scatter before then.
    """

    def __init__(self, blocks_per_worker: int = 900, pending_ms: float = 2_000.0,
                 reported_per_worker: int = 262_144) -> None:
        self.capacity = blocks_per_worker
        self.pending_ms = pending_ms
        self.reported_capacity = reported_per_worker
        self.now_ms = 0.0  # set by the shell before each plan
        self._by_worker: dict[str, OrderedDict[int, float]] = {}  # block -> sent at
        self._reported: dict[str, dict[int, None]] = {}
        self._seq: dict[str, tuple[str, int]] = {}  # worker -> (epoch, last seq applied)
        # block -> workers holding it (sent or reported): routers look a block up
        # instead of asking every worker.
        self._holders: dict[int, set[str]] = {}

    def holders(self, block: int) -> set[str] | frozenset[str]:
        """Workers that hold `block` or were sent it (read only)."""
        return self._holders.get(block, _NONE)

    def _hold(self, worker_id: str, block: int) -> None:
        held = self._holders.get(block)
        if held is None:
            self._holders[block] = {worker_id}
        else:
            held.add(worker_id)

    def _drop(self, worker_id: str, block: int) -> None:
        """The worker may no longer hold `block`: out of the reverse map unless the
        other source still has it."""
        sent = self._by_worker.get(worker_id)
        held = self._reported.get(worker_id)
        if (sent is not None and block in sent) or (held is not None and block in held):
            return
        workers = self._holders.get(block)
        if workers is not None:
            workers.discard(worker_id)
            if not workers:
                del self._holders[block]

    def match(self, worker_id: str, hashes: Sequence[int]) -> int:
        sent = self._by_worker.get(worker_id)
        held = self._reported.get(worker_id)
        n = 0
        if held is None:
            if not sent:
                return 0
            for h in hashes:
                if h not in sent:
                    break
                n += 1
            return n
        since = self.now_ms - self.pending_ms
        for h in hashes:
            if h not in held and (sent is None or sent.get(h, -1e18) < since):
                break
            n += 1
        return n

    def add(self, worker_id: str, hashes: Sequence[int]) -> None:
        if not hashes or self.capacity <= 0:
            return
        blocks = self._by_worker.setdefault(worker_id, OrderedDict())
        now = self.now_ms
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                self._hold(worker_id, h)
            blocks[h] = now
        while len(blocks) > self.capacity:
            old, _ = blocks.popitem(last=False)
            self._drop(worker_id, old)

    def _fresh_report(self, worker_id: str, old: dict[int, None] | None) -> dict[int, None]:
        """The worker's reported blocks start over (a snapshot, a new engine)."""
        held: dict[int, None] = {}
        self._reported[worker_id] = held
        for h in old or ():
            self._drop(worker_id, h)
        return held

    def forget(self, worker_id: str) -> None:
        sent = self._by_worker.pop(worker_id, OrderedDict())
        held = self._reported.pop(worker_id, {})
        self._seq.pop(worker_id, None)
        for h in itertools.chain(sent, held):
            self._drop(worker_id, h)

    def reporting(self, worker_id: str) -> bool:
        return worker_id in self._reported

    def apply(self, worker_id: str, epoch: str, seq: int, stored: Sequence[int],
              removed: Sequence[int], cleared: bool) -> bool:
        """Fold one KvEvents in. False when events were missed (a gap, or a new
        engine met mid-life): the caller asks the worker for a snapshot, which
        comes back as `cleared` with the worker's current seq."""
        last = self._seq.get(worker_id)
        if not cleared:
            if last is not None and last[0] == epoch:
                if seq <= last[1]:
                    return True  # already folded in (a snapshot covered it)
                if seq != last[1] + 1:
                    return False
            elif seq == 1:
                cleared = True  # a new engine's first events: nothing came before
            else:
                return False
        elif last is not None and last[0] == epoch and seq < last[1]:
            return True  # a stale snapshot: newer events were applied since
        held = self._reported.get(worker_id)
        if held is None or cleared:
            held = self._fresh_report(worker_id, held)
        self._fold(worker_id, held, stored, removed)
        self._seq[worker_id] = (epoch, seq)
        return True

    def _fold(self, worker_id: str, held: dict[int, None], stored: Sequence[int],
              removed: Sequence[int]) -> None:
        for h in removed:
            if held.pop(h, 0) is None:
                self._drop(worker_id, h)
        for h in stored:
            held.pop(h, None)  # re-insert: newest last
            held[h] = None
            self._hold(worker_id, h)
        over = len(held) - self.reported_capacity
        if over > 0:  # keep the newest; the oldest are the likeliest evicted
            for h in list(itertools.islice(held, over)):
                del held[h]
                self._drop(worker_id, h)


__all__ = ["PrefixIndex"]
