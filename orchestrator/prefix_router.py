"""`prefix_aware`: send a request where its prompt's prefix is likely cached, within
a load bound. Approximate: an index of which worker was recently sent which
prefix blocks (bounded LRU per worker, like the engines' own caches), fed by
the shell from what it dispatched (orchestrator/decision_state.py).

Following the longest cached prefix alone sends everything to one worker when
all requests share a first block (the Mooncake trace's system prompt), so the
candidates are first narrowed to the workers whose load is within `slack`
(items per slot) of the least loaded one; among those, the longest run of
leading blocks this worker holds wins, ties to the less loaded.
"""

from __future__ import annotations

import itertools
import zlib
from collections import OrderedDict
from collections.abc import Sequence

import msgspec

from orchestrator.fleet import WorkerView
from orchestrator.plugins import register
from orchestrator.routers import RouteContext, Router
from orchestrator.snapshot import Pending
from schemas.blocks import chain_hashes

PREFIX_ROUTERS = frozenset({"prefix_aware", "locality"})  # routers that read block hashes


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


class PrefixParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Items per slot above the least loaded a worker may carry...
    slack: float = 0.05
    # ...and tokens placed on it lately (decaying, half-life 1 min) at most this
    # fraction above the candidates' mean, plus a floor (a cold fleet is level):
    # items alone let long conversations pile up on the worker caching them.
    # Mooncake trace, 8 workers, KV events every 20 ms: work_slack 0 -> 1.02 of
    # the shared-cache bound at 1.16 max/mean work; 0.1 -> 0.98 at 1.09;
    # 0.05 -> 0.88 at 1.05 (0 disables it).
    work_slack: float = 0.1
    work_floor_tokens: float = 16_384.0


def prompt_blocks(token_ids: Sequence[int] | None, text: str | None, block_tokens: int
                  ) -> tuple[int, ...]:
    """Chained hashes of a prompt's full blocks: over token ids as engines report
    them (schemas/blocks.py), else over text at ~4 characters a token (these only
    match what was sent). Equal hash = equal prefix up to and including that block."""
    if token_ids:
        return chain_hashes(token_ids, block_tokens)
    out: list[int] = []
    h = 0
    if text:
        step = 4 * block_tokens
        data = text.encode("utf-8", "surrogatepass")
        for i in range(0, len(data) - step + 1, step):
            h = zlib.crc32(data[i:i + step], h)
            out.append(h)
    return tuple(out)


@register("router", "prefix_aware", PrefixParams)
def _prefix_aware(params: PrefixParams) -> Router:
    """The longest cached prefix among workers within `slack` of the least loaded."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        ratio = {w.worker_id: ctx.per_slot(w) for w in cands}
        floor = min(ratio.values())
        near = [w for w in cands if ratio[w.worker_id] <= floor + params.slack]
        if params.work_slack > 0 and len(near) > 1:
            placed = {w.worker_id: ctx.placed(w) for w in cands}
            cap = ((1 + params.work_slack) * sum(placed.values()) / len(cands)
                   + params.work_floor_tokens)
            near = [w for w in near if placed[w.worker_id] <= cap] or near
        if not p.block_hashes:
            return min(near, key=lambda w: ratio[w.worker_id])
        return max(near, key=lambda w: (ctx.prefix_match(w, p.block_hashes),
                                        -ratio[w.worker_id]))

    return route


__all__ = ["PREFIX_ROUTERS", "PrefixIndex", "PrefixParams", "prompt_blocks"]
