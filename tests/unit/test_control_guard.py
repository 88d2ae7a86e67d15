"""bus/control.py's guard: a control message is applied only when it came straight to
the subject its handler serves (never a JetStream delivery aimed at it sideways);
and every control handler asks it."""

from __future__ import annotations

import logging
from typing import Any, cast

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cplane.bus.control import ADMIN_GUARD, AdminGuard, ControlEndpoint, sideways
from cplane.orchestrator.runtime_config import PolicySwitch
from cplane.schemas.settings import load_settings

POLICY = "llm.admin.policy"
SET_FIFO = b'{"op": "set", "name": "fifo", "by": "tenant-A"}'


def msg(subject: str = POLICY, reply: str = "_INBOX.abc.1", data: bytes = SET_FIFO,
        headers: dict[str, str] | None = None) -> Msg:
    return Msg(_client=cast(NATS, None), subject=subject, reply=reply, data=data,
               headers=headers)


# -- what counts as sideways ----------------------------------------------------------
def test_a_plain_request_or_publish_on_the_subject_is_admitted() -> None:
    assert sideways(msg(), POLICY) is None
    assert sideways(msg(reply=""), POLICY) is None  # a publish (heartbeat requests are)
    assert sideways(msg(headers={"traceparent": "00-x", "Nats-Msg-Id": "m1"}), POLICY) is None


def test_a_push_consumer_delivery_keeps_the_stored_subject_and_an_ack_reply() -> None:
    # What the server hands a subscriber of llm.admin.policy for a push consumer on
    # KV_llm_batches with that delivery subject (seen on nats-server 2.15).
    pushed = msg(subject="$KV.llm_batches.x",
                 reply="$JS.ACK.KV_llm_batches.evil.1.1.1.1796545867007209172.0")
    assert "$KV.llm_batches.x" in (sideways(pushed, POLICY) or "")
    # Even a stored subject equal to the one served (a subject transform) has the ack reply.
    acked = msg(reply="$JS.ACK.S.evil.1.1.1.1.0")
    assert "JetStream reply" in (sideways(acked, POLICY) or "")
    assert sideways(msg(reply="$JS.FC.S.evil.x"), POLICY) is not None  # flow control


@pytest.mark.parametrize("header", ["Nats-Stream", "Nats-Sequence", "Nats-Subject",
                                    "Nats-Last-Sequence", "Nats-Time-Stamp", "nats-stream",
                                    "Status"])
def test_republished_messages_and_consumer_heartbeats_carry_jetstream_headers(
        header: str) -> None:
    # A RePublish arrives on the subject itself, without a reply, with the stream's headers;
    # a push consumer's idle heartbeat carries a Status header.
    why = sideways(msg(reply="", headers={header: "1"}), POLICY)
    assert why is not None and header in why


# -- counting and logging ---------------------------------------------------------------
def test_the_guard_counts_every_refusal_and_logs_once_a_minute(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    guard = AdminGuard(clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="cplane.control")
    assert guard.admit(msg(), POLICY)
    for _ in range(5):
        assert not guard.admit(msg(subject="$KV.llm_batches.x"), POLICY)
    now[0] += 59.0
    assert not guard.admit(msg(reply="", headers={"Nats-Stream": "R"}), "llm.admin.status")
    assert guard.refused == 6
    assert guard.by_subject == {POLICY: 5, "llm.admin.status": 1}
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "refused 1 control message" in logged[0]
    now[0] += 1.0  # a minute after the first line: the next one logs every refusal since
    assert not guard.admit(msg(subject="$KV.llm_batches.y"), POLICY)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2
    assert "refused 6 control message" in logged[1] and "$KV.llm_batches.y" in logged[1]


# -- every handler asks it ----------------------------------------------------------------
async def test_the_control_endpoint_answers_nothing_that_came_sideways() -> None:
    asked: list[bytes] = []
    published: list[tuple[str, bytes]] = []

    async def answer(data: bytes) -> bytes:
        asked.append(data)
        return b"report"

    class FakeNats:
        async def publish(self, subject: str, data: bytes) -> None:
            published.append((subject, data))

    endpoint = ControlEndpoint(cast(NATS, FakeNats()), {"llm.admin.status": answer})
    on_msg = endpoint._responder("llm.admin.status", answer)
    before = ADMIN_GUARD.refused
    await on_msg(msg(subject="$KV.llm_batches.x", reply="$JS.ACK.KV_llm_batches.e.1.1.1.1.0"))
    await on_msg(msg(subject="llm.admin.status", reply="", headers={"Nats-Stream": "KV_x"}))
    assert asked == [] and published == [] and ADMIN_GUARD.refused == before + 2
    await on_msg(msg(subject="llm.admin.status", reply="_INBOX.me.1"))
    assert asked == [SET_FIFO] and published == [("_INBOX.me.1", b"report")]


class FakeBucket:
    def __init__(self) -> None:
        self.puts: list[tuple[str, bytes]] = []

    async def put(self, key: str, value: bytes) -> int:
        self.puts.append((key, value))
        return len(self.puts)


async def test_the_policy_switch_never_applies_a_command_that_came_sideways() -> None:
    settings = load_settings(env={}, orchestrator={"policy": "priority"})
    applied: list[str] = []
    replies: list[str] = []

    class FakeNats:
        async def publish(self, subject: str, data: bytes) -> None:
            replies.append(subject)

    switch = PolicySwitch(cast(Any, FakeNats()), cast(Any, None), settings, "orch-t",
                          lambda name, params: applied.append(name))
    bucket = FakeBucket()
    switch._kv = cast(Any, bucket)
    before = ADMIN_GUARD.refused
    await switch._on_admin(msg(subject="$KV.llm_batches.x",
                               reply="$JS.ACK.KV_llm_batches.evil.1.1.1.1.0"))
    await switch._on_admin(msg(reply="", headers={"Nats-Stream": "R", "Nats-Sequence": "1"}))
    assert applied == [] and bucket.puts == [] and replies == []
    assert switch.state.name == "priority" and ADMIN_GUARD.refused == before + 2
    # The same command sent straight (an `Admin.set_policy` request) is applied and stored.
    await switch._on_admin(msg())
    assert applied == ["fifo"] and [k for k, _ in bucket.puts] == ["policy"]
    assert replies == ["_INBOX.abc.1"] and ADMIN_GUARD.refused == before + 2
