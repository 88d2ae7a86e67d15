"""Scheduling policies: which held request goes next. Pure functions.

A policy sees a `QueueView` (per priority level, the arrival times of the
requests held, oldest first) and returns the order in which to take up to
`k` of them, as a list of levels: the i-th entry says "take the head of this
level's queue". Within a level, order is always FIFO.

- `fifo`: oldest arrival first, whatever the priority.
- `priority`: strict priority with aging. A request's rank is its level
  (0 = critical ... 4 = background) minus one for every `aging_s` it has
  waited; lowest rank first, ties to the older request. So a BACKGROUND
  request outranks any newly arrived CRITICAL one after 4 * aging_s of waiting:
  nothing starves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


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


Policy = Callable[[QueueView, int, float, PolicyConfig], list[int]]


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


POLICIES: dict[str, Policy] = {"fifo": fifo, "priority": priority}


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
