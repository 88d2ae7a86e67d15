"""Wire types of the admin subjects (request/reply on `<prefix>.admin.<verb>`).

`<prefix>.admin.policy` takes one `PolicyCommand` (tagged by `op`) and
answers one `AdminReply`:

    {"op": "get"}
    {"op": "set", "name": "fifo", "params": {}, "by": "ops@host"}

The chosen policy is stored as a `PolicyState` (JSON) under the key
`policy` of the KV bucket `<prefix>_config`; every orchestrator replica
watches that key and follows it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from cplane.schemas.messages import Base


class PolicyGet(Base, frozen=True, kw_only=True, tag="get", tag_field="op"):
    """Ask for the policy in force."""


class PolicySet(Base, frozen=True, kw_only=True, tag="set", tag_field="op"):
    """Switch every replica to the policy plugin `name` with `params`."""

    name: str
    params: dict[str, Any] = {}
    by: str = ""  # who asks (shown by `get`); "" = the answering replica's id


PolicyCommand = PolicyGet | PolicySet


class PolicyState(Base, frozen=True, kw_only=True):
    """The policy choice of the whole fleet, as stored in the config bucket."""

    name: str
    params: dict[str, Any] = {}
    updated_ms: float = 0.0  # when it was stored; 0 = nothing stored, the settings' choice
    by: str = ""  # who set it ("settings" when nothing is stored)


class AdminReply(Base, frozen=True, kw_only=True):
    """The answer to one admin command."""

    ok: bool
    error: str = ""  # why it was refused (one line)
    state: PolicyState | None = None  # the policy in force (after a successful set)
    choices: list[str] = []  # on refusal: the valid policy names
    param_choices: list[str] = []  # on refusal of a known policy: its parameter names
    # The router the policy in force runs with: its own (cost_optimized), else the
    # configured one.
    router: str = ""


BREAKERS_VERB = "breakers"  # `<prefix>.admin.breakers`: the leader's, a list of BreakerInfo


class BreakerInfo(Base, frozen=True, kw_only=True):
    """One worker's circuit breaker, as the leading orchestrator holds it
    (`<prefix>.admin.breakers` answers a list of these)."""

    worker_id: str
    state: str  # closed | open | half_open
    reason: str = ""  # why it opened


policy_command_decoder = msgspec.json.Decoder(PolicyCommand)
policy_state_decoder = msgspec.json.Decoder(PolicyState)
admin_reply_decoder = msgspec.json.Decoder(AdminReply)
breakers_decoder = msgspec.json.Decoder(list[BreakerInfo])

ADMIN_TYPES: dict[str, type[Any]] = {
    "PolicyGet": PolicyGet,
    "PolicySet": PolicySet,
    "PolicyState": PolicyState,
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
    "admin_reply_decoder",
    "breakers_decoder",
    "policy_command_decoder",
    "policy_state_decoder",
]
