"""`slo_aware`: earliest TTFT deadline first, feasible requests before infeasible. Pure.

Each held request has a TTFT deadline (arrival + its class's TTFT target, or
its own within bounds). In deadline order, a request's TTFT is estimated as
its wait for a slot (its position past the free room over the fleet's
measured drain rate) plus its prefill (prompt tokens over the measured
prefill speed). Requests that can still meet their deadline go first, in
deadline order; those that cannot go after them (so they never push a
feasible one past its deadline), oldest first. Whether an infeasible one runs
late or is shed at once is its SLO class's choice (`sheddable`), applied by
admission control in `plan_dispatch`. Priority only breaks ties; with `fair`
the candidates are first put in tenant-fair order (orchestrator/fairness.py),
which then breaks ties between equal deadlines.
"""

from __future__ import annotations

from cplane.orchestrator.fairness import FairParams, fair_merge
from cplane.orchestrator.plugin_types import Levels, PluginSpec, Policy
from cplane.orchestrator.snapshot import Pending, PolicyContext


class SloParams(FairParams, frozen=True, forbid_unknown_fields=True):
    lookahead: int = 256  # held requests past the free room it looks at, per level
    # Send work only while the fleet's estimated prefill queue stays under this:
    # the rest waits here, in deadline order, instead of in the engines' FIFO.
    max_backlog_ms: float = 50.0
    # Dispatch up to capacity * (1 + headroom): 0 keeps the queue here, in
    # deadline order, rather than in the workers' FIFO queues.
    headroom: float = 0.0


def prefill_budget(ordered: list[Pending], ctx: PolicyContext, max_backlog_ms: float) -> int:
    """How many of `ordered` may go now (at least one while the backlog is empty)."""
    extra = 0.0
    for i, p in enumerate(ordered):
        extra += p.prompt_tokens
        if ctx.backlog_ms(extra) > max_backlog_ms and (i > 0 or ctx.backlog_ms() > 0):
            return i
    return len(ordered)


def split_feasible(cands: list[Pending], ctx: PolicyContext
                   ) -> tuple[list[Pending], list[Pending]]:
    """(feasible in deadline order, the rest oldest first within priority)."""
    by_deadline = sorted(cands, key=lambda p: (p.ttft_deadline_ms, p.level, p.arrival_ms))
    feasible: list[Pending] = []
    late: list[Pending] = []
    for p in by_deadline:
        # Its position if it joins the feasible ones: only they are ahead of it.
        eta = ctx.now_ms + ctx.wait_ms(len(feasible)) + ctx.prefill_ms(p)
        (feasible if eta <= p.ttft_deadline_ms else late).append(p)
    late.sort(key=lambda p: (p.level, p.arrival_ms))
    return feasible, late


def edf_feasible(cands: list[Pending], k: int, ctx: PolicyContext) -> list[Pending]:
    """Deadline order, feasible first; the first k."""
    feasible, late = split_feasible(cands, ctx)
    return (feasible + late)[:k]


def _slo_aware(params: SloParams) -> Policy:
    """Earliest TTFT deadline first among requests that can still meet theirs."""

    def order(levels: Levels, k: int, ctx: PolicyContext) -> list[Pending]:
        cands = [p for level in levels for p in level]
        if params.fair:
            cands = fair_merge(sorted(cands, key=lambda p: p.arrival_ms), len(cands),
                               ctx.tables.tenant_work, ctx.tables.tenant_weights, params)
        return edf_feasible(cands, k, ctx)

    def budget(ordered: list[Pending], ctx: PolicyContext) -> int:
        return prefill_budget(ordered, ctx, params.max_backlog_ms)

    return Policy("slo_aware", order, fair=params, budget=budget, lookahead=params.lookahead,
                  headroom=params.headroom)


SLO_POLICIES: tuple[PluginSpec[Policy], ...] = (PluginSpec("slo_aware", _slo_aware, SloParams),)

__all__ = ["SLO_POLICIES", "SloParams", "edf_feasible", "prefill_budget", "split_feasible"]
