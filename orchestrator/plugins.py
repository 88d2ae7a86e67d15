"""One registry of decision plugins: a (kind, name) -> factory with typed parameters.

Kinds: `policy` (which held request next), `router` (which worker), `pd`
(unified or prefill-then-decode). A factory takes its parameters as one
`msgspec.Struct` (frozen, unknown fields forbidden) and returns the plugin, a
pure function. Configuration names a plugin and gives a table of parameters;
`build` validates them, so a typo fails at start and names the key:

    [orchestrator]
    router = "least_loaded"
    [orchestrator.router_params]
    ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

KINDS = ("policy", "router", "pd")
F = TypeVar("F", bound=Callable[..., Any])


class NoParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A plugin without parameters."""


@dataclass(frozen=True, slots=True)
class PluginSpec:
    kind: str
    name: str
    params: type[msgspec.Struct]
    factory: Callable[[Any], Any]
    doc: str

    def accepts(self, key: str) -> bool:
        return key in self.params.__struct_fields__


_REGISTRY: dict[tuple[str, str], PluginSpec] = {}


def register(kind: str, name: str, params: type[msgspec.Struct] = NoParams
             ) -> Callable[[F], F]:
    """Decorate a factory `f(params) -> plugin` to make it buildable by name."""
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; one of {KINDS}")

    def deco(factory: F) -> F:
        if (kind, name) in _REGISTRY:
            raise ValueError(f"{kind} plugin {name!r} registered twice")
        doc = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[(kind, name)] = PluginSpec(kind, name, params, factory, doc[0] if doc else "")
        return factory

    return deco


def _load_builtins() -> None:
    # The modules register themselves on import; imported here so that asking
    # the registry by name never depends on who imported what first.
    from orchestrator import (  # noqa: F401
        adaptive_policy,
        cost_policy,
        pd_decision,
        policy,
        prefix_router,
        routers,
        slo_policy,
    )


def spec(kind: str, name: str) -> PluginSpec:
    _load_builtins()
    try:
        return _REGISTRY[(kind, name)]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {names(kind)}") from None


def names(kind: str) -> list[str]:
    _load_builtins()
    return sorted(n for k, n in _REGISTRY if k == kind)


def build(kind: str, name: str, params: Mapping[str, Any] | None = None) -> Any:
    """The plugin `name` of `kind`, with `params` checked against its parameter type."""
    s = spec(kind, name)
    try:
        typed = msgspec.convert(dict(params or {}), type=s.params)
    except msgspec.ValidationError as e:
        raise ValueError(f"{kind} {name!r}: bad parameters: {e}") from None
    return s.factory(typed)


__all__ = ["KINDS", "NoParams", "PluginSpec", "build", "names", "register", "spec"]
