"""The worker's run ledger: legal and illegal moves, counts, held messages, drain."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from nats.aio.msg import Msg

from cplane.schemas.messages import Priority, Request, WorkItem
from cplane.workers.runs import IllegalTransition, Run, RunLedger, RunState
from tests.waiting import quiet_for

S = RunState


def item(rid: str) -> WorkItem:
    return WorkItem(request=Request(request_id=rid, prompt="x", max_tokens=4),
                    priority=Priority.NORMAL, slo_class="standard")


def msg(name: str) -> Msg:
    return cast(Msg, name)  # the ledger never looks inside a Msg


def through(book: RunLedger, run: Run, *states: RunState) -> None:
    for state in states:
        book.transition(run, state)


def test_a_run_from_delivery_to_removal() -> None:
    book = RunLedger()
    run = book.add(item("a"))
    assert run.state is S.ACCEPTED and "a" in book and book.held == 1
    assert book.begin(run) is S.CHECKING and not run.check
    through(book, run, S.RUNNING, S.STORING)
    assert book.count(S.STORING) == 1 and book.count(S.RUNNING) == 0
    book.finish(run, stored=True)
    assert run.state is S.DONE and "a" not in book and book.held == 0 and len(book) == 1
    book.transition(run, None)
    assert len(book) == 0 and sum(book.count(s) for s in S) == 0


@pytest.mark.parametrize(("path", "illegal"), [
    ((), S.RUNNING),  # nothing runs before it began (checked)
    ((), S.STORING),
    ((S.CHECKING, S.RUNNING, S.HANDING_BACK), S.RUNNING),  # told to leave: never back
    ((S.CHECKING, S.RUNNING, S.HANDING_BACK), S.CHECKING),
    ((S.CHECKING, S.STORING), S.RUNNING),  # a stored outcome is final (or tried again)
    ((S.CHECKING, S.STORING), S.STORING),
    ((S.CHECKING,), None),  # leaves the ledger only once DONE
    ((S.CHECKING, S.DONE), S.CHECKING),
])
def test_illegal_moves_are_refused(path: tuple[RunState, ...], illegal: RunState | None
                                   ) -> None:
    book = RunLedger()
    run = book.add(item("a"))
    through(book, run, *path)
    before = run.state
    assert before is not None
    with pytest.raises(IllegalTransition):
        book.transition(run, illegal)
    assert run.state is before and book.count(before) == 1


def test_a_run_cannot_be_added_twice() -> None:
    book = RunLedger()
    run = book.add(item("a"))
    with pytest.raises(IllegalTransition):
        book.transition(run, S.ACCEPTED)


def test_a_retry_checks_first_and_a_closed_ledger_sends_runs_back() -> None:
    book = RunLedger()
    run = book.add(item("a"))
    book.begin(run)
    through(book, run, S.RUNNING, S.STORING)  # ...and the store failed
    assert book.begin(run) is S.CHECKING and run.check  # tried again: checked first
    through(book, run, S.STORING)
    assert book.close() == [] and run.state is S.STORING  # storing: it finishes
    # ...but its store fails again: now it leaves, and stays leaving
    assert book.begin(run) is S.HANDING_BACK and book.begin(run) is S.HANDING_BACK


def test_a_faulted_run_goes_on_leaving_without_a_recheck() -> None:
    book = RunLedger()
    run = book.add(item("a"))
    book.begin(run)
    through(book, run, S.RUNNING, S.HANDING_BACK)  # the engine failed on it
    assert book.begin(run) is S.HANDING_BACK and not run.check  # nothing was stored twice


def test_close_returns_the_runs_to_stop() -> None:
    book = RunLedger()
    accepted, checking, running, storing = (book.add(item(r)) for r in "abcd")
    for run in (checking, running, storing):
        book.begin(run)
    through(book, running, S.RUNNING)
    through(book, storing, S.STORING)
    assert set(book.close()) == {checking, running}  # cancel these; storing ones finish
    assert checking.state is running.state is S.HANDING_BACK
    assert storing.state is S.STORING and accepted.state is S.ACCEPTED
    assert book.begin(accepted) is S.HANDING_BACK  # not begun yet: it leaves when it begins
    late = book.add(item("e"))
    assert book.begin(late) is S.HANDING_BACK
    assert book.count(S.HANDING_BACK) == 4


def test_a_continuation_is_the_newest_run_of_its_request() -> None:
    book = RunLedger()
    first = book.add(item("a"))
    book.begin(first)
    second = book.add(item("a"), after=first)  # its hand-back came back here
    assert book.get("a") is second and book.held == 1 and len(book) == 2
    book.finish(first, stored=True)  # the older one ends: the request still runs here
    assert book.get("a") is second and book.held == 1
    book.begin(second)
    book.finish(second, stored=True)
    assert book.get("a") is None and book.held == 0


def test_ack_only_when_every_item_has_its_outcome() -> None:
    book = RunLedger()
    a, b = book.add(item("a")), book.add(item("b"))
    assert book.hold(7, msg("m7"), [a, b]) and book.holds(7)
    book.begin(a)
    assert book.finish(a, stored=True) == [] and book.holds(7)
    book.begin(b)
    assert book.finish(b, stored=True) == [msg("m7")] and not book.holds(7)


def test_a_message_waiting_for_nothing_is_not_held() -> None:
    book = RunLedger()
    assert not book.hold(1, msg("m1"), [])
    assert book.msgs() == []


def test_redelivery_of_a_held_message_keeps_the_newest_msg() -> None:
    book = RunLedger()
    a = book.add(item("a"))
    book.hold(3, msg("first"), [a])
    assert book.refresh(3, msg("second"))
    assert not book.refresh(4, msg("other"))  # not held: the caller starts it
    assert book.msgs() == [msg("second")]
    book.begin(a)
    assert book.finish(a, stored=True) == [msg("second")]


def test_duplicate_in_another_message_completes_with_the_original() -> None:
    book = RunLedger()
    a, b = book.add(item("a")), book.add(item("b"))
    book.hold(1, msg("orig"), [a, b])
    book.hold(2, msg("dup"), [a])  # "a" again, while it runs for message 1
    book.begin(a)
    assert book.finish(a, stored=True) == [msg("dup")]
    book.begin(b)
    assert book.finish(b, stored=True) == [msg("orig")]


def test_an_unstored_outcome_releases_every_message_that_waited() -> None:
    book = RunLedger()
    a, b = book.add(item("a")), book.add(item("b"))
    book.hold(1, msg("m1"), [a, b])
    book.hold(2, msg("m2"), [b])
    book.begin(b)
    assert set(book.finish(b, stored=False)) == {msg("m1"), msg("m2")}
    book.begin(a)
    assert book.finish(a, stored=True) == []  # m1 is gone: its redelivery settles it
    assert book.msgs() == []


async def test_idle_waits_for_the_last_run_to_leave() -> None:
    book = RunLedger()
    assert await book.idle(0.01)
    run = book.add(item("a"))
    assert not await book.idle(0.01)
    waiting = asyncio.create_task(book.idle(5))
    book.begin(run)
    book.finish(run, stored=True)
    await quiet_for(0.05, waiting.done, why="a DONE run's acks are still going out: not idle")
    book.transition(run, None)
    assert await waiting
