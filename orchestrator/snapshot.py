"""The frozen inputs of every decision: pending requests, the queue, routing state.

Policies, routers and the PD decider read these and nothing else (the fleet
as of its last heartbeats is `fleet.FleetView`), so the live orchestrator and
the fleet simulator (fleetsim/) hand the same shapes to the same functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.ledger import PoolKey


@dataclass(frozen=True, slots=True)
class Pending:
    """One held request as decisions see it."""

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
    block_hashes: tuple[int, ...] = ()  # prefix blocks, when known


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    levels: tuple[tuple[Pending, ...], ...]  # per level, oldest first (a bounded head)
    in_flight: Mapping[PoolKey, int]  # requests each pool holds now


@dataclass(frozen=True, slots=True)
class RouteState:
    """What routers need from before this plan; the shell keeps it between plans."""

    step: int = 0  # round-robin position
    # Items routed to each worker since its last heartbeat (which already counts
    # what it held then): load as of the heartbeat plus our own decisions since.
    sent_since: Mapping[str, int] = field(default_factory=dict)
