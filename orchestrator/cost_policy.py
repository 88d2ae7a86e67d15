"""`cost_optimized`: the cheapest worker that can still meet the request's SLO. Pure.

Workers carry prices per 1000 input and output tokens (worker settings,
sent in heartbeats). Order is `priority`'s (bands with aging). Placement:
among the workers that serve the request's role and model and have a free
slot (load below capacity: it starts at once, so its TTFT is its prefill),
the one whose estimated cost (`prompt * in + max_tokens * out`) is lowest,
ties to the least loaded; when none has a free slot, the least loaded of
those within budget. Admission (`plan_dispatch`) rejects a request with
`over_budget` before it runs when even the cheapest worker that serves it
costs more than its `cost_budget`. The pool subject is never used: any
worker could pull from it, whatever its price.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from cplane.orchestrator.fairness import FairParams
from cplane.orchestrator.fleet import WorkerView
from cplane.orchestrator.plugin_types import PluginSpec, Policy, Router
from cplane.orchestrator.policy import PolicyConfig, by_heads, priority
from cplane.orchestrator.route_context import RouteContext
from cplane.orchestrator.snapshot import Pending


class CostParams(FairParams, frozen=True, forbid_unknown_fields=True):
    aging_s: float = 10.0


def cheapest_router() -> Router:
    def route(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> WorkerView | None:
        affordable = [w for w in cands if p.cost_budget is None
                      or w.cost(p.prompt_tokens, p.output_tokens) <= p.cost_budget] or list(cands)
        free = [w for w in affordable if ctx.load(w) < w.capacity]
        if free:
            return min(free, key=lambda w: (w.cost(p.prompt_tokens, p.output_tokens),
                                            ctx.per_slot(w)))
        return min(affordable, key=ctx.per_slot)

    return Router("cheapest", route)


def _cost_optimized(params: CostParams) -> Policy:
    """Priority order; each request to the cheapest worker with a free slot."""
    ordered = by_heads("cost_optimized", priority, PolicyConfig(aging_s=params.aging_s), params)
    return dataclasses.replace(ordered, router=cheapest_router())


COST_POLICIES: tuple[PluginSpec[Policy], ...] = (
    PluginSpec("cost_optimized", _cost_optimized, CostParams),
)

__all__ = ["COST_POLICIES", "CostParams", "cheapest_router"]
