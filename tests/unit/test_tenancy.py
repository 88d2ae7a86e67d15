"""Tenants at intake, pure: the tenant from the subject, scoped ids, ceilings, cancels."""

from __future__ import annotations

import json

from cplane.bus.cancels import cancel_names, is_cancelled, key_request_id
from cplane.orchestrator.intake import Rejection, admit, scoped_key
from cplane.orchestrator.tenancy import TenantGate, known_in_scope
from cplane.schemas.messages import ErrorCode, Priority, WorkItem
from cplane.schemas.settings import LimitsSettings, OrchestratorSettings, TenantPolicy
from cplane.schemas.subjects import Subjects, scoped, tenant_of

S = Subjects()


def body(**kw: object) -> bytes:
    return json.dumps({"request_id": "r1", "prompt": "hi", "max_tokens": 3, **kw}).encode()


def test_the_tenant_is_the_token_after_the_kind() -> None:
    assert S.request("high", "batch", tenant="acme") == "llm.req.acme.high.batch"
    assert S.tenant_of_request("llm.req.acme.high.batch") == "acme"
    assert S.tenant_of_request("llm.req.high.batch") is None
    assert S.parse_request("llm.req.acme.high.batch") == ("high", "batch")
    assert Subjects(prefix="a.b").tenant_of_request("a.b.req.t.low.x") == "t"
    assert S.cancel("r1", "acme") == "llm.cancel.acme.r1" and S.cancel("r1") == "llm.cancel.r1"
    assert S.cancel_key("llm.cancel.acme.r1") == "acme.r1" and S.cancel_key("llm.cancel.r1") == "r1"
    assert scoped("acme", "i") == "acme.i" and scoped(None, "i") == "i"
    assert tenant_of("acme.job7") == "acme" and tenant_of("i") is None
    assert S.out(scoped("acme", "i"), "r1") == "llm.out.acme.i.r1"  # read as llm.out.i.r1


def test_a_tenants_request_is_scoped_and_names_its_tenant() -> None:
    got = admit(body(), "normal", "standard", 1.0, 2.0, tenant="acme")
    assert isinstance(got, WorkItem)
    assert got.request.tenant == "acme" and got.request.group == "acme.i"
    assert scoped_key(got.request) == "acme.r1"
    plain = admit(body(), "normal", "standard", 1.0, 2.0)
    assert isinstance(plain, WorkItem) and plain.request.group == "i"
    assert plain.request.tenant is None and scoped_key(plain.request) == "r1"


def test_a_body_naming_another_tenant_is_refused_on_the_publishers_own_subject() -> None:
    got = admit(body(tenant="victim"), "normal", "standard", 1.0, 2.0, tenant="acme")
    assert isinstance(got, Rejection) and got.code is ErrorCode.FORBIDDEN
    assert got.group == "acme.i"  # the answer goes to acme, never to victim
    alone = admit(body(tenant="victim"), "normal", "standard", 1.0, 2.0)
    assert isinstance(alone, Rejection) and alone.code is ErrorCode.FORBIDDEN
    same = admit(body(tenant="acme"), "normal", "standard", 1.0, 2.0, tenant="acme")
    assert isinstance(same, WorkItem)


def test_ceilings_and_reply_to_for_tenants() -> None:
    pol = TenantPolicy(max_priority="normal")
    over = admit(body(), "high", "standard", 1.0, 2.0, tenant="acme", policy=pol)
    assert isinstance(over, Rejection) and over.code is ErrorCode.FORBIDDEN
    assert "ceiling" in over.message and not over.retryable
    at = admit(body(), "normal", "standard", 1.0, 2.0, tenant="acme", policy=pol)
    assert isinstance(at, WorkItem) and at.priority is Priority.NORMAL
    steal = admit(body(reply_to="_INBOX.x"), "low", "s", 1.0, 2.0, tenant="acme")
    assert isinstance(steal, Rejection) and steal.code is ErrorCode.FORBIDDEN
    assert steal.reply_to is None
    undecodable = admit(b"{not json", "low", "s", 1.0, 2.0, tenant="acme")
    assert isinstance(undecodable, Rejection) and undecodable.group == "acme.invalid"


def gate(**tenants: TenantPolicy) -> TenantGate:
    return TenantGate(OrchestratorSettings(tenants=tenants), S, LimitsSettings())


def item(tenant: str, rid: str = "r1") -> WorkItem:
    got = admit(body(request_id=rid), "normal", "standard", 1.0, 2.0, tenant=tenant)
    assert isinstance(got, WorkItem)
    return got


def test_the_rate_cap_is_a_token_bucket_per_tenant() -> None:
    g = gate(a=TenantPolicy(max_rps=2.0))
    verdicts = [g.check(item("a", f"r{i}"), held_group=None, in_flight=0, new=True,
                        now_s=10.0) for i in range(4)]
    assert [v is None for v in verdicts] == [True, True, False, False]
    limited = verdicts[2]
    assert limited is not None and limited.code is ErrorCode.RATE_LIMITED and limited.retryable
    assert g.check(item("b"), held_group=None, in_flight=0, new=True, now_s=10.0) is None
    assert g.check(item("a", "later"), held_group=None, in_flight=0, new=True,
                   now_s=10.5) is None  # refilled at 2/s
    assert g.check(item("a", "again"), held_group=None, in_flight=0, new=False,
                   now_s=10.5) is None  # a redelivery was counted the first time


def test_the_in_flight_cap_and_ids_held_for_another_tenant() -> None:
    g = gate(a=TenantPolicy(max_in_flight=2))
    full = g.check(item("a"), held_group=None, in_flight=2, new=True, now_s=0.0)
    assert full is not None and full.code is ErrorCode.RATE_LIMITED
    assert g.check(item("a"), held_group=None, in_flight=1, new=True, now_s=0.0) is None
    taken = g.check(item("b"), held_group="a.i", in_flight=0, new=True, now_s=0.0)
    assert taken is not None and taken.code is ErrorCode.FORBIDDEN
    assert g.check(item("a"), held_group="a.i", in_flight=5, new=True, now_s=0.0) is None


def test_known_is_per_scope() -> None:
    assert known_in_scope(None, {"a.r1"}, "r1", "a.i")
    assert not known_in_scope(None, {"a.r1"}, "r1", "b.i")
    assert not known_in_scope(None, {"a.r1"}, "r1", "i")


def test_a_cancel_names_its_tenants_request_only() -> None:
    assert key_request_id("acme.r1") == "r1" and key_request_id("r1") == "r1"
    assert cancel_names("acme.r1", "acme.i", "r1")
    assert not cancel_names("other.r1", "acme.i", "r1")
    assert cancel_names("r1", "acme.i", "r1")  # an operator's plain cancel: any scope
    assert not cancel_names("acme.r1", "i", "r1")  # a tenant cannot cancel the system's
    assert is_cancelled({"acme.r1"}, "acme.job", "r1")
    assert not is_cancelled({"acme.r1"}, "b.i", "r1")
