"""`adaptive`: runs fifo, slo_aware or priority, chosen from measured load. Pure.

The rule, evaluated at every plan from two signals:
- pressure: requests in the fleet and held at the orchestrator per slot of
  the fleet (1.0 = every slot busy);
- late: the share of requests missing their TTFT target: the larger of
  slo_aware's estimate over the held ones (wait for a slot + prefill) and
  what the shell measured over recently finished ones (`miss_rate`).

    fifo      -> slo_aware  when pressure >= up_pressure or late > up_late, for up_s
    slo_aware -> priority   when late >= give_up_late, for up_s (SLOs are lost
                            for most: protect the priority bands instead)
    priority  -> slo_aware  when late < give_up_late / 2, for down_s
    slo_aware -> fifo       when pressure <= down_pressure and late <= up_late / 2,
                            for down_s

A condition must hold without a break for its whole period before the
switch (hysteresis: `up_s` short, `down_s` long, and the thresholds apart),
so the mode does not flap at a boundary. The shell keeps (mode, since_ms) and
the plan hands back the new pair.
"""

from __future__ import annotations

from dataclasses import dataclass

from cplane.orchestrator.fairness import FairParams
from cplane.orchestrator.plugin_types import Levels, PluginSpec, Policy
from cplane.orchestrator.policy import PolicyConfig, by_heads, fifo, priority
from cplane.orchestrator.slo_policy import edf_feasible, split_feasible
from cplane.orchestrator.snapshot import Pending, PolicyContext

FIFO, SLO, PRIORITY = "fifo", "slo_aware", "priority"


class AdaptiveParams(FairParams, frozen=True, forbid_unknown_fields=True):
    aging_s: float = 10.0
    up_pressure: float = 0.9
    down_pressure: float = 0.6
    up_late: float = 0.02  # fifo -> slo_aware when more miss than this
    give_up_late: float = 0.5
    up_s: float = 1.0
    down_s: float = 10.0
    lookahead: int = 256


@dataclass(frozen=True, slots=True)
class Signals:
    pressure: float
    late: float


def signals(levels: Levels, ctx: PolicyContext) -> Signals:
    cands = [p for level in levels for p in level]
    if not cands:
        return Signals(ctx.in_flight / _slots(ctx), ctx.measured.miss_rate)
    _, late = split_feasible(cands, ctx)
    return Signals((ctx.in_flight + max(0, len(cands) - ctx.room)) / _slots(ctx),
                   max(ctx.measured.miss_rate, len(late) / len(cands)))


def _slots(ctx: PolicyContext) -> int:
    """Slots requests occupy: unified and decode workers (PD counts on decode)."""
    return sum(w.capacity for w in ctx.fleet.workers if w.role.value != "prefill") or 1


def adapt(mode: str, since_ms: float, sig: Signals, now_ms: float, prm: AdaptiveParams
          ) -> tuple[str, float]:
    """The next (mode, since_ms): since_ms is when the current switch condition began
    to hold (-1 = it does not)."""
    target, hold_s = mode, 0.0
    if mode == FIFO and (sig.pressure >= prm.up_pressure or sig.late > prm.up_late):
        target, hold_s = SLO, prm.up_s
    elif mode == SLO and sig.late >= prm.give_up_late:
        target, hold_s = PRIORITY, prm.up_s
    elif mode == SLO and sig.pressure <= prm.down_pressure and sig.late <= prm.up_late / 2:
        target, hold_s = FIFO, prm.down_s
    elif mode == PRIORITY and sig.late < prm.give_up_late / 2:
        target, hold_s = SLO, prm.down_s
    elif mode not in (FIFO, SLO, PRIORITY):
        return FIFO, -1.0
    if target == mode:
        return mode, -1.0
    if since_ms < 0:
        return mode, now_ms
    if now_ms - since_ms >= hold_s * 1000:
        return target, -1.0
    return mode, since_ms


def _adaptive(params: AdaptiveParams) -> Policy:
    """fifo when idle, slo_aware under contention, priority when SLOs are lost."""
    by_mode = {FIFO: by_heads(FIFO, fifo, PolicyConfig(), params),
               PRIORITY: by_heads(PRIORITY, priority, PolicyConfig(aging_s=params.aging_s),
                                  params)}

    def order(levels: Levels, k: int, ctx: PolicyContext) -> list[Pending]:
        if ctx.mode == SLO or ctx.mode not in by_mode:
            return edf_feasible([p for level in levels for p in level], k, ctx)
        return by_mode[ctx.mode](levels, k, ctx)

    def next_mode(levels: Levels, ctx: PolicyContext, since_ms: float) -> tuple[str, float]:
        return adapt(ctx.mode or FIFO, since_ms, signals(levels, ctx), ctx.now_ms, params)

    def headroom_for(mode: str) -> float | None:
        # Queue here (in deadline or priority order) once it matters; at low
        # load fifo keeps the configured headroom so workers never idle.
        return None if mode in ("", FIFO) else 0.0

    return Policy("adaptive", order, fair=params, lookahead=params.lookahead,
                  headroom_of_mode=headroom_for, next_mode=next_mode)


ADAPTIVE_POLICIES: tuple[PluginSpec[Policy], ...] = (
    PluginSpec("adaptive", _adaptive, AdaptiveParams),
)

__all__ = ["ADAPTIVE_POLICIES", "AdaptiveParams", "Signals", "adapt", "signals"]
