"""The dispatch decision on one page: which held requests go where, now. Pure.

`plan_dispatch` reads a frozen `QueueSnapshot` (the heads of the held
queues, and what each pool has in flight), a `FleetView` and a `RouteState`,
and returns a `DispatchPlan`. The policy orders, the PD decider picks the
role, the router picks the worker (or the pool subject): three plugins
chosen by name (orchestrator/plugins.py). It never mutates anything and
never performs I/O: the orchestrator's shell applies the plan (publish each
batch, then ack its requests; publish each rejection, then ack), and the
fleet simulator runs the very same function in virtual time.

Capacity is per pool (role class x model): a pool may hold up to
`capacity * (1 + headroom)` requests; a request whose pool is full waits
without blocking requests of other pools behind it. A request for a model
no live worker serves waits up to `model_wait_ms` (or its deadline), then
is rejected with the retryable `model_unavailable`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from cplane.orchestrator import plugins
from cplane.orchestrator.fleet import POOL_PD, POOL_UNIFIED, FleetView
from cplane.orchestrator.plugin_types import PdDecider, Policy, Router
from cplane.orchestrator.route_context import RouteContext
from cplane.orchestrator.routers import least_loaded
from cplane.orchestrator.snapshot import (
    DecisionTables,
    Measured,
    Pending,
    PolicyContext,
    PoolKey,
    QueueSnapshot,
)
from cplane.schemas.messages import ErrorCode, Role
from cplane.schemas.settings import OrchestratorSettings
from cplane.schemas.subjects import ANY_TARGET, MODEL_TARGET_PREFIX, model_target


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    policy: Policy  # which held requests next
    pd: PdDecider  # unified or prefill-then-decode
    router: Router  # which worker (unless the policy brings its own)
    headroom: float = 0.25  # a pool takes capacity * (1 + headroom) requests
    max_batch: int = 16  # work items per message at most
    model_wait_ms: float = 30_000.0

    @classmethod
    def named(cls, *, policy: str = "priority", router: str = "pool", pd: str = "auto",
              policy_params: Mapping[str, Any] | None = None,
              router_params: Mapping[str, Any] | None = None,
              pd_params: Mapping[str, Any] | None = None, **kw: Any) -> DispatchConfig:
        """Plugins by registry name (unknown names and parameters fail here)."""
        return cls(policy=plugins.build_policy(policy, policy_params),
                   pd=plugins.build_pd(pd, pd_params),
                   router=plugins.build_router(router, router_params), **kw)

    @property
    def router_in_use(self) -> Router:
        """The policy's own router (cost_optimized) wins over the configured one."""
        return self.policy.router or self.router


def headroom(cfg: DispatchConfig, mode: str = "") -> float:
    """The policy's own headroom if it sets one (slo_aware: 0, so that requests
    wait here in deadline order, not in a worker's FIFO), else the configured.
    `mode`: adaptive's current choice (its headroom follows it)."""
    return cfg.policy.headroom_in(mode, cfg.headroom)


def dispatch_config(o: OrchestratorSettings) -> DispatchConfig:
    """The decision configuration an orchestrator's settings name."""
    policy_params = dict(o.policy_params)
    if plugins.spec("policy", o.policy).accepts("aging_s"):
        policy_params.setdefault("aging_s", o.aging_s)
    pd_params = ({"min_prompt_tokens": o.pd_min_prompt_tokens}
                 if o.pd_mode in ("auto", "adaptive") else {})
    return DispatchConfig.named(
        policy=o.policy, policy_params=policy_params, router=o.router,
        router_params=o.router_params, pd=o.pd_mode, pd_params=pd_params,
        headroom=o.headroom, max_batch=o.max_batch, model_wait_ms=o.model_wait_s * 1000)


class Batch(msgspec.Struct, frozen=True, gc=False):
    """Publish as one WorkBatch on `llm.work.<role>.<target>`; ack its requests after the store.
    (A Struct, not a dataclass: over a large fleet a plan makes one per request.)"""

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
    retry_after_ms: float | None = None


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    batches: tuple[Batch, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    # A held request in neither stays held where it is: nothing is popped and put back.
    sent: Mapping[str, int] = field(default_factory=dict)  # worker id -> items routed to it
    route_steps: int = 0  # round-robin steps taken: add to DecisionTables.step
    mode: str = ""  # adaptive: the policy it runs from now on
    mode_since_ms: float = -1.0

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


def _expired(p: Pending, now_ms: float, cfg: DispatchConfig) -> bool:
    return now_ms - p.held_ms >= cfg.model_wait_ms or (
        p.deadline_ms is not None and now_ms >= p.deadline_ms)


def _unavailable(p: Pending, fleet: FleetView, model: str | None, role: Role | None,
                 now_ms: float) -> Rejection:
    """Nobody live could take it for `model_wait_ms`: no worker serves its model, or
    none of them runs an engine of the size its parallelism hint asks."""
    waited = f"waited {(now_ms - p.held_ms) / 1000:.1f} s"
    if model is None or role is None:
        why = (f"no live worker serves model {p.model!r} ({waited}); served now: "
               f"{sorted(fleet.models)}")
    else:
        why = (f"no live {role.value} worker of model {model!r} runs an engine of "
               f"{p.parallelism} GPUs (parallelism_hint; {waited}); engine sizes served "
               f"now: {fleet.layouts(role, model)}")
    return Rejection(p.request_id, ErrorCode.MODEL_UNAVAILABLE, why, True)


def _admission(p: Pending, position: int, ctx: PolicyContext, fleet: FleetView,
               role: Role, model: str) -> Rejection | None:
    """Refuse now what cannot be served as asked: over budget, or (sheddable) too late."""
    if p.cost_budget is not None:
        cheapest = min((w.cost(p.prompt_tokens, p.output_tokens)
                        for w in fleet.of_role(role, model)), default=0.0)
        if cheapest > p.cost_budget:
            return Rejection(p.request_id, ErrorCode.OVER_BUDGET,
                             f"the cheapest worker serving {model!r} charges {cheapest:.6g} "
                             f"for this request; its cost_budget is {p.cost_budget:.6g}", False)
    if p.sheddable:
        wait = ctx.wait_ms(position)
        if ctx.now_ms + wait + ctx.prefill_ms(p) > p.ttft_deadline_ms:
            return Rejection(p.request_id, ErrorCode.OVERLOADED,
                             f"cannot start within its TTFT target ({p.ttft_target_ms:.0f} ms; "
                             f"estimated wait {wait:.0f} ms)", True, max(wait, 100.0))
    return None


def _place(router: Router, fleet: FleetView, role: Role, model: str, p: Pending,
           rctx: RouteContext) -> str:
    """The work subject's target for one request: a worker, or a pool (never for a
    request with a parallelism hint: only workers of its layout may take it)."""
    cands = (fleet.of_layout(role, model, p.parallelism) if p.parallelism
             else fleet.of_role(role, model))
    worker = None
    if fleet.probes:  # a half-open breaker's one probe goes first
        ids = rctx.index.memo("ids", cands, lambda: {w.worker_id: w for w in cands})
        worker = next((ids[wid] for wid in sorted(fleet.probes)
                       if wid in ids and not rctx.sent.get(wid)), None)
        if worker is None:
            cands = rctx.index.memo(("unprobed", fleet.probes), cands, lambda: tuple(
                w for w in cands if w.worker_id not in fleet.probes))
    if worker is None and cands:
        worker = router.route(cands, p, rctx)
    if worker is None and cands and (p.parallelism or role in fleet.fenced_roles):
        # A pool subject reaches every layout, and a worker whose breaker is not
        # closed pulls from it too: address a healthy one of the layout instead.
        worker = least_loaded(cands, rctx)
    if worker is not None:
        rctx.routed(worker, p)
        return worker.worker_id
    if fleet.whole_pool_serves(role, model):
        return ANY_TARGET
    return model_target(model)


def plan_dispatch(queue: QueueSnapshot, fleet: FleetView, cfg: DispatchConfig, *,
                  now_ms: float, tables: DecisionTables | None = None,
                  rng: random.Random | None = None, measured: Measured | None = None
                  ) -> DispatchPlan:
    """What to publish where and what to reject now; everything else stays held."""
    tables = tables or DecisionTables()
    rctx = RouteContext(tables, rng or random.Random(0))
    m = measured or Measured()
    policy = cfg.policy
    free = free_slots(fleet, queue.in_flight, headroom(cfg, m.mode))
    room = sum(max(0, f) for f in free.values())
    ctx = PolicyContext(now_ms, fleet, room, sum(queue.in_flight.values()), m, m.mode, tables)
    mode, since = m.mode, m.mode_since_ms
    if policy.next_mode is not None:
        mode, since = policy.next_mode(queue.levels, ctx, since)
        ctx = dataclasses.replace(ctx, mode=mode)
    router = cfg.router_in_use
    # Look past the room: requests that cannot run (full pool, absent model)
    # must not hide the ones behind them, absent models time out, and
    # admission sees who would wait too long.
    k = room + policy.lookahead
    groups: dict[tuple[Role, str, PoolKey, str], list[str]] = {}
    alone: list[Batch] = []
    rejections: list[Rejection] = []
    ordered = policy.order(queue.levels, k, ctx)
    # A policy may hold requests back although there is room (slo_aware keeps
    # the engines' prefill queues short): only the first `limit` may go now.
    limit = policy.budget(ordered, ctx) if policy.budget is not None else len(ordered)
    for position, p in enumerate(ordered):
        model = _resolve_model(p, fleet, free)
        role = None if model is None else cfg.pd.role(model, p.prompt_tokens, fleet)
        if model is None or role is None or (
                p.parallelism and not fleet.of_layout(role, model, p.parallelism)):
            if _expired(p, now_ms, cfg):
                rejections.append(_unavailable(p, fleet, model, role, now_ms))
            continue
        pool = (POOL_PD if role is Role.PREFILL else POOL_UNIFIED, model)
        blocked = free.get(pool, 0) <= 0 or position >= limit
        refused = _admission(p, position if blocked else 0, ctx, fleet, role, model)
        if refused is not None:
            rejections.append(refused)
            continue
        if blocked:
            continue
        free[pool] -= 1
        target = _place(router, fleet, role, model, p, rctx)
        if p.redispatched:
            alone.append(Batch(role, target, pool, model, (p.request_id,)))
        else:
            groups.setdefault((role, target, pool, model), []).append(p.request_id)
    batches = list(alone)
    for (role, target, pool, model), ids in groups.items():
        if len(ids) == 1:  # routed one by one over a large fleet: the common case there
            batches.append(Batch(role, target, pool, model, (ids[0],)))
            continue
        size = max(1, min(cfg.max_batch, fleet.max_capacity(role, model)))
        if target == ANY_TARGET or target.startswith(MODEL_TARGET_PREFIX):
            # A pool message goes whole to one worker: a burst cut into
            # max_batch pieces would land on one or two workers while the
            # rest idle. At least one message per worker, then max_batch.
            n_workers = len(fleet.of_role(role, model))
            size = min(size, max(1, -(-len(ids) // max(1, n_workers))))
        batches.extend(Batch(role, target, pool, model, tuple(ids[i:i + size]))
                       for i in range(0, len(ids), size))
    return DispatchPlan(tuple(batches), tuple(rejections), rctx.sent, rctx.steps, mode, since)


def batch_msg_id(batch: Batch, requests: Iterable[tuple[str, int]]) -> str:
    """Deterministic per content and request message: a retried or repeated publish of
    the same batch is one, while an id published again (a new LLM_REQ message, its
    own stream sequence) is never swallowed as a repeat of its first run's batch."""
    h = hashlib.blake2b(digest_size=12)
    h.update(batch.role.value.encode())
    for rid, seq in requests:  # (request id, its LLM_REQ stream sequence)
        h.update(b"\0" + rid.encode() + b"\0" + str(seq).encode())
    return f"w:{h.hexdigest()}"


__all__ = ["Batch", "DispatchConfig", "DispatchPlan", "Pending", "QueueSnapshot", "Rejection",
           "batch_msg_id", "free_slots", "headroom", "plan_dispatch"]
