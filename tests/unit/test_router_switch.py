"""The router switch's decisions, without a broker: refusal, adopting a stored value,
the admin answer, the router in force, and the swap on a real decision core (with
the prefix inputs it needs). On a real nats-server: tests/live/test_router_switch.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from cplane.orchestrator import plugins
from cplane.orchestrator.core import DecisionCore
from cplane.orchestrator.dispatch import dispatch_config
from cplane.orchestrator.health_admin import build_registry
from cplane.orchestrator.runtime_config import (
    ROUTER_KEY,
    PolicySwitch,
    RouterSwitch,
    refusal,
    refusal_of,
)
from cplane.orchestrator.switches import Switches
from cplane.schemas.admin import PolicyState, RouterSet, RouterState, admin_reply_decoder
from cplane.schemas.codec import encode
from cplane.schemas.messages import Heartbeat, Role, WorkerState, WorkItem
from cplane.schemas.settings import Settings, load_settings

ROUTERS = plugins.names("router")


def _settings(**orchestrator: object) -> Settings:
    return load_settings(env={}, orchestrator={"router": "least_loaded", **orchestrator})


# -- refusal -----------------------------------------------------------------------------
def test_an_unknown_router_is_refused_with_every_choice() -> None:
    reply = refusal_of("router", plugins.build_router, "lottery", {})
    assert reply is not None and not reply.ok and reply.choices == ROUTERS
    assert "lottery" in reply.error and all(name in reply.error for name in ROUTERS)
    assert reply.error.startswith("unknown router 'lottery'; valid routers: ")


def test_a_bad_router_parameter_is_refused_with_the_routers_parameters() -> None:
    reply = refusal_of("router", plugins.build_router, "prefix_aware", {"bogus": 1})
    assert reply is not None and "bogus" in reply.error
    assert reply.param_choices == ["search", "slack", "work_floor_tokens", "work_slack",
                                   "work_weight"]
    assert "slack" in reply.error
    reply = refusal_of("router", plugins.build_router, "least_loaded", {"slack": 1})
    assert reply is not None and "none" in reply.error and reply.param_choices == []
    assert refusal_of("router", plugins.build_router, "prefix_aware", {"slack": 0.2}) is None


def test_the_policy_refusal_reads_as_before() -> None:
    o = _settings().orchestrator
    reply = refusal(o, "lottery", {})
    assert reply is not None and reply.error.startswith("unknown policy 'lottery'; valid "
                                                        "policies: ")
    assert refusal(o, "priority", {"aging_s": 3}) is None


# -- adopting a stored value ---------------------------------------------------------------
@dataclass
class Entry:  # what a KV watch delivers
    value: bytes | None
    operation: str | None = None
    revision: int = 1


class Bucket:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def put(self, key: str, value: bytes) -> int:
        self.values[key] = value
        return len(self.values)

    async def get(self, key: str) -> Entry:
        if key not in self.values:
            raise KeyNotFoundError
        return Entry(self.values[key])


class Wire:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.published.append((subject, data))


def _switch(settings: Settings, applied: list[tuple[str, dict[str, Any]]],
            policy_router: str | None = None) -> tuple[RouterSwitch, Bucket, Wire]:
    def apply(name: str, params: Mapping[str, Any]) -> None:
        plugins.build_router(name, params)  # what the orchestrator's callback does first
        applied.append((name, dict(params)))

    wire, bucket = Wire(), Bucket()
    switch = RouterSwitch(cast(Any, wire), cast(Any, None), settings, "orch-t", apply,
                          policy_router=lambda: policy_router)
    switch._kv = cast(Any, bucket)
    return switch, bucket, wire


def _stored(state: RouterState) -> Any:
    return Entry(encode(state))


def test_the_settings_rule_until_a_value_is_stored_and_a_delete_brings_them_back() -> None:
    applied: list[tuple[str, dict[str, Any]]] = []
    switch, _, _ = _switch(_settings(router_params={}), applied)
    assert switch.state == RouterState(name="least_loaded", by="settings")
    state = RouterState(name="prefix_aware", params={"slack": 0.1}, updated_ms=1.0, by="ops")
    switch._adopt_entry(_stored(state))
    assert switch.state == state and applied == [("prefix_aware", {"slack": 0.1})]
    switch._adopt_entry(_stored(state))  # our own set, seen again through the watch
    assert len(applied) == 1
    switch._adopt_entry(cast(Any, Entry(None, operation="DEL")))
    assert switch.state == switch.default and applied[-1] == ("least_loaded", {})


def test_a_stored_value_that_does_not_build_changes_nothing() -> None:
    applied: list[tuple[str, dict[str, Any]]] = []
    switch, _, _ = _switch(_settings(), applied)
    for garbage in (b"not json", b'{"name": 7}', b'{"name": "lottery"}',
                    b'{"name": "prefix_aware", "params": {"bogus": 1}}'):
        switch._adopt_entry(cast(Any, Entry(garbage)))
    assert applied == [] and switch.state == switch.default


# -- the admin subject -----------------------------------------------------------------------
def _msg(switch: RouterSwitch, data: bytes) -> Msg:
    return Msg(_client=cast(NATS, None), subject=switch.choice.subject, reply="_INBOX.t.1",
               data=data)


async def test_set_stores_and_applies_a_refusal_stores_nothing() -> None:
    applied: list[tuple[str, dict[str, Any]]] = []
    switch, bucket, wire = _switch(_settings(), applied)
    await switch._on_admin(_msg(switch, encode(RouterSet(name="lottery"))))
    await switch._on_admin(_msg(switch, encode(RouterSet(name="random", params={"x": 1}))))
    refused = [admin_reply_decoder.decode(d) for _, d in wire.published]
    assert [r.ok for r in refused] == [False, False] and refused[0].choices == ROUTERS
    assert bucket.values == {} and applied == []

    await switch._on_admin(_msg(switch, encode(RouterSet(name="random", by="ops"))))
    ok = admin_reply_decoder.decode(wire.published[-1][1])
    assert ok.ok and ok.router == "random" and ok.state is None
    assert ok.router_state is not None and (ok.router_state.name, ok.router_state.by) == (
        "random", "ops")
    assert list(bucket.values) == [ROUTER_KEY] and applied == [("random", {})]

    await switch._on_admin(_msg(switch, b'{"op": "get"}'))
    got = admin_reply_decoder.decode(wire.published[-1][1])
    assert got.router_state == ok.router_state and got.router == "random"
    await switch._on_admin(_msg(switch, b'{"op": "frobnicate"}'))
    assert not admin_reply_decoder.decode(wire.published[-1][1]).ok


async def test_a_policy_with_its_own_router_keeps_it_and_the_answer_says_so() -> None:
    switch, _, wire = _switch(_settings(), [], policy_router="cheapest")
    await switch._on_admin(_msg(switch, encode(RouterSet(name="random"))))
    reply = admin_reply_decoder.decode(wire.published[-1][1])
    assert reply.ok and reply.router == "cheapest"
    assert reply.router_state is not None and reply.router_state.name == "random"


def test_policy_get_tells_the_set_router_for_a_policy_without_its_own() -> None:
    s = _settings()
    switch = PolicySwitch(cast(Any, None), cast(Any, None), s, "orch-t", lambda n, p: None,
                          set_router=lambda: "random")
    assert switch.router_of(PolicyState(name="fifo")) == "random"
    assert switch.router_of(PolicyState(name="cost_optimized")) == "cheapest"
    plain = PolicySwitch(cast(Any, None), cast(Any, None), s, "orch-t", lambda n, p: None)
    assert plain.router_of(PolicyState(name="fifo")) == "least_loaded"  # the settings'


# -- the swap, on a real core ------------------------------------------------------------------
def _switches(s: Settings) -> tuple[Switches, DecisionCore[WorkItem], list[int]]:
    core: DecisionCore[WorkItem] = DecisionCore(dispatch_config(s.orchestrator))
    replans: list[int] = []
    registry = build_registry(s)
    registry.observe(Heartbeat(worker_id="w0", role=Role.UNIFIED, models=["m"], engine="sim",
                               capacity=4, state=WorkerState.READY), time.time() * 1000)
    switches = Switches(s, core, registry, "orch-t", lambda: replans.append(1))
    return switches, core, replans


def test_use_router_swaps_the_router_and_the_prefix_inputs_follow() -> None:
    switches, core, replans = _switches(_settings(prefix_tokenizer="words"))
    assert core.cfg.router.name == "least_loaded" and switches.hasher is None
    policy = core.cfg.policy
    switches.use_router("prefix_aware", {"slack": 0.5})
    assert core.cfg.router_in_use.name == "prefix_aware" and core.cfg.policy is policy
    assert switches.hasher is not None and replans == [1]
    hasher = switches.hasher
    switches.use_router("round_robin", {})
    assert core.cfg.router_in_use.name == "round_robin" and switches.hasher is None
    switches.use_router("locality", {})
    assert switches.hasher is hasher  # built once: a tokenizer loads once


def test_a_router_that_does_not_build_changes_nothing() -> None:
    switches, core, replans = _switches(_settings())
    before = core.cfg
    for name, params in (("lottery", {}), ("prefix_aware", {"bogus": 1})):
        try:
            switches.use_router(name, params)
        except ValueError:
            pass
        else:
            raise AssertionError(f"{name} {params} was applied")
    assert core.cfg is before and replans == [] and switches.hasher is None


def test_a_policy_with_its_own_router_wins_over_the_set_one() -> None:
    switches, core, _ = _switches(_settings())
    switches.use_router("random", {})
    switches.use_policy("cost_optimized", {})
    assert core.cfg.router.name == "random" and core.cfg.router_in_use.name == "cheapest"
    assert switches.policy_name == "cost_optimized"
    switches.use_router("prefix_aware", {})  # set, not in force: nothing to hash for
    assert core.cfg.router_in_use.name == "cheapest" and switches.hasher is None
    switches.use_policy("fifo", {})  # the set router is in force again
    assert core.cfg.router_in_use.name == "prefix_aware" and switches.hasher is not None


class FeedWire:
    """What KvFeed asks of a connection: a subscription, snapshot requests."""

    def __init__(self) -> None:
        self.subscribed: list[str] = []
        self.unsubscribed = 0
        self.asked: list[str] = []
        self.asked_any = asyncio.Event()

    async def subscribe(self, subject: str, cb: Any = None) -> Any:
        self.subscribed.append(subject)
        wire = self

        class Sub:
            async def unsubscribe(self) -> None:
                wire.unsubscribed += 1

        return Sub()

    async def request(self, subject: str, data: bytes, timeout: float) -> Any:
        self.asked.append(subject)
        self.asked_any.set()
        raise TimeoutError  # no snapshot: the feed asks again at the next gap


async def test_the_kv_feed_starts_with_a_prefix_router_and_stops_without_one() -> None:
    s = _settings()
    switches, _, _ = _switches(s)
    wire = FeedWire()
    await switches.follow_router()  # before start(): no connection, no feed
    switches._nc = cast(Any, wire)  # as start() leaves it
    await switches.follow_router()
    assert switches.kv is None and wire.subscribed == []

    switches.use_router("prefix_aware", {})  # starts the feed in a task of its own...
    await switches.follow_router()  # ...and this one, in line behind it, finds it started
    feed = switches.kv
    assert feed is not None and wire.subscribed == [s.subjects.kv_events_all]
    # The live worker is asked for its whole cache at once.
    await asyncio.wait_for(wire.asked_any.wait(), 5)
    assert wire.asked == [s.subjects.kv_snapshot("w0")]

    switches.use_router("least_loaded", {})
    await switches.follow_router()
    assert switches.kv is None and wire.unsubscribed == 1
    await asyncio.gather(*list(switches._tasks))
    assert len(wire.subscribed) == 1 and wire.unsubscribed == 1
