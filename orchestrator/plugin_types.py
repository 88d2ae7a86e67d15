"""The three kinds of decision plugin, as typed values. Pure.

- `Policy`: which held requests go next (`order`), plus everything the core
  reads about it: fairness, how many may go now, how far past the room it
  looks, its headroom, adaptive's mode switch, and a router of its own.
- `Router`: which worker runs a request (`route`), or None for the pool subject.
- `PdDecider`: unified or prefill-then-decode for a request (`role`).

Each is a frozen dataclass built by a factory from typed parameters
(`PluginSpec`); `orchestrator/plugins.py` is the one registry of them.
Plugins hold no state between calls: what they need from before a plan
(tenant counters, the prefix index, the round-robin position) is handed in
with the snapshot (`DecisionTables`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec

from cplane.orchestrator.fairness import FairParams
from cplane.orchestrator.fleet import FleetView, WorkerView
from cplane.orchestrator.route_context import RouteContext
from cplane.orchestrator.snapshot import Pending, PolicyContext
from cplane.schemas.messages import Role

Levels = tuple[tuple[Pending, ...], ...]  # held requests per priority level, oldest first
# (levels, k, ctx) -> up to k requests to take next, in order.
OrderFn = Callable[[Levels, int, PolicyContext], list[Pending]]
# (ordered, ctx) -> how many of them may go now, although there is room.
BudgetFn = Callable[[list[Pending], PolicyContext], int]
# (levels, ctx, since_ms) -> (mode, since_ms): adaptive's next mode.
NextModeFn = Callable[[Levels, PolicyContext, float], tuple[str, float]]
# (candidates, request, ctx) -> the worker, or None for the pool subject.
RouteFn = Callable[[Sequence[WorkerView], Pending, RouteContext], WorkerView | None]
# (model, prompt tokens, fleet) -> the role to dispatch to; None: no live pool serves it.
RoleFn = Callable[[str, int, FleetView], Role | None]

DEFAULT_LOOKAHEAD = 16  # held requests past the free room a plan looks at


class NoParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A plugin without parameters."""


@dataclass(frozen=True, slots=True)
class Router:
    name: str
    route: RouteFn
    reads_prefix: bool = False  # needs the requests' prompt block hashes

    def __call__(self, cands: Sequence[WorkerView], p: Pending, ctx: RouteContext
                 ) -> WorkerView | None:
        return self.route(cands, p, ctx)


@dataclass(frozen=True, slots=True)
class PdDecider:
    name: str
    role: RoleFn

    def __call__(self, model: str, prompt_tokens: int, fleet: FleetView) -> Role | None:
        return self.role(model, prompt_tokens, fleet)


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    order: OrderFn
    # Charged to tenants at dispatch (their fair order too, if `fair.fair`).
    fair: FairParams = field(default_factory=FairParams)
    budget: BudgetFn | None = None  # None: as many as there is room for
    lookahead: int = DEFAULT_LOOKAHEAD
    # Dispatch up to capacity * (1 + headroom); None = the orchestrator's setting.
    headroom: float | None = None
    # Adaptive: the headroom of each mode (overrides `headroom`) and the switch.
    headroom_of_mode: Callable[[str], float | None] | None = None
    next_mode: NextModeFn | None = None
    router: Router | None = None  # routes itself: replaces the configured router

    def __call__(self, levels: Levels, k: int, ctx: PolicyContext) -> list[Pending]:
        return self.order(levels, k, ctx)

    def headroom_in(self, mode: str, default: float) -> float:
        """The headroom this policy dispatches with in `mode` (adaptive's current choice)."""
        own = self.headroom_of_mode(mode) if self.headroom_of_mode is not None else self.headroom
        return default if own is None else float(own)


P = TypeVar("P", Policy, Router, PdDecider)


@dataclass(frozen=True, slots=True)
class PluginSpec(Generic[P]):
    """A plugin by name: its parameter type (unknown keys fail) and its factory."""

    name: str
    factory: Callable[[Any], P]
    params: type[msgspec.Struct] = NoParams

    @property
    def doc(self) -> str:
        lines = (self.factory.__doc__ or "").strip().splitlines()
        return lines[0] if lines else ""

    def accepts(self, key: str) -> bool:
        return key in self.params.__struct_fields__

    def build(self, params: Any) -> P:
        return self.factory(params)


__all__ = ["DEFAULT_LOOKAHEAD", "BudgetFn", "Levels", "NextModeFn", "NoParams", "OrderFn",
           "PdDecider", "PluginSpec", "Policy", "RoleFn", "RouteFn", "Router"]
