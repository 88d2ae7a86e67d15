"""bus/heartbeats.py: the latest heartbeat per worker, on hand-made clocks; and the
orchestrator's registry, which keeps its workers in the same book."""

from __future__ import annotations

from typing import Any, cast

from nats.aio.client import Client as NATS

from cplane.bus.heartbeats import HeartbeatBook, HeartbeatWatcher, Seen
from cplane.orchestrator.fleet import Registry
from cplane.schemas.messages import Heartbeat, Role, WorkerState
from cplane.schemas.subjects import Subjects


def hb(wid: str, state: WorkerState = WorkerState.READY, capacity: int = 4) -> Heartbeat:
    return Heartbeat(worker_id=wid, role=Role.UNIFIED, models=["m"], engine="sim",
                     capacity=capacity, state=state)


def test_observe_returns_what_was_there_before() -> None:
    book = HeartbeatBook(timeout=3.5)
    first = hb("a")
    assert book.observe(first, 1.0) is None  # new
    second = hb("a", capacity=8)
    assert book.observe(second, 2.0) == Seen(first, 1.0)
    assert book.get("a") == Seen(second, 2.0) and "a" in book and len(book) == 1
    assert book.get("b") is None and "b" not in book


def test_a_stopping_worker_goes_at_once_unless_kept() -> None:
    book = HeartbeatBook(timeout=3.5)
    book.observe(hb("a"), 1.0)
    assert book.observe(hb("a", WorkerState.STOPPED), 1.5) == Seen(hb("a"), 1.0)
    assert "a" not in book
    assert book.observe(hb("b", WorkerState.STOPPED), 1.5) is None  # never known: nothing
    assert len(book) == 0

    kept = HeartbeatBook(timeout=3.5, keep_stopped=True)  # `cplane workers` shows it
    kept.observe(hb("a"), 1.0)
    kept.observe(hb("a", WorkerState.STOPPED), 1.5)
    seen = kept.get("a")
    assert seen is not None and seen.hb.state is WorkerState.STOPPED


def test_live_is_every_state_heard_within_the_timeout_by_id() -> None:
    book = HeartbeatBook(timeout=3.5)
    book.observe(hb("c"), 10.0)
    book.observe(hb("a", WorkerState.DRAINING), 9.0)
    book.observe(hb("b"), 6.5)  # exactly the timeout old at 10: still live
    book.observe(hb("old"), 1.0)
    assert [s.hb.worker_id for s in book.live(10.0)] == ["a", "b", "c"]
    assert "old" in book  # reading forgets nothing
    assert book.fresh(Seen(hb("x"), 6.5), 10.0) and not book.fresh(Seen(hb("x"), 6.4), 10.0)


def test_expire_forgets_the_stale_in_first_heard_order() -> None:
    book = HeartbeatBook(timeout=1000.0)  # any unit: here the registry's milliseconds
    for wid, at in (("z", 100.0), ("y", 200.0), ("fresh", 900.0)):
        book.observe(hb(wid), at)
    book.observe(hb("z"), 150.0)  # heard again: keeps its place, a new time
    assert [h.worker_id for h in book.expire(1210.0)] == ["z", "y"]
    assert [s.hb.worker_id for s in book] == ["fresh"]
    assert book.expire(1210.0) == []


def test_the_watcher_bounds_invented_worker_ids() -> None:
    heard: list[tuple[str, bool]] = []
    # No I/O before start(): the book and its bound are plain state.
    watcher = HeartbeatWatcher(cast(NATS, cast(Any, None)), Subjects(), timeout_s=0.0,
                               bound=3, on_heartbeat=lambda h, prev: heard.append(
                                   (h.worker_id, prev is None)))
    for i in range(3):
        watcher._observe(hb(f"w{i}"))
    assert len(watcher.book) == 3
    watcher._observe(hb("w3"))  # past the bound: the stale (here: all others) go
    assert list(watcher.book.seen) == ["w3"] and len(heard) == 4
    assert all(new for _, new in heard)


def test_registry_keeps_its_workers_in_one_book() -> None:
    reg = Registry(timeout_ms=1000)
    assert reg.observe(hb("a"), 0.0)  # new: the fleet's shape changed
    assert not reg.observe(hb("a"), 100.0)  # same shape: loads only
    reg.observe(hb("b", WorkerState.DRAINING), 500.0)
    # The control subjects list every state; the fleet view only READY workers.
    assert [h.worker_id for h in reg.heartbeats(600.0)] == ["a", "b"]
    assert [w.worker_id for w in reg.snapshot(600.0).workers] == ["a"]
    assert [h.worker_id for h in reg.heartbeats(1200.0)] == ["b"]  # "a" is stale
    assert [h.worker_id for h in reg.expire_workers(1200.0)] == ["a"]
    assert not reg.knows("a") and reg.knows("b") and len(reg.book) == 1
    assert reg.observe(hb("b", WorkerState.STOPPED), 1300.0)  # known: it goes now
    assert not reg.knows("b") and reg.heartbeats(1300.0) == []


def test_grace_gives_every_worker_a_fresh_timeout_after_the_reader_stalled() -> None:
    """A reader that could not listen (paused 5 s) expires nobody for its own silence;
    a worker that stays silent after the grace goes one timeout later."""
    book = HeartbeatBook(timeout=3.5)
    book.observe(hb("a"), 0.0)
    book.observe(hb("b"), 0.0)
    book.observe(hb("dead"), -3.0)  # silent 3 s already when the reader stalled
    book.grace(5.0)  # the reader stalled from 0.0 to 5.0: a and b would have expired
    assert book.expire(5.0) == []
    assert [h.worker_id for h in book.expire(5.6)] == ["dead"]  # its own silence counts
    book.observe(hb("a"), 6.0)  # a speaks again; b stays silent
    assert [h.worker_id for h in book.expire(8.6)] == ["b"]
    assert "a" in book
