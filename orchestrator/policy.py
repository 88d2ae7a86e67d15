"""Scheduling policies: which held request goes next. Pure functions.

A policy plugin is a `plugin_types.Policy` whose `order(levels, k, ctx)`
returns, from the held requests per priority level (each oldest first), the
up-to-k to take next, in order; `ctx` is a `PolicyContext` (the time, the
fleet, the core's measurements). fifo and priority merge the levels' heads,
so within a level order is FIFO (or, with `fair`, tenant-fair:
orchestrator/fairness.py); they work on a `QueueView` (the arrival times
alone) underneath.

- `fifo`: oldest arrival first, whatever the priority.
- `priority`: strict priority with aging. A request's rank is its level
  (0 = critical ... 4 = background) minus one for every `aging_s` it has
  waited; lowest rank first, ties to the older request. So a BACKGROUND
  request outranks any newly arrived CRITICAL one after 4 * aging_s of waiting:
  nothing starves.
- Spare capacity: a request of the lowest band (background) whose SLO class
  is in `PolicyConfig.spare_classes` (`batch`: what `cplane batch submit`
  sends) never ages and counts as just arrived, so under both policies it
  takes only the room the other requests leave. A large batch job fills an
  idle fleet without delaying interactive traffic, however long it waits.
  And it fills only `spare_fill` (90 %) of the fleet's slots (`spare_budget`):
  without preemption, a request arriving while a batch runs would otherwise
  wait for a batch line to finish before a worker takes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cplane.orchestrator.fairness import FairParams, fair_levels
from cplane.orchestrator.plugin_types import DEFAULT_LOOKAHEAD, Levels, PluginSpec, Policy
from cplane.orchestrator.snapshot import Pending, PolicyContext


@dataclass(frozen=True, slots=True)
class QueueView:
    """Arrival times (ms since epoch) per level, each oldest first."""

    arrivals: tuple[Sequence[float], ...]

    @property
    def total(self) -> int:
        return sum(len(a) for a in self.arrivals)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    aging_s: float = 10.0
    # Background requests of these SLO classes fill spare capacity only (see above).
    spare_classes: frozenset[str] = frozenset({"batch"})
    spare_fill: float = 0.9  # ...and take at most this share of the fleet's slots


# (arrivals, k, now_ms, config) -> the level of each of the next k requests.
HeadMerge = Callable[[QueueView, int, float, PolicyConfig], list[int]]


def _merge(view: QueueView, k: int, key: Callable[[int, float], tuple[float, float]]) -> list[int]:
    """Take up to k heads, each time the level whose head has the smallest key."""
    heads = [0] * len(view.arrivals)
    order: list[int] = []
    for _ in range(min(k, view.total)):
        best = -1
        best_key: tuple[float, float] | None = None
        for level, arr in enumerate(view.arrivals):
            i = heads[level]
            if i < len(arr):
                kk = key(level, arr[i])
                if best_key is None or kk < best_key:
                    best, best_key = level, kk
        heads[best] += 1
        order.append(best)
    return order


def fifo(view: QueueView, k: int, now_ms: float, cfg: PolicyConfig) -> list[int]:
    return _merge(view, k, lambda level, t: (t, level))


def priority(view: QueueView, k: int, now_ms: float, cfg: PolicyConfig) -> list[int]:
    aging_ms = max(cfg.aging_s, 1e-3) * 1000

    def rank(level: int, t: float) -> tuple[float, float]:
        waited_levels = int(max(0.0, now_ms - t) // aging_ms)
        return (level - waited_levels, t)

    return _merge(view, k, rank)


_LOWEST = 4  # the background band


def is_spare(p: Pending, cfg: PolicyConfig) -> bool:
    """A request that only fills spare capacity (background band, a spare class)."""
    return p.level == _LOWEST and p.slo_class in cfg.spare_classes


def spare_budget(cfg: PolicyConfig) -> Callable[[list[Pending], PolicyContext], int]:
    """How many of an order may go now: spare requests only while the fleet holds
    less than `spare_fill` of its slots (they come last in the order, so nothing
    else waits)."""

    def budget(ordered: list[Pending], ctx: PolicyContext) -> int:
        slots = ctx.fleet.total_capacity
        allowed = int(slots * cfg.spare_fill) - ctx.in_flight
        for i, p in enumerate(ordered):
            if is_spare(p, cfg):
                if allowed <= 0:
                    return i
                allowed -= 1
        return len(ordered)

    return budget


def by_heads(name: str, merge: HeadMerge, cfg: PolicyConfig, fair: FairParams,
             headroom: float | None = None) -> Policy:
    """A head-merging policy over Pending records (tenant-fair within each level
    when `fair.fair`), spare-capacity requests held to their budget."""

    def order(levels: Levels, k: int, ctx: PolicyContext) -> list[Pending]:
        if fair.fair:
            levels = fair_levels(levels, k, ctx, fair)
        now_ms = ctx.now_ms
        view = QueueView(tuple([now_ms if is_spare(p, cfg) else p.arrival_ms for p in level]
                               for level in levels))
        heads = [0] * len(levels)
        out = []
        for level in merge(view, k, now_ms, cfg):
            out.append(levels[level][heads[level]])
            heads[level] += 1
        return out

    return Policy(name, order, fair=fair, budget=spare_budget(cfg),
                  lookahead=fair.lookahead if fair.fair else DEFAULT_LOOKAHEAD,
                  headroom=headroom)


class PriorityParams(FairParams, frozen=True, forbid_unknown_fields=True):
    aging_s: float = 10.0  # waiting this long raises a request one level
    spare_fill: float = 0.9  # background batch lines take at most this share of the slots
    # Dispatch up to capacity * (1 + headroom); None = the orchestrator's setting.
    # 0 keeps a saturated fleet's queue here, in priority order, not in workers.
    headroom: float | None = None


def _fifo(params: FairParams) -> Policy:
    """Oldest arrival first, whatever the priority."""
    return by_heads("fifo", fifo, PolicyConfig(), params)


def _priority(params: PriorityParams) -> Policy:
    """Strict priority with aging: nothing starves."""
    return by_heads("priority", priority, PolicyConfig(aging_s=params.aging_s,
                                                       spare_fill=params.spare_fill),
                    params, params.headroom)


POLICIES: tuple[PluginSpec[Policy], ...] = (
    PluginSpec("fifo", _fifo, FairParams),
    PluginSpec("priority", _priority, PriorityParams),
)

__all__ = ["POLICIES", "HeadMerge", "PolicyConfig", "PriorityParams", "QueueView", "by_heads",
           "fifo", "is_spare", "priority", "spare_budget"]
