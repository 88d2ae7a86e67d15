"""Which prefix blocks each worker holds: the prefix routers' index. Pure data.

Fed by the decision core with what it dispatched (approximate: recently sent
blocks, LRU per worker) and by workers' KV events (precise: orchestrator/kv_feed.py).
Mutable: the shell owns it and hands it to routers explicitly (RouteTables).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence


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
            blocks[h] = now
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def forget(self, worker_id: str) -> None:
        self._by_worker.pop(worker_id, None)
        self._reported.pop(worker_id, None)
        self._seq.pop(worker_id, None)

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
            held = self._reported[worker_id] = {}
        for h in removed:
            held.pop(h, None)
        for h in stored:
            held.pop(h, None)  # re-insert: newest last
            held[h] = None
        over = len(held) - self.reported_capacity
        if over > 0:  # keep the newest; the oldest are the likeliest evicted
            for h in list(itertools.islice(held, over)):
                del held[h]
        self._seq[worker_id] = (epoch, seq)
        return True


__all__ = ["PrefixIndex"]
