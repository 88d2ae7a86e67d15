"""HeldMessages: which work messages a worker may ack, keyed by stream sequence."""

from __future__ import annotations

from typing import cast

from nats.aio.msg import Msg

from cplane.workers.held import HeldMessages


def msg(name: str) -> Msg:
    return cast(Msg, name)  # the book never looks inside a Msg


def test_ack_only_when_every_item_has_its_outcome() -> None:
    book = HeldMessages()
    assert book.hold(7, msg("m7"), ["a", "b"])
    assert book.done("a") == [] and 7 in book
    assert book.done("b") == ["m7"] and 7 not in book and len(book) == 0


def test_a_message_waiting_for_nothing_is_not_held() -> None:
    book = HeldMessages()
    assert not book.hold(1, msg("m1"), [])
    assert len(book) == 0


def test_redelivery_of_a_held_message_keeps_the_newest_msg() -> None:
    book = HeldMessages()
    book.hold(3, msg("first"), ["a"])
    assert book.refresh(3, msg("second"))
    assert not book.refresh(4, msg("other"))  # not held: the caller starts it
    assert book.msgs() == ["second"]
    assert book.done("a") == ["second"]


def test_duplicate_in_another_message_completes_with_the_original() -> None:
    book = HeldMessages()
    book.hold(1, msg("orig"), ["a", "b"])
    book.hold(2, msg("dup"), ["a"])  # "a" again, while it runs for message 1
    assert sorted(book.done("a")) == ["dup"]
    assert book.done("b") == ["orig"]


def test_drop_releases_the_messages_of_a_failed_item() -> None:
    book = HeldMessages()
    book.hold(1, msg("m1"), ["a", "b"])
    book.hold(2, msg("m2"), ["b"])
    assert sorted(book.drop("b")) == ["m1", "m2"]
    assert book.done("a") == []  # m1 is gone: its redelivery settles it
    assert len(book) == 0
