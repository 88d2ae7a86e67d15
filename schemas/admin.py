"""Wire types of the admin subjects (request/reply on `<prefix>.admin.<verb>`).

`<prefix>.admin.policy` takes one `PolicyCommand`, `<prefix>.admin.router`
one `RouterCommand` (each tagged by `op`), and both answer one `AdminReply`:

    {"op": "get"}
    {"op": "set", "name": "fifo", "params": {}, "by": "ops@host"}

The chosen policy is stored as a `PolicyState` (JSON) under the key
`policy` of the KV bucket `<prefix>_config`, the chosen router as a
`RouterState` under the key `router`; every orchestrator replica watches
both keys and follows them (orchestrator/runtime_config.py).
"""

from __future__ import annotations

from typing import Any

import msgspec

from cplane.schemas.messages import Base


class SwitchSet(Base, frozen=True, kw_only=True, tag_field="op"):
    """The `set` of a runtime switch (PolicySet, RouterSet): plugin `name` with `params`."""

    name: str
    params: dict[str, Any] = {}
    by: str = ""  # who asks (shown by `get`); "" = the answering replica's id


class SwitchState(Base, frozen=True, kw_only=True):
    """What a runtime switch stores (PolicyState, RouterState)."""

    name: str
    params: dict[str, Any] = {}
    updated_ms: float = 0.0  # when it was stored; 0 = nothing stored, the settings' choice
    by: str = ""  # who set it ("settings" when nothing is stored)


class PolicyGet(Base, frozen=True, kw_only=True, tag="get", tag_field="op"):
    """Ask for the policy in force."""


class PolicySet(SwitchSet, frozen=True, kw_only=True, tag="set"):
    """Switch every replica to the policy plugin `name` with `params`."""


PolicyCommand = PolicyGet | PolicySet


class PolicyState(SwitchState, frozen=True, kw_only=True):
    """The policy choice of the whole fleet, as stored in the config bucket."""


class RouterGet(Base, frozen=True, kw_only=True, tag="get", tag_field="op"):
    """Ask for the router choice, and the router in force."""


class RouterSet(SwitchSet, frozen=True, kw_only=True, tag="set"):
    """Switch every replica to the router plugin `name` with `params` (a policy that
    brings its own router, cost_optimized, keeps routing with it)."""


RouterCommand = RouterGet | RouterSet


class RouterState(SwitchState, frozen=True, kw_only=True):
    """The router choice of the whole fleet, as stored in the config bucket."""


class AdminReply(Base, frozen=True, kw_only=True):
    """The answer to one admin command."""

    ok: bool
    error: str = ""  # why it was refused (one line)
    state: PolicyState | None = None  # the policy in force (after a successful set)
    choices: list[str] = []  # on refusal: the valid names (policies, or routers)
    param_choices: list[str] = []  # on refusal of a known plugin: its parameter names
    # The router in force: the policy's own (cost_optimized), else the one set by
    # `cplane router set`, else the configured one.
    router: str = ""
    router_state: RouterState | None = None  # the router choice (`admin.router` answers)


BREAKERS_VERB = "breakers"  # `<prefix>.admin.breakers`: the leader's, a list of BreakerInfo


class BreakerInfo(Base, frozen=True, kw_only=True):
    """One worker's circuit breaker, as the leading orchestrator holds it
    (`<prefix>.admin.breakers` answers a list of these)."""

    worker_id: str
    state: str  # closed | open | half_open
    reason: str = ""  # why it opened


policy_command_decoder = msgspec.json.Decoder(PolicyCommand)
policy_state_decoder = msgspec.json.Decoder(PolicyState)
router_command_decoder = msgspec.json.Decoder(RouterCommand)
router_state_decoder = msgspec.json.Decoder(RouterState)
admin_reply_decoder = msgspec.json.Decoder(AdminReply)
breakers_decoder = msgspec.json.Decoder(list[BreakerInfo])

ADMIN_TYPES: dict[str, type[Any]] = {
    "PolicyGet": PolicyGet,
    "PolicySet": PolicySet,
    "PolicyState": PolicyState,
    "RouterGet": RouterGet,
    "RouterSet": RouterSet,
    "RouterState": RouterState,
    "AdminReply": AdminReply,
    "BreakerInfo": BreakerInfo,
}

__all__ = [
    "ADMIN_TYPES",
    "BREAKERS_VERB",
    "AdminReply",
    "BreakerInfo",
    "PolicyCommand",
    "PolicyGet",
    "PolicySet",
    "PolicyState",
    "RouterCommand",
    "RouterGet",
    "RouterSet",
    "RouterState",
    "SwitchSet",
    "SwitchState",
    "admin_reply_decoder",
    "breakers_decoder",
    "policy_command_decoder",
    "policy_state_decoder",
    "router_command_decoder",
    "router_state_decoder",
]
