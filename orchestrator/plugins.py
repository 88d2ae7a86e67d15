"""The one registry of decision plugins: a name -> typed factory, per kind.

Kinds: `policy` (which held request next: `Policy`), `router` (which worker:
`Router`), `pd` (unified or prefill-then-decode: `PdDecider`). A factory
takes its parameters as one `msgspec.Struct` (frozen, unknown fields
forbidden), so configuration that names a plugin with a typo fails at start
and names the key:

    [orchestrator]
    router = "least_loaded"
    [orchestrator.router_params]
    ...

The plugin modules only declare their specs; this module imports them (the
dependency points one way).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgspec

from cplane.orchestrator.adaptive_policy import ADAPTIVE_POLICIES
from cplane.orchestrator.cost_policy import COST_POLICIES
from cplane.orchestrator.pd_decision import PD_DECIDERS
from cplane.orchestrator.plugin_types import P, PdDecider, PluginSpec, Policy, Router
from cplane.orchestrator.policy import POLICIES
from cplane.orchestrator.prefix_router import PREFIX_ROUTERS
from cplane.orchestrator.routers import ROUTERS
from cplane.orchestrator.slo_policy import SLO_POLICIES

Kind = Literal["policy", "router", "pd"]
KINDS: tuple[Kind, ...] = ("policy", "router", "pd")


def _table(*groups: Iterable[PluginSpec[P]]) -> dict[str, PluginSpec[P]]:
    table: dict[str, PluginSpec[P]] = {}
    for group in groups:
        for s in group:
            if s.name in table:
                raise ValueError(f"plugin {s.name!r} declared twice")
            table[s.name] = s
    return table


POLICY_SPECS: dict[str, PluginSpec[Policy]] = _table(POLICIES, SLO_POLICIES, COST_POLICIES,
                                                      ADAPTIVE_POLICIES)
ROUTER_SPECS: dict[str, PluginSpec[Router]] = _table(ROUTERS, PREFIX_ROUTERS)
PD_SPECS: dict[str, PluginSpec[PdDecider]] = _table(PD_DECIDERS)
_BY_KIND: dict[str, Mapping[str, PluginSpec[Any]]] = {
    "policy": POLICY_SPECS, "router": ROUTER_SPECS, "pd": PD_SPECS}


def spec(kind: str, name: str) -> PluginSpec[Any]:
    """The spec of plugin `name` of `kind`; ValueError naming the choices."""
    table = _BY_KIND.get(kind)
    if table is None:
        raise ValueError(f"unknown plugin kind {kind!r}; one of {KINDS}")
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {names(kind)}") from None


def names(kind: str) -> list[str]:
    return sorted(_BY_KIND.get(kind, {}))


def _build(kind: Kind, table: Mapping[str, PluginSpec[P]], name: str,
           params: Mapping[str, Any] | None) -> P:
    s = table.get(name)
    if s is None:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(table)}")
    try:
        typed = msgspec.convert(dict(params or {}), type=s.params)
    except msgspec.ValidationError as e:
        raise ValueError(f"{kind} {name!r}: bad parameters: {e}") from None
    return s.build(typed)


def build_policy(name: str, params: Mapping[str, Any] | None = None) -> Policy:
    return _build("policy", POLICY_SPECS, name, params)


def build_router(name: str, params: Mapping[str, Any] | None = None) -> Router:
    return _build("router", ROUTER_SPECS, name, params)


def build_pd(name: str, params: Mapping[str, Any] | None = None) -> PdDecider:
    return _build("pd", PD_SPECS, name, params)


__all__ = ["KINDS", "PD_SPECS", "POLICY_SPECS", "ROUTER_SPECS", "Kind", "build_pd",
           "build_policy", "build_router", "names", "spec"]
