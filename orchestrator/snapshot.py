"""The frozen inputs of every decision: pending requests, the queue, routing state.

Policies, routers and the PD decider read these and nothing else (the fleet
as of its last heartbeats is `fleet.FleetView`), so the live orchestrator and
the fleet simulator (fleetsim/) hand the same shapes to the same functions.
The one mutable input, `DecisionTables`, is named as such and passed explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from cplane.orchestrator.fleet import FleetView
from cplane.orchestrator.placed_work import PlacedWork
from cplane.orchestrator.prefix_index import PrefixIndex
from cplane.orchestrator.route_index import RouteIndex

PoolKey = tuple[str, str]  # (role class: "unified" | "pd", model)


class Pending(msgspec.Struct, frozen=True):
    """One held request as decisions see it (a Struct: built once per request, on
    the hot path, five times cheaper than a frozen dataclass)."""

    request_id: str
    level: int  # 0 = critical ... 4 = background
    arrival_ms: float  # stored in LLM_REQ
    held_ms: float  # first held by this orchestrator (bounds the wait for a model)
    model: str  # "" = any model the fleet serves
    prompt_tokens: int  # estimate (exact for token ids)
    deadline_ms: float | None = None  # absolute end-to-end deadline, if the request set one
    redispatched: bool = False  # may have been dispatched before: goes out alone
    output_tokens: int = 0  # upper bound: max_tokens
    tenant: str = ""
    slo_class: str = "standard"
    session: str = ""  # affinity key (session or user id); "" = none
    parallelism: int = 0  # GPUs its engine must span (Request.parallelism_hint); 0 = any
    block_hashes: tuple[int, ...] = ()  # prefix blocks, when known
    # Its SLO class's targets (or its own, within bounds: see orchestrator/slo.py).
    ttft_target_ms: float = 1000.0
    tpot_target_ms: float = 100.0
    sheddable: bool = False  # shed at once when the target cannot be met
    cost_budget: float | None = None

    @property
    def ttft_deadline_ms(self) -> float:
        return self.arrival_ms + self.ttft_target_ms


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    levels: tuple[tuple[Pending, ...], ...]  # per level, oldest first (a bounded head)
    in_flight: Mapping[PoolKey, int]  # requests each pool holds now


@dataclass(slots=True)
class DecisionTables:
    """The decision core's live tables, kept between plans (orchestrator/core.py).

    Not a snapshot: the core updates them as requests are dispatched and
    finish, and hands them to every plan explicitly. Plugins read them and
    never write them (a plan's own routing goes into its RouteContext).
    """

    step: int = 0  # round-robin position
    # Items routed to each worker since its last heartbeat (which already counts
    # what it held then): load as of the heartbeat plus our own decisions since.
    sent_since: Mapping[str, int] = field(default_factory=dict)
    # ...and those of them (routed to it by us) that finished since: the heartbeat's
    # count is stale by them until the next one.
    done_since: Mapping[str, int] = field(default_factory=dict)
    # Tokens (prompt + output) routed to each worker, decaying (half-life an hour):
    # a work measure for routers that must not pile long requests on one worker.
    placed: PlacedWork = field(default_factory=PlacedWork)
    # Which prefix blocks each worker holds (prefix routers); None = no index.
    prefix: PrefixIndex | None = None
    # Tenant fairness: virtual work counters (orchestrator/fairness.py) and weights.
    tenant_work: Mapping[str, float] = field(default_factory=dict)
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    # Routers' candidates in load order, kept between plans; None = a fresh one per
    # plan (right, but each plan pays for the whole fleet).
    index: RouteIndex | None = None


@dataclass(frozen=True, slots=True)
class Measured:
    """What the core measured, as of this plan (orchestrator/decision_state.py)."""

    drain_per_s: float = 0.0
    prefill_tokens_per_s: float = 40_000.0
    mode: str = ""  # adaptive's current policy
    mode_since_ms: float = -1.0  # since when its switch condition holds
    # Prompt tokens dispatched whose prefill has (by estimate) not run yet.
    prefill_backlog_tokens: float = 0.0
    # Share of recently finished requests that missed their TTFT target.
    miss_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What a policy may read besides the queue: the fleet and the shell's measurements."""

    now_ms: float
    fleet: FleetView
    room: int  # free slots over all pools now
    in_flight: int = 0  # requests the fleet holds now (all pools)
    measured: Measured = field(default_factory=Measured)
    mode: str = ""  # adaptive: the policy this plan runs (measured.mode, or a switch)
    tables: DecisionTables = field(default_factory=DecisionTables)  # read only

    def backlog_ms(self, extra_tokens: float = 0.0) -> float:
        """How long the fleet needs to prefill what it was sent (plus `extra_tokens`)."""
        m = self.measured
        rate = max(1.0, m.prefill_tokens_per_s) * self.fleet.prefill_workers
        return (m.prefill_backlog_tokens + extra_tokens) / rate * 1000

    def wait_ms(self, position: int) -> float:
        """Estimated wait of the request at `position` in dispatch order (0 = first)."""
        behind = position - self.room + 1
        drain = self.measured.drain_per_s
        if behind <= 0 or drain <= 0:
            return 0.0
        return behind / drain * 1000

    def prefill_ms(self, p: Pending) -> float:
        return p.prompt_tokens / max(1.0, self.measured.prefill_tokens_per_s) * 1000
