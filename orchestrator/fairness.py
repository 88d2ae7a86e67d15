"""Tenant fairness inside a priority band, measured in work (tokens), not requests. Pure.

A virtual token counter per tenant (VTC, as in "Fairness in Serving Large
Language Models", OSDI'24): each dispatch charges the tenant
`in_weight * prompt_tokens + out_weight * max_tokens`, divided by the
tenant's configured weight. The next request of a band comes from the
tenant with the smallest counter that has one waiting; within a tenant, the
oldest. So a tenant that floods gets its weighted share and no more while
others wait; a tenant alone gets everything.

The counters live in the shell (`orchestrator/decision_state.py`), which
charges them for what it actually dispatched and lifts a tenant that comes
back from idle to the smallest active counter, so that idling banks no
credit. With several orchestrator replicas one leader dispatches (see
docs/replicas.md), so the weights hold without shared counters.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import msgspec

from cplane.orchestrator.snapshot import Pending, PolicyContext

DEFAULT_TENANT = ""  # requests without a tenant share one counter


class FairParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    fair: bool = False  # tenant-fair order inside each priority level
    in_weight: float = 1.0  # cost of a prompt token
    out_weight: float = 2.0  # cost of an output token (decode steps are dearer)
    # With fair: held requests past the free room it looks at, per level (a light
    # tenant's request behind a flood must be seen to be chosen).
    lookahead: int = 256


def charge(p: Pending, params: FairParams) -> float:
    """Work units a request costs its tenant (before the tenant's weight)."""
    return params.in_weight * p.prompt_tokens + params.out_weight * p.output_tokens


def fair_merge(cands: Sequence[Pending], k: int, work: Mapping[str, float],
               weights: Mapping[str, float], params: FairParams) -> list[Pending]:
    """Up to k of `cands` (oldest first) in virtual-counter order."""
    queues: dict[str, list[Pending]] = {}
    for p in cands:
        queues.setdefault(p.tenant, []).append(p)
    if len(queues) <= 1:
        return list(cands[:k])
    heads = {t: 0 for t in queues}
    heap = [(work.get(t, 0.0), q[0].arrival_ms, t) for t, q in queues.items()]
    heapq.heapify(heap)
    out: list[Pending] = []
    while heap and len(out) < k:
        w, _, t = heapq.heappop(heap)
        q = queues[t]
        p = q[heads[t]]
        out.append(p)
        heads[t] += 1
        if heads[t] < len(q):
            w += charge(p, params) / max(1e-9, weights.get(t, 1.0))
            heapq.heappush(heap, (w, q[heads[t]].arrival_ms, t))
    return out


def fair_levels(levels: tuple[tuple[Pending, ...], ...], k: int, ctx: PolicyContext,
                params: FairParams) -> tuple[tuple[Pending, ...], ...]:
    """Each level reordered tenant-fairly (levels stay strict bands)."""
    return tuple(tuple(fair_merge(level, k, ctx.tables.tenant_work,
                                  ctx.tables.tenant_weights, params))
                 if level else level for level in levels)


__all__ = ["DEFAULT_TENANT", "FairParams", "charge", "fair_levels", "fair_merge"]
