"""A held request as decisions see it (`Pending`), built once when it is held. Pure."""

from __future__ import annotations

from collections.abc import Callable

from cplane.orchestrator.pd_decision import estimate_prompt_tokens
from cplane.orchestrator.slo import resolve
from cplane.orchestrator.snapshot import Pending
from cplane.schemas.messages import Request, WorkItem
from cplane.schemas.settings import OrchestratorSettings

BlockHasher = Callable[[Request], tuple[int, ...]]


def pending_of(item: WorkItem, held_ms: float, o: OrchestratorSettings,
               blocks: BlockHasher | None = None, *, redispatched: bool = False) -> Pending:
    """`item` as decisions see it: its SLO class resolved, its prompt estimated and,
    for routers that read them, its prompt's block hashes (a cost per prompt byte)."""
    req = item.request
    slo = resolve(item.slo_class, o.slo_classes, o.default_slo_class,
                  ttft_ms=req.ttft_target_ms, tpot_ms=req.tpot_target_ms,
                  deadline_ms=req.slo_deadline_ms)
    arrival = item.enqueued_ms
    return Pending(
        request_id=req.request_id, level=item.priority.level, arrival_ms=arrival,
        held_ms=held_ms, model=req.model, prompt_tokens=estimate_prompt_tokens(req),
        deadline_ms=arrival + slo.deadline_ms if slo.deadline_ms else None,
        redispatched=redispatched, output_tokens=req.max_tokens, tenant=req.tenant or "",
        slo_class=slo.name, session=req.session_id or req.user_id or "",
        ttft_target_ms=slo.ttft_ms, tpot_target_ms=slo.tpot_ms, sheddable=slo.sheddable,
        cost_budget=req.cost_budget, block_hashes=blocks(req) if blocks is not None else (),
        parallelism=req.parallelism_hint)


__all__ = ["BlockHasher", "pending_of"]
