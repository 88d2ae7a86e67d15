"""Request validation at the orchestrator's door."""

from __future__ import annotations

import pytest

from cplane.orchestrator.intake import Rejection, admit
from cplane.schemas.messages import Priority, WorkItem


def ok(body: bytes, prio: str = "high", slo: str = "interactive") -> WorkItem:
    out = admit(body, prio, slo, stored_ms=1000.0, now_ms=1005.0, orchestrator_id="o1")
    assert isinstance(out, WorkItem), out
    return out


def rejected(body: bytes) -> Rejection:
    out = admit(body, "normal", "standard", stored_ms=0.0, now_ms=0.0)
    assert isinstance(out, Rejection), out
    return out


def test_subject_priority_and_class_win_over_body() -> None:
    item = ok(b'{"request_id": "a", "prompt": "x", "priority": "low", "slo_class": "batch"}')
    assert item.priority is Priority.HIGH and item.slo_class == "interactive"
    assert item.enqueued_ms == 1000.0 and item.dispatched_ms == 1005.0
    assert item.orchestrator_id == "o1"


def test_token_ids_and_messages_are_prompts_too() -> None:
    assert ok(b'{"request_id": "a", "prompt_token_ids": [1, 2, 3]}').request.prompt_token_ids == [
        1, 2, 3]
    msgs = ok(b'{"request_id": "a", "messages": [{"role": "user", "content": "hi"}]}').request.messages
    assert msgs is not None and [(m.role, m.content) for m in msgs] == [("user", "hi")]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"request_id": "a"}', "exactly one of"),
        (b'{"request_id": "a", "prompt": "x", "prompt_token_ids": [1]}', "exactly one of"),
        (b'{"request_id": "a", "prompt": ""}', "empty"),
        (b'{"request_id": "a", "prompt": "x", "max_tokens": 0}', "max_tokens"),
        (b'{"request_id": "a", "prompt": "x", "temperature": -1}', "temperature"),
        (b'{"request_id": "a", "prompt": "x", "top_p": 0}', "top_p"),
        (b'{"request_id": "a", "prompt": "x", "group": "a.b"}', "group"),
        (b'{"request_id": "a", "prompt": "x", "reply_to": "my.*"}', "reply_to"),
    ],
)
def test_invalid_requests_are_rejected_with_their_id(body: bytes, needle: str) -> None:
    rej = rejected(body)
    assert rej.request_id == "a" and rej.group == "i"
    assert rej.code == "invalid_request" and needle in rej.message


def test_undecodable_requests_go_to_the_invalid_group() -> None:
    rej = rejected(b"\xff\xfe garbage")
    assert rej.request_id == "" and rej.group == "invalid"
    rej = rejected(b'{"request_id": "has.dot", "prompt": "x"}')
    assert rej.group == "invalid" and "subject token" in rej.message


def test_hostile_bodies_become_rejections_never_exceptions() -> None:
    for body in (b"[" * 100_000, b'{"request_id":"u1","prompt":"ok \xc3\x28","stop":["\xff"]}',
                 b'{"request_id":"n1","prompt":"x","temperature":NaN}',
                 b'{"request_id":"h1","prompt":"x","max_tokens":1e400}',
                 b'{"request_id":"d1","messages":' + b'{"a":' * 50_000):
        assert isinstance(rejected(body), Rejection)
    assert rejected(b'{"request_id":"u1","prompt":"ok \xc3\x28"}').request_id == "u1"


def test_reply_to_only_under_inbox_and_reserved_groups_refused() -> None:
    own = rejected(b'{"request_id":"r1","prompt":"x","reply_to":"llm.done.i.victim"}')
    assert own.code == "invalid_request" and "reply_to" in own.message and own.reply_to is None
    assert isinstance(ok(b'{"request_id":"r2","prompt":"x","reply_to":"_INBOX.abc"}'), WorkItem)
    bad = rejected(b'{"request_id":"r3","prompt":"x","top_p":7,"reply_to":"_INBOX.z"}')
    assert bad.reply_to == "_INBOX.z"  # a valid reply_to hears about its rejection
    assert "reserved" in rejected(b'{"request_id":"r4","prompt":"x","group":"invalid"}').message


def test_limits_give_too_large() -> None:
    big = rejected(b'{"request_id":"t1","prompt":"x","max_tokens":100000}')
    assert big.code == "too_large" and "max_tokens" in big.message
