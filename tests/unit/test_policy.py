"""Scheduling policies: plain asserts on hand-built snapshots, plus properties."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cplane.orchestrator import plugins
from cplane.orchestrator.policy import PolicyConfig, QueueView, fifo, priority

CFG = PolicyConfig(aging_s=10.0)


def view(*levels: list[float]) -> QueueView:
    return QueueView(tuple(levels))


def test_fifo_takes_oldest_first_across_levels() -> None:
    v = view([5.0], [1.0, 7.0], [], [3.0], [])
    assert fifo(v, 10, 100.0, CFG) == [1, 3, 0, 1]


def test_priority_is_strict_without_aging() -> None:
    v = view([90.0], [10.0], [], [], [1.0, 2.0])
    assert priority(v, 10, 100.0, CFG) == [0, 1, 4, 4]


def test_priority_takes_only_k() -> None:
    v = view([1.0, 2.0, 3.0], [], [], [], [])
    assert priority(v, 2, 100.0, CFG) == [0, 0]
    assert priority(view([], [], [], [], []), 5, 0.0, CFG) == []


def test_aging_lifts_a_long_waiting_request() -> None:
    now = 100_000.0
    # background (level 4) waited 45 s: rank 4 - 4 = 0; a fresh critical has rank 0
    # and arrived later, so the older background request goes first.
    v = view([now - 10.0], [], [], [], [now - 45_000.0])
    assert priority(v, 2, now, CFG) == [4, 0]
    # after only 25 s it ranks 2: the fresh critical goes first
    v = view([now - 10.0], [], [], [], [now - 25_000.0])
    assert priority(v, 2, now, CFG) == [0, 4]


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        plugins.build_policy("lottery")


arrivals = st.lists(st.floats(min_value=0, max_value=100_000), max_size=30).map(sorted)


@settings(max_examples=300, deadline=None)
@given(levels=st.tuples(arrivals, arrivals, arrivals, arrivals, arrivals),
       k=st.integers(min_value=0, max_value=200),
       now=st.floats(min_value=100_000, max_value=200_000),
       name=st.sampled_from(["fifo", "priority"]))
def test_no_request_lost_or_duplicated(levels: tuple[list[float], ...], k: int, now: float,
                                       name: str) -> None:
    v = QueueView(levels)
    order = {"fifo": fifo, "priority": priority}[name](v, k, now, CFG)
    assert len(order) == min(k, v.total)
    counts = Counter(order)
    assert all(counts[lvl] <= len(levels[lvl]) for lvl in counts)


@settings(max_examples=300, deadline=None)
@given(levels=st.tuples(arrivals, arrivals, arrivals, arrivals, arrivals),
       now=st.floats(min_value=100_000, max_value=200_000))
def test_priority_order_holds_within_the_aging_bound(levels: tuple[list[float], ...],
                                                     now: float) -> None:
    """Each pick has the lowest aged rank among the heads left at that moment."""
    v = QueueView(levels)
    order = priority(v, v.total, now, CFG)
    heads = [0] * 5
    aging_ms = CFG.aging_s * 1000

    def rank(level: int) -> tuple[float, float]:
        t = levels[level][heads[level]]
        return (level - int((now - t) // aging_ms), t)

    for level in order:
        live = [lvl for lvl in range(5) if heads[lvl] < len(levels[lvl])]
        assert rank(level) == min(rank(lvl) for lvl in live)
        heads[level] += 1
