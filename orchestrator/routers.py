"""Routers: which worker runs a request. Pure plugins (`plugin_types.Router`).

A router is `route(candidates, pending, ctx) -> WorkerView | None`: the
candidates are the live, ready workers of the request's role that serve its
model, as of their last heartbeats; None means the pool subject (`any` or
the model's pool), where whichever worker has a free slot pulls it first.
`ctx` carries what a plan learns as it goes (round-robin position, items
routed so far) and the random generator, so a seeded run replays.

Routers that score follow llm-d's profile shape: scorers, each giving every
candidate a score clamped to [0, 1] (lower is better), weighted and summed,
then a picker: the lowest, ties in turn (lowest-index ties would pile every
light load onto one worker). A scorer over an unbounded figure (items,
TTFT) divides by the candidates' largest, which keeps its order.

- `pool`: always the pool subject. JetStream's pull consumers make it "join
  the first free worker"; the cheapest choice when workers are alike.
- `round_robin`: the next worker in turn, by a step counter kept between plans.
- `random`: uniform, from the generator passed in.
- `least_loaded`: scorer items per slot: held at the last heartbeat plus what
  this orchestrator routed to the worker since.
- `load_balanced`: scorers items per slot (absolute, capped at 1) and KV usage.
- `least_connections` (scorer: items, whatever the worker's size),
  `weighted_round_robin` (by capacity), `least_response_time` (scorer: the
  TTFT moving average from heartbeats scaled by load), `power_of_two` (two
  at random, the less loaded).
- `affinity` (session sticky by rendezvous hashing), `locality` (consistent
  hashing of the prompt's first block); `prefix_aware` is in
  orchestrator/prefix_router.py.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from cplane.orchestrator.fleet import WorkerView
from cplane.orchestrator.plugin_types import NoParams, PluginSpec, Router
from cplane.orchestrator.route_context import RouteContext
from cplane.orchestrator.snapshot import Pending

# (candidates, request, ctx) -> one raw figure per candidate, lower is better.
Scorer = Callable[[Sequence[WorkerView], Pending, RouteContext], list[float]]


@dataclass(frozen=True, slots=True)
class Weighted:
    """One scorer of a profile: its figure, clamped to [0, 1], times `weight`. An
    `unbounded` figure (items, TTFT) is first divided by the candidates' largest."""

    weight: float
    score: Scorer
    unbounded: bool = False

    def scores(self, cands: Sequence[WorkerView], p: Pending, ctx: RouteContext
               ) -> list[float]:
        raw = self.score(cands, p, ctx)
        if self.unbounded:
            raw = relative(raw)
        w = self.weight
        return [w * (x if 0.0 <= x <= 1.0 else 0.0 if x < 0.0 else 1.0) for x in raw]


def _rotated(cands: Sequence[WorkerView], ctx: RouteContext) -> list[int]:
    """Candidate indexes starting at the round-robin position: ties go round in turn."""
    n = len(cands)
    start = ctx.next_step() % n
    return [(start + i) % n for i in range(n)]


def relative(raw: list[float]) -> list[float]:
    """Scores over an unbounded figure, in [0, 1] with their order kept."""
    top = max(raw, default=0.0)
    return [x / top for x in raw] if top > 0 else [0.0] * len(raw)


def pick_lowest(cands: Sequence[WorkerView], ctx: RouteContext,
                scores: Sequence[float]) -> WorkerView:
    """The picker: the lowest score; ties in turn."""
    return cands[min(_rotated(cands, ctx), key=scores.__getitem__)]


def scored(name: str, weighted: Sequence[Weighted]) -> Router:
    """A router from weighted scorers and the lowest-score picker."""
    if len(weighted) == 1 and weighted[0].unbounded and weighted[0].weight > 0:
        # One unbounded scorer: dividing by the largest and weighting keep its
        # order, so the picker reads the raw figure (half the work per request).
        only = weighted[0].score

        def route_one(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext
                      ) -> WorkerView | None:
            return pick_lowest(cands, ctx, only(cands, p, ctx))

        return Router(name, route_one)

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        parts = [part.scores(cands, p, ctx) for part in weighted]
        return pick_lowest(cands, ctx, [sum(col) for col in zip(*parts, strict=True)])

    return Router(name, route)


# -- scorers -----------------------------------------------------------------------
def per_slot_score(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> list[float]:
    """Items per slot (1 = full)."""
    per_slot = ctx.per_slot
    return [per_slot(w) for w in cands]


def kv_score(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> list[float]:
    return [w.kv_usage for w in cands]


def items_score(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> list[float]:
    load = ctx.load
    return [float(load(w)) for w in cands]


def response_score(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> list[float]:
    """Expected response: the TTFT moving average (a worker without figures yet
    counts as the mean) scaled by how full the worker is."""
    known = [w.ttft_ms_avg for w in cands if w.ttft_ms_avg > 0]
    mean = sum(known) / len(known) if known else 1.0
    return [(w.ttft_ms_avg or mean) * (1.0 + ctx.per_slot(w)) for w in cands]


def least_loaded(cands: Sequence[WorkerView], ctx: RouteContext) -> WorkerView:
    """The fewest items per slot; ties in turn, so equal workers share."""
    return cands[min(_rotated(cands, ctx), key=lambda i: ctx.per_slot(cands[i]))]


# -- the plugins ---------------------------------------------------------------------
def _pool(params: NoParams) -> Router:
    """The pool subject: the first worker with a free slot pulls the request."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        return None

    return Router("pool", route)


def _round_robin(params: NoParams) -> Router:
    """Each worker in turn."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        return cands[ctx.next_step() % len(cands)]

    return Router("round_robin", route)


def _random(params: NoParams) -> Router:
    """A uniformly random worker (seeded generator)."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        return cands[ctx.rng.randrange(len(cands))]

    return Router("random", route)


def _least_loaded(params: NoParams) -> Router:
    """The fewest items per slot (ties: in turn, so equal workers share)."""
    return scored("least_loaded", [Weighted(1.0, per_slot_score, unbounded=True)])


# -- load-balancing algorithms -------------------------------------------------------

class LoadBalancedParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    load_weight: float = 0.7  # items per slot
    kv_weight: float = 0.3  # KV-cache usage at the last heartbeat


def _load_balanced(params: LoadBalancedParams) -> Router:
    """Weighted scorers, each in [0, 1]: items per slot and KV usage; lowest wins."""
    return scored("load_balanced", [Weighted(params.load_weight, per_slot_score),
                                     Weighted(params.kv_weight, kv_score)])


def _least_connections(params: NoParams) -> Router:
    """The fewest items, whatever the worker's size (ties in turn)."""
    return scored("least_connections", [Weighted(1.0, items_score, unbounded=True)])


def _weighted_round_robin(params: NoParams) -> Router:
    """In turn, each worker as often as its capacity: a 64-slot worker gets 4 of
    every 5 requests next to a 16-slot one."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        total = sum(max(1, w.capacity) for w in cands)
        # Interleave by a stride coprime-ish to the total, so one worker's turns
        # are spread over the cycle instead of coming in a run.
        slot = (ctx.next_step() * 7919) % total
        for w in cands:
            slot -= max(1, w.capacity)
            if slot < 0:
                return w
        return cands[-1]

    return Router("weighted_round_robin", route)


def _least_response_time(params: NoParams) -> Router:
    """The lowest expected response: the worker's TTFT moving average (heartbeats)
    scaled by how full it is; a worker without figures yet counts as the mean."""
    return scored("least_response_time", [Weighted(1.0, response_score, unbounded=True)])


def _power_of_two(params: NoParams) -> Router:
    """Two workers at random, the less loaded of them (seeded generator)."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        if len(cands) == 1:
            return cands[0]
        a, b = ctx.rng.sample(range(len(cands)), 2)
        return min(cands[a], cands[b], key=ctx.per_slot)

    return Router("power_of_two", route)


# -- placement by key -----------------------------------------------------------------
def rendezvous(key: str, cands: Sequence[WorkerView]) -> WorkerView:
    """Highest-random-weight hashing: the same key picks the same worker while it
    lives; when it goes, only its keys move."""
    return max(cands, key=lambda w: zlib.crc32(f"{key}|{w.worker_id}".encode()))


def _affinity(params: NoParams) -> Router:
    """Session (or user) sticky: a session's requests go to one worker while it is
    alive, then to another (rendezvous hashing); without a session, least loaded."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        if not p.session:
            return least_loaded(cands, ctx)
        return rendezvous(p.session, cands)

    return Router("affinity", route)


def _locality(params: NoParams) -> Router:
    """Consistent hashing of the prompt's first block (requests that start alike
    meet on one worker), else of the tenant; ignores load."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        key = str(p.block_hashes[0]) if p.block_hashes else (p.tenant or p.request_id)
        return rendezvous(key, cands)

    return Router("locality", route, reads_prefix=True)


ROUTERS: tuple[PluginSpec[Router], ...] = (
    PluginSpec("pool", _pool),
    PluginSpec("round_robin", _round_robin),
    PluginSpec("random", _random),
    PluginSpec("least_loaded", _least_loaded),
    PluginSpec("load_balanced", _load_balanced, LoadBalancedParams),
    PluginSpec("least_connections", _least_connections),
    PluginSpec("weighted_round_robin", _weighted_round_robin),
    PluginSpec("least_response_time", _least_response_time),
    PluginSpec("power_of_two", _power_of_two),
    PluginSpec("affinity", _affinity),
    PluginSpec("locality", _locality),
)

__all__ = ["ROUTERS", "Scorer", "Weighted", "least_loaded", "pick_lowest", "relative",
           "rendezvous", "scored"]
