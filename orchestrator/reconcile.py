"""Housekeeping over the ledger that needs the store: missed terminals, keep-alives."""

from __future__ import annotations

import contextlib

from nats.js import JetStreamContext

from cplane.bus.replay import stored_terminal
from cplane.orchestrator.core import DecisionCore
from cplane.orchestrator.ledger import RequestState
from cplane.schemas.messages import Final, WorkItem
from cplane.schemas.settings import Settings


async def reconcile_missed(core: DecisionCore[WorkItem], js: JetStreamContext,
                           settings: Settings, now_ms: float, limit: int = 64) -> int:
    """Free the slots of dispatched requests whose terminal signal was missed (a
    reconnect): those unheard of for `reconcile_after_s` are looked up in LLM_DONE.
    Returns how many were found finished."""
    after = settings.orchestrator.reconcile_after_s * 1000
    due = [e for e in core.ledger.entries(RequestState.DISPATCHED)
           if now_ms - max(e.dispatched_ms, e.checked_ms) > after][:limit]
    found = 0
    for e in due:
        e.checked_ms = now_ms
        try:
            term = await stored_terminal(js, settings, e.item.request.group, e.request_id)
        except Exception:
            break
        if term is not None and e.state is RequestState.DISPATCHED:
            found += 1
            ttft = (term.timings.ttft_ms if isinstance(term, Final)
                    and term.usage.completion_tokens else -1.0)
            core.terminal(e.request_id, now_ms, ttft)
    return found


async def keep_held_alive(core: DecisionCore[WorkItem]) -> None:
    """in_progress() for every request message held or being dispatched."""
    for e in list(core.ledger.entries()):
        if e.state in (RequestState.HELD, RequestState.DISPATCHING):
            for m in (e.msg, *e.extra_msgs):
                with contextlib.suppress(Exception):
                    await m.in_progress()
