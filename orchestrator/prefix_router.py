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

import zlib
from collections import OrderedDict
from collections.abc import Sequence

import msgspec

from orchestrator.fleet import WorkerView
from orchestrator.plugins import register
from orchestrator.routers import RouteContext, Router
from orchestrator.snapshot import Pending

PREFIX_ROUTERS = frozenset({"prefix_aware", "locality"})  # routers that read block hashes


class PrefixIndex:
    """Per worker, the prefix blocks it was sent most recently (LRU, bounded)."""

    def __init__(self, blocks_per_worker: int = 900) -> None:
        self.capacity = blocks_per_worker
        self._by_worker: dict[str, OrderedDict[int, None]] = {}

    def match(self, worker_id: str, hashes: Sequence[int]) -> int:
        blocks = self._by_worker.get(worker_id)
        if not blocks:
            return 0
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def add(self, worker_id: str, hashes: Sequence[int]) -> None:
        if not hashes or self.capacity <= 0:
            return
        blocks = self._by_worker.setdefault(worker_id, OrderedDict())
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def forget(self, worker_id: str) -> None:
        self._by_worker.pop(worker_id, None)


class PrefixParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Items per slot above the least loaded a worker may carry. On the Mooncake
    # trace, 8 workers, no classes (docs/simulator.md): 0.02 -> 0.87 of the
    # shared-cache bound at 1.08 max/mean work; 0.05 -> 0.96 at 1.12;
    # 0.1 -> 0.92 at 1.17; 0.3 -> 0.58 at 1.65.
    slack: float = 0.05


def prompt_blocks(token_ids: Sequence[int] | None, text: str | None, block_tokens: int
                  ) -> tuple[int, ...]:
    """Chained hashes of a prompt's full blocks (token ids; text: ~4 characters a
    token). Equal hash = equal prefix up to and including that block."""
    out: list[int] = []
    h = 0
    if token_ids:
        for i in range(0, len(token_ids) - block_tokens + 1, block_tokens):
            h = zlib.crc32(str(token_ids[i:i + block_tokens]).encode(), h)
            out.append(h)
    elif text:
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
        if not p.block_hashes:
            return min(near, key=lambda w: ratio[w.worker_id])
        return max(near, key=lambda w: (ctx.prefix_match(w, p.block_hashes),
                                        -ratio[w.worker_id]))

    return route


__all__ = ["PREFIX_ROUTERS", "PrefixIndex", "PrefixParams", "prompt_blocks"]
