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
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from orchestrator.fleet import WorkerView
from orchestrator.plugins import NoParams, register
from orchestrator.snapshot import Pending, RouteState


class RouteContext:
    """One plan's routing scratch; the shell folds `sent` and `step` back into its state."""

    __slots__ = ("_since", "rng", "sent", "step", "steps")

    def __init__(self, state: RouteState, rng: random.Random) -> None:
        self._since = state.sent_since
        self.step = state.step
        self.steps = 0  # round-robin steps taken by this plan
        self.sent: dict[str, int] = {}
        self.rng = rng

    def load(self, w: WorkerView) -> int:
        """Items on the worker: held at its last heartbeat, plus routed since."""
        wid = w.worker_id
        return w.held_items + self._since.get(wid, 0) + self.sent.get(wid, 0)

    def next_step(self) -> int:
        self.steps += 1
        return self.step + self.steps - 1

    def routed(self, w: WorkerView) -> None:
        self.sent[w.worker_id] = self.sent.get(w.worker_id, 0) + 1


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


@register("router", "least_loaded")
def _least_loaded(params: NoParams) -> Router:
    """The fewest items per slot (ties: in turn, so equal workers share)."""

    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        n = len(cands)
        start = ctx.next_step() % n
        return min((cands[(start + i) % n] for i in range(n)),
                   key=lambda w: ctx.load(w) / max(1, w.capacity))

    return route


__all__ = ["RouteContext", "Router"]
