"""Turning a request message into a WorkItem, or a clear rejection. Pure."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from schemas.codec import request_decoder, sniff_request_id
from schemas.messages import PRIORITIES, ErrorCode, Priority, Request, WorkItem
from schemas.subjects import INTERACTIVE_GROUP, INVALID_GROUP, valid_token

_PRIORITY_BY_NAME = {p.value: p for p in PRIORITIES}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request cannot run; published as an ErrorReply on `llm.done.<group>.<id>`."""

    request_id: str
    group: str
    code: ErrorCode
    message: str


def _valid_subject(subject: str) -> bool:
    return all(valid_token(t) for t in subject.split("."))


def _problem(req: Request) -> str | None:
    forms = sum(x is not None for x in (req.prompt, req.prompt_token_ids, req.messages))
    if forms != 1:
        return "give exactly one of prompt, prompt_token_ids or messages"
    if (req.prompt is not None and not req.prompt) or (
        req.prompt_token_ids is not None and not req.prompt_token_ids
    ) or (req.messages is not None and not req.messages):
        return "the prompt is empty"
    if req.max_tokens < 1:
        return "max_tokens must be at least 1"
    if req.temperature < 0:
        return "temperature must be >= 0"
    if not 0 < req.top_p <= 1:
        return "top_p must be in (0, 1]"
    if req.parallelism_hint < 1:
        return "parallelism_hint must be at least 1"
    if not valid_token(req.group):
        return f"group {req.group!r} is not a valid subject token"
    if req.reply_to is not None and not _valid_subject(req.reply_to):
        return f"reply_to {req.reply_to!r} is not a publishable subject"
    return None


def admit(
    data: bytes, subject_priority: str, subject_slo: str, stored_ms: float, now_ms: float,
    orchestrator_id: str = "",
) -> WorkItem | Rejection:
    """Validate one LLM_REQ message. The subject's priority/slo class win over the body's."""
    try:
        req = request_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        rid = sniff_request_id(data)
        group = INTERACTIVE_GROUP
        if rid is None or not valid_token(rid):
            rid, group = "", INVALID_GROUP
        return Rejection(rid, group, ErrorCode.INVALID_REQUEST, f"invalid request: {exc}")
    if not valid_token(req.request_id):
        return Rejection("", INVALID_GROUP, ErrorCode.INVALID_REQUEST,
                         f"request_id {req.request_id!r} is not a valid subject token")
    group = req.group if valid_token(req.group) else INTERACTIVE_GROUP
    problem = _problem(req)
    if problem is not None:
        return Rejection(req.request_id, group, ErrorCode.INVALID_REQUEST, problem)
    priority = _PRIORITY_BY_NAME.get(subject_priority) or req.priority or Priority.NORMAL
    return WorkItem(
        request=req,
        priority=priority,
        slo_class=subject_slo or req.slo_class or "standard",
        enqueued_ms=stored_ms,
        dispatched_ms=now_ms,
        orchestrator_id=orchestrator_id,
    )
