"""SLO classes: a request's class name to the targets it is scheduled by. Pure.

The subject's `<slo_class>` token names a class of `orchestrator.slo_classes`
(settings). A name not configured is served as `default_slo_class`: a typo
in a publisher must not turn traffic away, and it is still scheduled by
known targets (`ResolvedSlo.known` says which happened, for the stats). A
request's own `ttft_target_ms` / `tpot_target_ms` override its class's,
clamped to [1/4, 4] times them: a client may ask for tighter or looser, not
for a class of its own that would jump every queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cplane.schemas.settings import SloClass

BOUND = 4.0  # a request's own target stays within [class / BOUND, class * BOUND]


@dataclass(frozen=True, slots=True)
class ResolvedSlo:
    name: str  # the class it is scheduled as
    known: bool  # the asked class exists
    ttft_ms: float
    tpot_ms: float
    deadline_ms: float | None  # end-to-end budget from arrival (None = none)
    sheddable: bool
    weight: float


def _clamp(own: float | None, base: float) -> float:
    if own is None or own <= 0:
        return base
    return min(max(own, base / BOUND), base * BOUND)


def resolve(asked: str | None, classes: Mapping[str, SloClass], default: str, *,
            ttft_ms: float | None = None, tpot_ms: float | None = None,
            deadline_ms: float | None = None) -> ResolvedSlo:
    name = asked or default
    known = name in classes
    if not known:
        name = default
    c = classes.get(name) or SloClass(ttft_ms=1000.0, tpot_ms=100.0)
    budget = deadline_ms if deadline_ms else (c.deadline_ms or None)
    return ResolvedSlo(name, known, _clamp(ttft_ms, c.ttft_ms), _clamp(tpot_ms, c.tpot_ms),
                       budget, c.sheddable, c.weight)


__all__ = ["BOUND", "ResolvedSlo", "resolve"]
