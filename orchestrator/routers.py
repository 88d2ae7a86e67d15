"""Routers: which worker runs a request. Pure plugins (kind `router`).

A router is `route(candidates, pending, ctx) -> WorkerView | None`: the
candidates are the live, ready workers of the request's role that serve its
model, as of their last heartbeats; None means the pool subject (`any` or
the model's pool), where whichever worker has a free slot pulls it first.
`ctx` carries what a plan learns as it goes (round-robin position, items
routed so far) and the random generator, so a seeded run replays.

- `pool`: always the pool subject. JetStream's pull consumers make it "join
  the first free worker"; the cheapest choice when workers are alike.
- `round_robin`: the next worker in turn, by a step counter kept between plans.
- `random`: uniform, from the generator passed in.
- `least_loaded`: the fewest items per slot: held at the last heartbeat plus
  what this orchestrator routed to the worker since; ties go round in turn
  (lowest-index ties would pile every light load onto one worker).
- `load_balanced`: weighted scorers in [0, 1] (items per slot, KV usage).
- `least_connections`, `weighted_round_robin` (by capacity),
  `least_response_time` (TTFT moving averages from heartbeats, scaled by
  load), `power_of_two` (two at random, the less loaded).
- `affinity` (session sticky by rendezvous hashing), `locality` (consistent
  hashing of the prompt's first block); `prefix_aware` is in
  orchestrator/prefix_router.py.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence

import msgspec

from orchestrator.fleet import WorkerView
from orchestrator.plugins import NoParams, register
from orchestrator.snapshot import Pending, RouteState


class RouteContext:
    """One plan's routing scratch; the shell folds `sent` and `step` back into its state."""

    __slots__ = ("_done", "_overlay", "_placed", "_placed_now", "_prefix", "_since", "rng",
                 "sent", "step", "steps")

    def __init__(self, state: RouteState, rng: random.Random) -> None:
        self._since = state.sent_since
        self._done = state.done_since
        self._prefix = state.prefix  # a PrefixIndex (orchestrator/prefix_router.py) or None
        # Blocks routed by this plan, not yet in the index: (worker, block).
        self._overlay: set[tuple[str, int]] = set()
        self._placed = state.placed
        self._placed_now: dict[str, float] = {}  # tokens routed by this plan
        self.step = state.step
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


Router = Callable[[Sequence[WorkerView], Pending, RouteContext], WorkerView | None]


@register("router", "pool")
def _pool(params: NoParams) -> Router:
    """The pool subject: the first worker with a free slot pulls the request."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        return None

    return route


@register("router", "round_robin")
def _round_robin(params: NoParams) -> Router:
    """Each worker in turn."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        return cands[ctx.next_step() % len(cands)]

    return route


@register("router", "random")
def _random(params: NoParams) -> Router:
    """A uniformly random worker (seeded generator)."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        return cands[ctx.rng.randrange(len(cands))]

    return route


def _rotated(cands: Sequence[WorkerView], ctx: RouteContext) -> list[WorkerView]:
    """Candidates starting at the round-robin position: ties go round in turn."""
    n = len(cands)
    start = ctx.next_step() % n
    return [cands[(start + i) % n] for i in range(n)]


def least_loaded(cands: Sequence[WorkerView], ctx: RouteContext) -> WorkerView:
    """The fewest items per slot; ties in turn, so equal workers share."""
    return min(_rotated(cands, ctx), key=ctx.per_slot)


@register("router", "least_loaded")
def _least_loaded(params: NoParams) -> Router:
    """The fewest items per slot (ties: in turn, so equal workers share)."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        return least_loaded(cands, ctx)

    return route


# -- load-balancing algorithms -------------------------------------------------------

class LoadBalancedParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    load_weight: float = 0.7  # items per slot
    kv_weight: float = 0.3  # KV-cache usage at the last heartbeat


@register("router", "load_balanced", LoadBalancedParams)
def _load_balanced(params: LoadBalancedParams) -> Router:
    """Weighted scorers, each in [0, 1]: items per slot and KV usage; lowest wins."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        return min(_rotated(cands, ctx), key=lambda w: params.load_weight * min(
            1.0, ctx.per_slot(w)) + params.kv_weight * min(1.0, max(0.0, w.kv_usage)))

    return route


@register("router", "least_connections")
def _least_connections(params: NoParams) -> Router:
    """The fewest items, whatever the worker's size (ties in turn)."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        return min(_rotated(cands, ctx), key=ctx.load)

    return route


@register("router", "weighted_round_robin")
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

    return route


@register("router", "least_response_time")
def _least_response_time(params: NoParams) -> Router:
    """The lowest expected response: the worker's TTFT moving average (heartbeats)
    scaled by how full it is; a worker without figures yet counts as the mean."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        known = [w.ttft_ms_avg for w in cands if w.ttft_ms_avg > 0]
        mean = sum(known) / len(known) if known else 1.0
        return min(_rotated(cands, ctx), key=lambda w: (w.ttft_ms_avg or mean) * (
            1.0 + ctx.per_slot(w)))

    return route


@register("router", "power_of_two")
def _power_of_two(params: NoParams) -> Router:
    """Two workers at random, the less loaded of them (seeded generator)."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        if len(cands) == 1:
            return cands[0]
        a, b = ctx.rng.sample(range(len(cands)), 2)
        return min(cands[a], cands[b], key=ctx.per_slot)

    return route


# -- placement by key -----------------------------------------------------------------
def rendezvous(key: str, cands: Sequence[WorkerView]) -> WorkerView:
    """Highest-random-weight hashing: the same key picks the same worker while it
    lives; when it goes, only its keys move."""
    return max(cands, key=lambda w: zlib.crc32(f"{key}|{w.worker_id}".encode()))


@register("router", "affinity")
def _affinity(params: NoParams) -> Router:
    """Session (or user) sticky: a session's requests go to one worker while it is
    alive, then to another (rendezvous hashing); without a session, least loaded."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        if not p.session:
            return least_loaded(cands, ctx)
        return rendezvous(p.session, cands)

    return route


@register("router", "locality")
def _locality(params: NoParams) -> Router:
    """Consistent hashing of the prompt's first block (requests that start alike
    meet on one worker), else of the tenant; ignores load."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        key = str(p.block_hashes[0]) if p.block_hashes else (p.tenant or p.request_id)
        return rendezvous(key, cands)

    return route


__all__ = ["RouteContext", "Router", "least_loaded", "rendezvous"]
