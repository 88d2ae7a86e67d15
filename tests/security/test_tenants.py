"""Tenants against each other, on the documented secure stack (`cplane up --auth`).

A real nats-server with the multi-tenant accounts (bus/accounts.py), an
orchestrator and a sim worker as processes, each on its own credentials, and
tenants connecting as `cplane up --auth` prints them. Every attack here is
tried as a tenant would (a plain NATS client in its own account) and must
fail, and the fleet must go on serving the others (docs/security.md).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cplane.client import Client
from cplane.schemas.messages import Request
from cplane.schemas.settings import load_settings
from cplane.stack import Stack, StackSpec
from tests.waiting import quiet_for, subscribed, until

CONFIG = """
[orchestrator.tenants.a]
max_priority = "high"
[orchestrator.tenants.c]
max_rps = 1.0
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = Path(tmp_path_factory.mktemp("tenants")) / "cplane.toml"
    cfg.write_text(CONFIG)
    s = Stack(StackSpec(config=str(cfg), workers=1, auth=True, tenants=["a", "b", "c"]))
    s.start(timeout_s=120)
    try:
        yield s
    finally:
        s.stop()


async def tenant(stack: Stack, name: str) -> NATS:
    assert stack.auth is not None
    return await nats.connect(stack.url, **stack.auth.login(f"tenant-{name}"))


async def operator(stack: Stack) -> NATS:
    assert stack.auth is not None
    return await nats.connect(stack.url, **stack.auth.login("operator"))


class Outputs:
    """A tenant's view of one request: every message on `llm.*.<group>.<id>`."""

    def __init__(self) -> None:
        self.msgs: list[tuple[str, dict[str, Any]]] = []

    async def on(self, msg: Msg) -> None:
        self.msgs.append((msg.subject, json.loads(msg.data)))

    def terminal(self) -> dict[str, Any] | None:
        return next((m for _, m in self.msgs if m.get("type") in ("final", "error")), None)


async def send(nc: NATS, body: dict[str, Any], subject: str = "llm.req.normal.standard",
               group: str = "i", msg_id: bool = True) -> Outputs:
    out = Outputs()
    await nc.subscribe(f"llm.*.{group}.{body['request_id']}", cb=out.on)
    await subscribed(nc)
    await nc.jetstream().publish(subject, json.dumps(body).encode(), headers={
        "Nats-Msg-Id": body["request_id"]} if msg_id else None)
    return out


def rid() -> str:
    return f"r{uuid.uuid4().hex[:12]}"


async def answered(out: Outputs, timeout: float = 30) -> dict[str, Any]:
    await until(lambda: out.terminal() is not None, timeout, "the request's terminal")
    term = out.terminal()
    assert term is not None
    return term


async def still_served(stack: Stack, name: str = "b") -> None:
    """The fleet goes on serving a tenant after an attack."""
    nc = await tenant(stack, name)
    try:
        term = await answered(await send(nc, {"request_id": rid(), "prompt": "still there",
                                              "max_tokens": 3}))
        assert term["type"] == "final"
    finally:
        await nc.close()


async def test_a_tenant_sees_nothing_of_another_tenants_request(stack: Stack) -> None:
    a, b = await tenant(stack, "a"), await tenant(stack, "b")
    try:
        spied: list[str] = []

        async def spy(msg: Msg) -> None:
            spied.append(msg.subject)

        for pattern in (">", "llm.>", "_INBOX.>", "$JS.>", "llm.*.*.*"):
            await a.subscribe(pattern, cb=spy)
        await subscribed(a)
        r = rid()
        out = await send(b, {"request_id": r, "prompt": "private", "max_tokens": 5})
        term = await answered(out)
        assert term["type"] == "final"
        assert [s for s, _ in out.msgs][-1] == f"llm.done.i.{r}"  # as the README says
        await quiet_for(0.5, lambda: spied, why="tenant a would see b's chunks or acks")
    finally:
        await a.close()
        await b.close()


async def test_a_tenant_cannot_read_another_tenants_stored_terminal(stack: Stack) -> None:
    a, b = await tenant(stack, "a"), await tenant(stack, "b")
    try:
        r = rid()
        await answered(await send(b, {"request_id": r, "prompt": "mine", "max_tokens": 3}))
        own = await b.request(f"$JS.API.DIRECT.GET.LLM_DONE.llm.s.done.i.{r}", b"", timeout=5)
        assert not (own.headers or {}).get("Status") and b'"final"' in own.data
        for subject in (f"$JS.API.DIRECT.GET.LLM_DONE.llm.s.done.i.{r}",  # as a: a's scope
                        f"$JS.API.DIRECT.GET.LLM_DONE.llm.s.done.b.i.{r}"):  # naming b
            got = await a.request(subject, b"", timeout=5)
            assert (got.headers or {}).get("Status") == "404", got.data
        # a body naming another subject is refused by the server, not answered
        got = await a.request(f"$JS.API.DIRECT.GET.LLM_DONE.llm.s.done.i.{r}",
                              json.dumps({"last_by_subj": f"llm.s.done.b.i.{r}"}).encode(),
                              timeout=5)
        assert (got.headers or {}).get("Status") in ("400", "408"), got.headers
        # and tenant a's SDK, attaching to b's id, gets nothing
        client = Client(a, load_settings(env={}), tenant_view=True)
        handle = await client.attach(r)
        with pytest.raises(TimeoutError):
            await handle.terminal(timeout=1.0)
        handle.close()
    finally:
        await a.close()
        await b.close()
    await still_served(stack)


async def test_a_tenant_cannot_cancel_another_tenants_request(stack: Stack) -> None:
    a, b = await tenant(stack, "a"), await tenant(stack, "b")
    try:
        r = rid()
        out = await send(b, {"request_id": r, "prompt": "a long one", "max_tokens": 3000,
                             "ignore_eos": True})
        await until(lambda: out.msgs, 20, "b's first chunk")
        await a.publish(f"llm.cancel.{r}", b"")  # a's cancel of b's id: a's scope only
        await a.flush()
        await quiet_for(1.5, out.terminal, why="a's cancel would end b's request at once")
        await b.publish(f"llm.cancel.{r}", b"")  # b's own cancel works
        term = await answered(out, 15)
        assert term["type"] == "final" and term["finish_reason"] == "cancelled"
    finally:
        await a.close()
        await b.close()


async def test_the_tenant_comes_from_the_credentials_never_the_body_nor_a_reply_to(stack: Stack) -> None:
    a = await tenant(stack, "a")
    try:
        out = await send(a, {"request_id": rid(), "prompt": "I am b", "max_tokens": 3,
                             "tenant": "b"})
        term = await answered(out)
        assert term["type"] == "error" and term["code"] == "forbidden", term
        assert "tenant" in term["message"]
        steal = await answered(await send(a, {"request_id": rid(), "prompt": "x",
                                              "max_tokens": 2,
                                              "reply_to": "_INBOX.gateway.steal"}))
        assert steal["type"] == "error" and steal["code"] == "forbidden", steal  # no reply_to
        ok = await answered(await send(a, {"request_id": rid(), "prompt": "I am a",
                                           "max_tokens": 3, "tenant": "a"}))
        assert ok["type"] == "final"  # naming itself is allowed
    finally:
        await a.close()


async def test_a_priority_above_the_tenants_ceiling_is_refused(stack: Stack) -> None:
    a = await tenant(stack, "a")  # max_priority = "high"
    try:
        out = await send(a, {"request_id": rid(), "prompt": "now!", "max_tokens": 3},
                         subject="llm.req.critical.standard")
        term = await answered(out)
        assert term["type"] == "error" and term["code"] == "forbidden", term
        assert "ceiling" in term["message"] and not term.get("retryable")
        ok = await answered(await send(a, {"request_id": rid(), "prompt": "soon",
                                           "max_tokens": 3}, subject="llm.req.high.standard"))
        assert ok["type"] == "final"
    finally:
        await a.close()
    await still_served(stack)


async def test_a_tenant_above_its_rate_gets_rate_limited(stack: Stack) -> None:
    c = await tenant(stack, "c")  # max_rps = 1
    try:
        outs = [await send(c, {"request_id": rid(), "prompt": f"n{i}", "max_tokens": 2})
                for i in range(5)]
        terms = [await answered(o) for o in outs]
        limited = [t for t in terms if t["type"] == "error"]
        assert all(t["code"] == "rate_limited" and t.get("retryable") for t in limited), terms
        assert 1 <= len(terms) - len(limited) <= 3 and len(limited) >= 2, terms
    finally:
        await c.close()
    await still_served(stack)  # another tenant is not slowed by c's bucket


async def test_the_same_id_in_two_tenants_is_two_requests(stack: Stack) -> None:
    """Ids are per tenant at the orchestrator (as the SDK publishes: no Nats-Msg-Id on a
    tenant's connection). LLM_REQ's duplicate window is shared: the same Nats-Msg-Id
    from two tenants is stored once (docs/security.md says so; the SDK's ids are random)."""
    a, b = await tenant(stack, "a"), await tenant(stack, "b")
    try:
        r = rid()
        ta = await answered(await send(a, {"request_id": r, "prompt": "one two three",
                                           "max_tokens": 3}, msg_id=False))
        tb = await answered(await send(b, {"request_id": r, "prompt": "x",
                                           "max_tokens": 4}, msg_id=False))
        assert ta["type"] == tb["type"] == "final"
        # b's own request ran: never a's stored terminal sent again
        assert tb["usage"]["completion_tokens"] == 4 and ta["usage"]["completion_tokens"] == 3
    finally:
        await a.close()
        await b.close()


async def test_a_fresh_id_claim_reaches_no_other_tenants_answer(stack: Stack) -> None:
    """`fresh_id` skips the stored-terminal lookup: b claiming a's finished id as fresh
    runs b's own request and leaves a's stored answer as it was (ids are per tenant)."""
    a, b = await tenant(stack, "a"), await tenant(stack, "b")
    try:
        r = rid()
        ta = await answered(await send(a, {"request_id": r, "prompt": "one two three",
                                           "max_tokens": 3, "fresh_id": True}, msg_id=False))
        tb = await answered(await send(b, {"request_id": r, "prompt": "x", "max_tokens": 5,
                                           "fresh_id": True}, msg_id=False))
        assert ta["type"] == tb["type"] == "final"
        assert tb["usage"]["completion_tokens"] == 5 and ta["usage"]["completion_tokens"] == 3
        again = await answered(await send(a, {"request_id": r, "prompt": "other",
                                              "max_tokens": 7}, msg_id=False))
        assert again["usage"]["completion_tokens"] == 3  # a's id: its stored answer
    finally:
        await a.close()
        await b.close()


async def test_a_tenant_reaches_no_system_subject(stack: Stack) -> None:
    a, op = await tenant(stack, "a"), await operator(stack)
    try:
        arrived: list[str] = []

        async def spy(msg: Msg) -> None:
            if b"FORGED" in msg.data:  # the fleet's own heartbeats, fins, leases go on
                arrived.append(msg.subject)

        for pattern in ("llm.work.>", "llm.s.>", "llm.admin.>", "llm.hb.*", "llm.fin.*",
                        "llm.kv.*", "$KV.>", "llm.out.>", "llm.done.>"):
            await op.subscribe(pattern, cb=spy)
        await subscribed(op)
        forged = json.dumps({"type": "final", "request_id": "victim", "finish_reason": "stop",
                             "text": "FORGED"}).encode()
        for subject in ("llm.work.unified.any", "llm.s.done.i.victim", "llm.done.i.victim",
                        "llm.out.i.victim", "llm.admin.policy", "llm.hb.sim-0", "llm.fin.x",
                        "llm.kv.sim-0", "$KV.llm_config.policy", "$KV.llm_leases.orchestrator"):
            await a.publish(subject, forged)
        await a.flush()
        await quiet_for(0.5, lambda: arrived, why="a tenant's forgery would reach the system")
        info = await a.request("$JS.API.INFO", b"", timeout=5)  # no JetStream of its own
        assert json.loads(info.data)["error"]["err_code"] == 10039
        with pytest.raises(nats.errors.TimeoutError):  # a permission violation: no answer
            await a.request("$JS.API.STREAM.CREATE.EVIL", json.dumps(
                {"name": "EVIL", "subjects": ["llm.>"]}).encode(), timeout=2)
    finally:
        await a.close()
        await op.close()
    await still_served(stack)


async def test_a_tenants_sdk_finds_its_own_answer_after_a_reconnect(stack: Stack) -> None:
    assert stack.auth is not None
    settings = load_settings(env={}, nats={"url": stack.url,
                                           "creds": stack.auth.creds("tenant-b")})
    client = await Client.connect(settings=settings)
    try:
        assert client.tenant_view  # found out: no JetStream in its account
        final = await client.generate(Request(request_id=rid(), prompt="again", max_tokens=4),
                                      timeout=30)
        later = await Client.connect(settings=settings)  # a new connection, later
        try:
            handle = await later.attach(final.request_id)
            assert (await handle.result(timeout=10)).text == final.text  # the stored one
        finally:
            await later.close()
    finally:
        await client.close()


async def test_the_gateway_acts_for_a_key_as_its_tenant(stack: Stack) -> None:
    """Through the gateway (its own user), a key's requests are its tenant's: served, and
    held to that tenant's ceilings by the orchestrator (403, never a downgrade)."""
    import httpx

    assert stack.auth is not None and stack.gateway_url
    keys = {t: k for k, t in stack.auth.api_keys.items()}
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as http:
        ok = await http.post("/v1/completions", json={"model": "sim", "prompt": "hi",
                                                      "max_tokens": 3},
                             headers={"Authorization": f"Bearer {keys['a']}"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
        over = await http.post("/v1/completions", json={"model": "sim", "prompt": "hi",
                                                        "max_tokens": 3},
                               headers={"Authorization": f"Bearer {keys['a']}",
                                        "x-priority": "critical"})
        assert over.status_code == 403 and "ceiling" in over.json()["error"]["message"]
        assert (await http.post("/v1/completions", json={"model": "sim", "prompt": "hi"},
                                headers={"x-priority": "critical"})).status_code == 401
