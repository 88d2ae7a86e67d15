"""The dispatch decision on one page: which held requests go where, now. Pure.

`plan_dispatch` reads a frozen `QueueSnapshot` (the heads of the held
queues, and what each pool has in flight) and a `FleetView`, and returns a
`DispatchPlan`. It never mutates anything and never performs I/O: the
orchestrator's shell applies the plan (publish each batch, then ack its
requests; publish each rejection, then ack), and the fleet simulator can run
the very same function in virtual time.

Capacity is per pool (role class x model): a pool may hold up to
`capacity * (1 + headroom)` requests; a request whose pool is full waits
without blocking requests of other pools behind it. A request for a model
no live worker serves waits up to `model_wait_ms` (or its deadline), then
is rejected with the retryable `model_unavailable`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.fleet import POOL_PD, POOL_UNIFIED, FleetView
from orchestrator.ledger import PoolKey
from orchestrator.pd_decision import PdConfig, choose_role
from orchestrator.policy import Policy, PolicyConfig, QueueView
from schemas.messages import ErrorCode, Role
from schemas.subjects import ANY_TARGET, model_target


@dataclass(frozen=True, slots=True)
class Pending:
    """One held request as decisions see it."""

    request_id: str
    level: int  # 0 = critical ... 4 = background
    arrival_ms: float  # stored in LLM_REQ
    held_ms: float  # first held by this orchestrator (bounds the wait for a model)
    model: str  # "" = any model the fleet serves
    prompt_tokens: int  # estimate, for the PD decision
    deadline_ms: float | None = None  # absolute end-to-end deadline, if the request set one
    redispatched: bool = False  # may have been dispatched before: goes out alone


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    levels: tuple[tuple[Pending, ...], ...]  # per level, oldest first (a bounded head)
    in_flight: Mapping[PoolKey, int]  # requests each pool holds now


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    policy: Policy
    policy_cfg: PolicyConfig
    pd: PdConfig
    headroom: float = 0.25  # a pool takes capacity * (1 + headroom) requests
    max_batch: int = 16  # work items per message at most
    model_wait_ms: float = 30_000.0


@dataclass(frozen=True, slots=True)
class Batch:
    """Publish as one WorkBatch on `llm.work.<role>.<target>`; ack its requests after the store."""

    role: Role  # the subject's role: unified or prefill (a PD request starts at prefill)
    target: str  # `any`, a model's pool (`m-...`) or a worker id
    pool: PoolKey  # whose capacity these requests use until their terminal
    model: str  # the model they run on ("" never: resolved from the fleet)
    request_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Publish an ErrorReply for the request, then ack its message."""

    request_id: str
    code: ErrorCode
    message: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    batches: tuple[Batch, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    # A held request in neither stays held where it is: nothing is popped and put back.

    @property
    def dispatched(self) -> int:
        return sum(len(b.request_ids) for b in self.batches)


def free_slots(fleet: FleetView, in_flight: Mapping[PoolKey, int], headroom: float
               ) -> dict[PoolKey, int]:
    """Room per pool of every model the fleet serves."""
    free: dict[PoolKey, int] = {}
    for model in fleet.models:
        for kind in (POOL_UNIFIED, POOL_PD):
            cap = fleet.pool_capacity((kind, model))
            if cap > 0:
                pool = (kind, model)
                free[pool] = int(cap * (1 + headroom)) - in_flight.get(pool, 0)
    return free


def _resolve_model(p: Pending, fleet: FleetView, free: Mapping[PoolKey, int]) -> str | None:
    if p.model:
        return p.model if p.model in fleet.models else None
    if not fleet.models:
        return None
    # "any model": the one with the most room, ties to the name (runs replay).
    return max(sorted(fleet.models), key=lambda m: free.get((POOL_UNIFIED, m), 0)
               + free.get((POOL_PD, m), 0))


def _ordered(queue: QueueSnapshot, k: int, cfg: DispatchConfig, now_ms: float) -> list[Pending]:
    view = QueueView(tuple([p.arrival_ms for p in level] for level in queue.levels))
    heads = [0] * len(queue.levels)
    out = []
    for level in cfg.policy(view, k, now_ms, cfg.policy_cfg):
        out.append(queue.levels[level][heads[level]])
        heads[level] += 1
    return out


def _expired(p: Pending, now_ms: float, cfg: DispatchConfig) -> bool:
    return now_ms - p.held_ms >= cfg.model_wait_ms or (
        p.deadline_ms is not None and now_ms >= p.deadline_ms)


def plan_dispatch(queue: QueueSnapshot, fleet: FleetView, cfg: DispatchConfig, *,
                  now_ms: float) -> DispatchPlan:
    """What to publish where and what to reject now; everything else stays held."""
    free = free_slots(fleet, queue.in_flight, cfg.headroom)
    room = sum(max(0, f) for f in free.values())
    # Look a little past the room: requests that cannot run (full pool, absent
    # model) must not hide the ones behind them, and absent models time out.
    k = room + 16
    groups: dict[tuple[Role, str, PoolKey, str], list[str]] = {}
    alone: list[Batch] = []
    rejections: list[Rejection] = []
    for p in _ordered(queue, k, cfg, now_ms):
        model = _resolve_model(p, fleet, free)
        role = None if model is None else choose_role(model, p.prompt_tokens, fleet, cfg.pd)
        if model is None or role is None:
            if _expired(p, now_ms, cfg):
                served = sorted(fleet.models)
                rejections.append(Rejection(
                    p.request_id, ErrorCode.MODEL_UNAVAILABLE,
                    f"no live worker serves model {p.model!r} (waited "
                    f"{(now_ms - p.held_ms) / 1000:.1f} s); served now: {served}", True))
            continue
        pool = (POOL_PD if role is Role.PREFILL else POOL_UNIFIED, model)
        if free.get(pool, 0) <= 0:
            continue
        free[pool] -= 1
        target = ANY_TARGET if fleet.whole_pool_serves(role, model) else model_target(model)
        if p.redispatched:
            alone.append(Batch(role, target, pool, model, (p.request_id,)))
        else:
            groups.setdefault((role, target, pool, model), []).append(p.request_id)
    batches = list(alone)
    for (role, target, pool, model), ids in groups.items():
        biggest = max((w.capacity for w in fleet.of_role(role, model)), default=1)
        size = max(1, min(cfg.max_batch, biggest))
        batches.extend(Batch(role, target, pool, model, tuple(ids[i:i + size]))
                       for i in range(0, len(ids), size))
    return DispatchPlan(tuple(batches), tuple(rejections))
