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
from collections.abc import Sequence

import msgspec

from cplane.orchestrator.fleet import WorkerView
from cplane.orchestrator.plugin_types import PluginSpec, Router
from cplane.orchestrator.prefix_index import PrefixIndex
from cplane.orchestrator.route_context import RouteContext
from cplane.orchestrator.snapshot import Pending
from cplane.schemas.blocks import chain_hashes


class PrefixParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One parameter set for every trace in docs/fleet-scale.md (the Mooncake trace,
    six synthetic families, 8 and 64 workers): none is tuned per trace."""

    # Workers whose items per slot fall in the same band of this width count as
    # equally loaded; the least loaded band is where a request may go...
    slack: float = 0.6
    # ...under a cap on tokens placed lately (decaying, half-life an hour): at most
    # this fraction above the fleet's mean, plus a floor (a cold fleet is level).
    work_slack: float = 0.1
    work_floor_tokens: float = 16_384.0
    # Among those, the lowest cost: work_weight x placed tokens - cached prompt tokens.
    # A small weight: a cached prefix wins unless the placed work differs by far
    # more than it saves; the work cap above does the balancing.
    work_weight: float = 0.01
    # Workers looked at in order when a block is held by many (a shared system
    # prompt): the decision stays O(search), not O(fleet).
    search: int = 32


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


def load_band(per_slot: float, slack: float) -> float:
    """Items per slot in steps of `slack`: workers in the least loaded band count as
    equally loaded (0 slack: exact)."""
    return float(int(per_slot / slack)) if slack > 0 else per_slot


class _Choice:
    """One request's search: the best (cost, placed, position) so far, and the
    tests it applies (in the least loaded band, under the work cap)."""

    __slots__ = ("band", "best", "cap", "ctx", "hashes", "loose", "matches", "per_block",
                 "slack", "ww")

    def __init__(self, cands: Sequence[WorkerView], p: Pending, ctx: RouteContext,
                 params: PrefixParams, band: float) -> None:
        self.ctx = ctx
        self.band, self.slack = band, params.slack
        self.cap = (((1 + params.work_slack) * ctx.placed_mean(len(cands))
                     + params.work_floor_tokens) if params.work_slack > 0 else float("inf"))
        self.loose = False  # nobody in the band is under the work cap: the band alone
        self.hashes = p.block_hashes
        self.per_block = p.prompt_tokens / len(p.block_hashes) if p.block_hashes else 0.0
        self.ww = params.work_weight
        self.matches: dict[str, int] = {}
        self.best: tuple[float, float, int] | None = None

    def near(self, w: WorkerView) -> bool:
        return load_band(self.ctx.per_slot(w), self.slack) == self.band and (
            self.loose or self.ctx.placed(w) <= self.cap)

    def match(self, w: WorkerView) -> int:
        m = self.matches.get(w.worker_id)
        if m is None:
            m = self.matches[w.worker_id] = self.ctx.prefix_match(w, self.hashes)
        return m

    def offer(self, w: WorkerView, i: int, matched: int) -> None:
        c = (self.ww * self.ctx.placed(w) - self.per_block * matched, self.ctx.placed_key(w), i)
        if self.best is None or c < self.best:
            self.best = c


def _deepest_held(hashes: Sequence[int], ctx: RouteContext) -> int:
    """A depth no worker's cached run of `hashes` exceeds, by bisection: a run of r
    blocks means someone holds block r-1, so where holders stop, runs stop."""
    lo, hi = 0, len(hashes) + 1  # someone holds block lo-1 (or lo = 0); none holds hi-1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        held, mine = ctx.holders(hashes[mid - 1])
        if held or mine:
            lo = mid
        else:
            hi = mid
    return lo


def _prefix_aware(params: PrefixParams) -> Router:
    """The lowest work x weight - cached tokens in the least loaded band, under the
    work cap."""
    search = max(1, params.search)
    slack = params.slack
    order_name = f"band_placed:{slack}"

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        # Candidates by (load band, placed work): the first is the least placed of
        # the least loaded band, whoever else the fleet holds.
        order = ctx.ordered(order_name, cands, lambda w: (
            load_band(ctx.per_slot(w), slack), ctx.placed_key(w)))
        (band, _), first = order.first()
        base = cands[first]
        if not p.block_hashes:
            return base
        ch = _Choice(cands, p, ctx, params, band)
        # Under the cap, if the least placed of the band is; else the band alone.
        ch.loose = not ch.near(base)
        ch.offer(base, first, ch.match(base))
        pos = order.pos  # worker id -> its index in `cands`
        # Deepest first: a worker holding block m-1 may match m blocks, and matching m
        # can beat the best so far only if m blocks save more than the least placed
        # near worker costs beyond it.
        least = ch.ww * ctx.placed(base)
        for m in range(_deepest_held(ch.hashes, ctx), 0, -1):
            assert ch.best is not None
            if least - ch.per_block * m > ch.best[0]:
                break
            held, mine = ctx.holders(ch.hashes[m - 1])
            if len(held) + (len(mine) if mine else 0) <= search:
                for wid in itertools.chain(held, mine or ()):
                    i = pos.get(wid)
                    if i is not None and ch.near(cands[i]) and ch.match(cands[i]) >= m:
                        ch.offer(cands[i], i, ch.matches[wid])
                continue
            # Many hold it (a shared system prompt): the band in placed order, until
            # one does. Bounded: a decision never reads the whole fleet.
            for (b, _), i in itertools.islice(order.ascending(), search):
                if b != band:
                    break
                wid = cands[i].worker_id
                if ((wid in held or (mine is not None and wid in mine))
                        and ch.near(cands[i]) and ch.match(cands[i]) >= m):
                    ch.offer(cands[i], i, ch.matches[wid])
                    break
        assert ch.best is not None
        return cands[ch.best[2]]

    return Router("prefix_aware", route, reads_prefix=True)


PREFIX_ROUTERS: tuple[PluginSpec[Router], ...] = (
    PluginSpec("prefix_aware", _prefix_aware, PrefixParams),
)

__all__ = ["PREFIX_ROUTERS", "PrefixIndex", "PrefixParams", "load_band", "prompt_blocks"]
