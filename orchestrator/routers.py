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
TTFT) scores alone: its order is the picker's.

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
- `affinity` (session sticky by consistent hashing), `locality` (consistent
  hashing of the prompt's first block); `prefix_aware` is in
  orchestrator/prefix_router.py.

Every choice costs O(log n) in the number of candidates, not O(n): scored
routers read the lowest of a list kept in score order between plans, keyed
routers a hash ring, weighted round robin running sums, all per candidate
group (orchestrator/route_index.py). bench/decision_cost.py measures it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from cplane.orchestrator.fleet import WorkerView
from cplane.orchestrator.plugin_types import NoParams, PluginSpec, Router
from cplane.orchestrator.route_context import RouteContext
from cplane.orchestrator.snapshot import Pending

# (worker, ctx) -> its figure, lower is better. A figure depends on the worker's
# heartbeat and its load only, so candidates can be kept in its order between
# plans (orchestrator/route_index.py) instead of scored one by one per request.
Scorer = Callable[[WorkerView, RouteContext], float]
PER_SLOT = "per_slot"  # the ordered list of items per slot, shared by routers
_names = itertools.count()


@dataclass(frozen=True, slots=True)
class Weighted:
    """One scorer of a profile: its figure, clamped to [0, 1], times `weight`. An
    `unbounded` figure (items, TTFT) is only valid alone: its order is its score."""

    weight: float
    score: Scorer
    unbounded: bool = False

    def __call__(self, w: WorkerView, ctx: RouteContext) -> float:
        x = self.score(w, ctx)
        return self.weight * (x if 0.0 <= x <= 1.0 else 0.0 if x < 0.0 else 1.0)


def scored(name: str, weighted: Sequence[Weighted]) -> Router:
    """A router from weighted scorers and the lowest-score picker (ties in turn)."""
    if any(part.unbounded for part in weighted) and (
            len(weighted) != 1 or weighted[0].weight <= 0):
        raise ValueError(f"{name}: an unbounded scorer scores alone, with a positive weight")
    key_name = f"{name}#{next(_names)}"  # one ordered list per router built
    if weighted[0].unbounded:
        only = weighted[0].score

        def route_one(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext
                      ) -> WorkerView | None:
            return ctx.lowest(key_name, cands, lambda w: only(w, ctx))

        return Router(name, route_one)

    parts = tuple(weighted)

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        return ctx.lowest(key_name, cands, lambda w: sum(part(w, ctx) for part in parts))

    return Router(name, route)


# -- scorers -----------------------------------------------------------------------
def per_slot_score(w: WorkerView, ctx: RouteContext) -> float:
    """Items per slot (1 = full)."""
    return ctx.per_slot(w)


def kv_score(w: WorkerView, ctx: RouteContext) -> float:
    return w.kv_usage


def items_score(w: WorkerView, ctx: RouteContext) -> float:
    return float(ctx.load(w))


def least_loaded(cands: Sequence[WorkerView], ctx: RouteContext) -> WorkerView:
    """The fewest items per slot; ties in turn, so equal workers share."""
    return ctx.lowest(PER_SLOT, cands, ctx.per_slot)


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

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        return least_loaded(cands, ctx)

    return Router("least_loaded", route)


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
        sums = ctx.index.cumulative(cands)
        # Interleave by a stride coprime-ish to the total, so one worker's turns
        # are spread over the cycle instead of coming in a run.
        return sums.at((ctx.next_step() * 7919) % sums.total)

    return Router("weighted_round_robin", route)


def _known_mean_ttft(cands: Sequence[WorkerView]) -> float:
    known = [w.ttft_ms_avg for w in cands if w.ttft_ms_avg > 0]
    return sum(known) / len(known) if known else 1.0


def _least_response_time(params: NoParams) -> Router:
    """The lowest expected response: the worker's TTFT moving average (heartbeats)
    scaled by how full it is; a worker without figures yet counts as the mean."""
    key_name = f"least_response_time#{next(_names)}"

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        # The candidates' mean moves with their heartbeats only: once per view.
        mean = ctx.index.memo("mean_ttft", cands, lambda: _known_mean_ttft(cands))
        return ctx.lowest(key_name, cands,
                          lambda w: (w.ttft_ms_avg or mean) * (1.0 + ctx.per_slot(w)))

    return Router("least_response_time", route)


def _power_of_two(params: NoParams) -> Router:
    """Two workers at random, the less loaded of them (seeded generator)."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        if len(cands) == 1:
            return cands[0]
        a, b = ctx.rng.sample(range(len(cands)), 2)
        return min(cands[a], cands[b], key=ctx.per_slot)

    return Router("power_of_two", route)


# -- placement by key -----------------------------------------------------------------
def by_key(key: str, cands: Sequence[WorkerView], ctx: RouteContext) -> WorkerView:
    """Consistent hashing: the same key picks the same worker while it lives; when it
    goes, only its keys move (a ring per candidate group, built once)."""
    return ctx.index.ring(cands).owner(key)


def _affinity(params: NoParams) -> Router:
    """Session (or user) sticky: a session's requests go to one worker while it is
    alive, then to another (consistent hashing); without a session, least loaded."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        if not p.session:
            return least_loaded(cands, ctx)
        return by_key(p.session, cands, ctx)

    return Router("affinity", route)


def _locality(params: NoParams) -> Router:
    """Consistent hashing of the prompt's first block (requests that start alike
    meet on one worker), else of the tenant; ignores load."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        key = str(p.block_hashes[0]) if p.block_hashes else (p.tenant or p.request_id)
        return by_key(key, cands, ctx)

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

__all__ = ["PER_SLOT", "ROUTERS", "Scorer", "Weighted", "by_key", "items_score", "kv_score",
           "least_loaded", "per_slot_score", "scored"]
