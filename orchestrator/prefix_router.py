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
from collections.abc import Sequence

import msgspec

from cplane.orchestrator.fleet import WorkerView
from cplane.orchestrator.plugin_types import PluginSpec, Router
from cplane.orchestrator.prefix_index import PrefixIndex
from cplane.orchestrator.route_context import RouteContext
from cplane.orchestrator.snapshot import Pending
from cplane.schemas.blocks import chain_hashes


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


def within_load(cands: Sequence[WorkerView], ctx: RouteContext, params: PrefixParams
                ) -> tuple[list[WorkerView], dict[str, float]]:
    """The filter: workers within `slack` items per slot of the least loaded, and
    (work_slack) not carrying far more placed work than the mean."""
    ratio = {w.worker_id: ctx.per_slot(w) for w in cands}
    floor = min(ratio.values())
    near = [w for w in cands if ratio[w.worker_id] <= floor + params.slack]
    if params.work_slack > 0 and len(near) > 1:
        placed = {w.worker_id: ctx.placed(w) for w in cands}
        cap = ((1 + params.work_slack) * sum(placed.values()) / len(cands)
               + params.work_floor_tokens)
        near = [w for w in near if placed[w.worker_id] <= cap] or near
    return near, ratio


def _prefix_aware(params: PrefixParams) -> Router:
    """The longest cached prefix among workers within `slack` of the least loaded."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        near, ratio = within_load(cands, ctx, params)
        if not p.block_hashes:
            return min(near, key=lambda w: ratio[w.worker_id])
        # The picker: the longest cached run of leading blocks, ties to the less loaded.
        return max(near, key=lambda w: (ctx.prefix_match(w, p.block_hashes),
                                        -ratio[w.worker_id]))

    return Router("prefix_aware", route, reads_prefix=True)


PREFIX_ROUTERS: tuple[PluginSpec[Router], ...] = (
    PluginSpec("prefix_aware", _prefix_aware, PrefixParams),
)

__all__ = ["PREFIX_ROUTERS", "PrefixIndex", "PrefixParams", "prompt_blocks", "within_load"]
