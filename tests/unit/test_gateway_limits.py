"""The gateway's admission decisions (gateway/limits.py, ownership.py, auth.py, header
parsing in openai_map.py), on plain values with plain asserts."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message, Receive, Scope, Send

from cplane.gateway import limits
from cplane.gateway import openai_map as om
from cplane.gateway.auth import OPEN, Caller, caller_for, key_book
from cplane.gateway.guard import Guard
from cplane.gateway.limits import TokenBucket
from cplane.gateway.metrics import GatewayMetrics
from cplane.gateway.ownership import own_only, owns
from cplane.schemas.messages import Priority
from cplane.schemas.settings import ApiKeyPolicy, load_settings


def test_declared_size_refuses_over_the_limit_without_parsing_huge_numbers() -> None:
    assert limits.declared_size(None, 100) is None
    assert limits.declared_size("100", 100) is None
    assert limits.declared_size("0100", 100) is None
    e = limits.declared_size("101", 100)
    assert e is not None and e.status == 413 and e.code == "too_large"
    huge = limits.declared_size("9" * 5000, 100)
    assert huge is not None and huge.status == 413
    assert limits.declared_size("abc", 100) is None  # the HTTP parser's business


def test_body_limits_by_endpoint() -> None:
    kw = {"max_body_bytes": 10, "max_file_bytes": 1000, "body_timeout_s": 1.0,
          "upload_timeout_s": 9.0}
    up = limits.body_limit("POST", "/v1/files", **kw)  # type: ignore[arg-type]
    assert up.max_bytes == 1000 + limits.MULTIPART_SLACK_BYTES and up.timeout_s == 9.0
    for method, path in (("POST", "/v1/batches"), ("POST", "/v1/chat/completions"),
                         ("GET", "/v1/files")):
        assert limits.body_limit(method, path, **kw) == limits.BodyLimit(10, 1.0)  # type: ignore[arg-type]


def test_token_bucket_bursts_then_paces() -> None:
    b, wait = limits.take(None, 2.0, 100.0)
    assert wait == 0.0 and b.tokens == 1.0  # burst 2: one left
    b, wait = limits.take(b, 2.0, 100.0)
    assert wait == 0.0 and b.tokens == 0.0
    b, wait = limits.take(b, 2.0, 100.1)
    assert wait == pytest.approx(0.4)  # 0.2 tokens there, 0.8 to go at 2/s
    b, wait = limits.take(b, 2.0, 100.5)
    assert wait == 0.0
    # A slow rate: burst 1, the next token after 1/rate seconds.
    b, wait = limits.take(None, 0.25, 0.0)
    assert wait == 0.0
    _, wait = limits.take(b, 0.25, 1.0)
    assert wait == pytest.approx(3.0)
    e = limits.rate_limited(0.2, 0.25)
    assert e.status == 429 and e.headers() == {"retry-after": "1"}
    assert e.type == "rate_limit_error"
    # Refill never exceeds the burst.
    full, _ = limits.take(TokenBucket(0.0, 0.0), 3.0, 1e9)
    assert full.tokens == 2.0


def test_open_request_caps_per_key_and_overall() -> None:
    kw = {"total_cap": 5, "retry_after_s": 0.3}
    assert limits.admit(1, 1, key_cap=2, **kw) is None  # type: ignore[arg-type]
    e = limits.admit(2, 2, key_cap=2, **kw)  # type: ignore[arg-type]
    assert e is not None and e.status == 429 and "API key" in e.message
    assert e.headers() == {"retry-after": "1"} and e.code == "too_many_streams"
    e = limits.admit(0, 5, key_cap=2, **kw)  # type: ignore[arg-type]
    assert e is not None and "gateway" in e.message
    assert limits.admit(99, 4, key_cap=None, **kw) is None  # type: ignore[arg-type]


def test_priority_ceiling_is_403_never_a_downgrade() -> None:
    assert limits.priority_allowed(Priority.CRITICAL, None) is None
    assert limits.priority_allowed(Priority.NORMAL, "normal") is None
    assert limits.priority_allowed(Priority.BACKGROUND, "normal") is None
    e = limits.priority_allowed(Priority.HIGH, "normal")
    assert e is not None and e.status == 403 and e.param == "priority"
    assert "'normal'" in e.message and "'high'" in e.message


def test_priority_text_is_a_name_or_a_short_int() -> None:
    assert om.priority_of("critical") is Priority.CRITICAL
    assert om.priority_of(" Low ") is Priority.LOW
    assert om.priority_of("-1") is Priority.HIGH and om.priority_of("+7") is Priority.BACKGROUND
    assert om.priority_of(-(10**30)) is Priority.CRITICAL  # a JSON int is clamped
    for bad in ("--5", "-", "5" * 5000, "1e3", "0x1", "٣", "high\x00", "hi\u202egh", "1 2",
                "urgent"):
        e = om.priority_of(bad)
        assert isinstance(e, om.ApiError), bad
        assert (e.status, e.type, e.param) == (400, "invalid_request_error", "priority")
        assert len(e.message) < 200  # a 5,000-digit value is not echoed whole


def test_slo_class_is_a_short_plain_token() -> None:
    for ok in (None, "standard", "a-b_C9", "x" * 64):
        assert om.slo_class_error(ok) is None, ok
    for bad in ("", "x" * 65, "a.b", "a>b", "a\x00b", "in\u202eteractive", "é", "a b"):
        e = om.slo_class_error(bad, "x-slo-class")
        assert e is not None and (e.status, e.param) == (400, "slo_class"), bad
        assert "\x00" not in e.message and "\u202e" not in e.message
    body = b'{"messages": [{"role": "user", "content": "x"}], "slo_class": "a\\u0000b"}'
    parsed = om.parse(om.Kind.CHAT, body, request_id="r", headers={})
    assert isinstance(parsed, om.ApiError) and parsed.param == "slo_class"


def test_keys_and_policies_make_callers() -> None:
    book = key_book({"k1": "acme", "k2": "globex"},
                    {"k2": ApiKeyPolicy(tenant="globex2", max_rps=1.0),
                     "k3": ApiKeyPolicy(tenant="initech", max_priority="low")})
    assert sorted(book) == ["k1", "k2", "k3"]
    c = caller_for("Bearer k2", book)
    assert isinstance(c, Caller) and c.tenant == "globex2" and c.policy is not None
    assert c.policy.max_rps == 1.0 and c.owner == "globex2"
    c = caller_for("Bearer k1", book)
    assert isinstance(c, Caller) and c.tenant == "acme" and c.key == "k1"
    assert isinstance(caller_for("Bearer nope", book), om.ApiError)
    assert caller_for(None, {}) is OPEN and OPEN.owner == ""


def test_policies_load_from_settings_and_typos_fail_at_start() -> None:
    s = load_settings(env={"CPLANE__GATEWAY__API_KEY_POLICIES__K9__TENANT": "t",
                           "CPLANE__GATEWAY__API_KEY_POLICIES__K9__MAX_RPS": "2.5"})
    assert s.gateway.api_key_policies["k9"] == ApiKeyPolicy(tenant="t", max_rps=2.5)
    for bad in ({"tenant": "t", "max_priority": "urgent"}, {"tenant": "t", "max_rps": 0},
                {"tenant": "t", "max_in_flight": 0}, {"max_rps": 1}):
        with pytest.raises(ValueError):
            load_settings(env={}, gateway={"api_key_policies": {"k": bad}})


def test_ownership_hides_what_is_not_yours() -> None:
    assert owns(None, "") and owns("", "") and owns("acme", "acme")
    assert not owns(None, "acme") and not owns("acme", "") and not owns("acme", "globex")
    items = [("f1", "acme"), ("f2", None), ("f3", "globex"), ("f4", "acme")]
    assert own_only(items, lambda i: i[1], "acme") == [("f1", "acme"), ("f4", "acme")]
    assert own_only(items, lambda i: i[1], "") == [("f2", None)]


async def test_a_slot_is_free_once_the_last_bytes_are_sent_not_when_the_app_returns() -> None:
    """A key with one request in flight, used one request after another: the next one,
    sent on seeing the end of the last, is admitted even while the app still cleans up
    after that last one (it failed CI once, as a 429 too_many_streams)."""
    cfg = load_settings(env={}, gateway={
        "api_key_policies": {"kp": {"tenant": "t", "max_in_flight": 1}}}).gateway
    cleaning, done = asyncio.Event(), asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/v1/stream":
            await send({"type": "http.response.body", "body": b"a", "more_body": True})
            cleaning.set()  # mid-stream: the slot is still taken
            await done.wait()
        await send({"type": "http.response.body", "body": b"z", "more_body": False})
        if scope["path"] == "/v1/first":
            cleaning.set()
            await done.wait()  # e.g. unsubscribing, after the client has its answer

    guard = Guard(app, cfg, GatewayMetrics())

    async def call(path: str) -> int:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path,
                 "headers": [(b"authorization", b"Bearer kp")]}
        await guard(scope, receive, send)
        return int(sent[0]["status"])

    for slow, status in (("/v1/first", 200), ("/v1/stream", 429)):
        cleaning.clear()
        done.clear()
        first = asyncio.create_task(call(slow))
        await cleaning.wait()
        assert await call("/v1/next") == status
        done.set()
        assert await first == 200
        assert guard.slots.open_total == 0 and not guard.slots.open_by_key
