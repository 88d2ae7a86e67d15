"""Intake: what to do with one LLM_REQ delivery. Pure.

`classify` names the action from the delivery's facts and the ledger;
`admit` turns the bytes into a WorkItem or a clear rejection. `admit` never
raises, whatever the bytes (deep nesting, invalid UTF-8, huge numbers, NaN,
wrong shapes): every stored request message ends in a WorkItem or a
Rejection that the shell publishes as an ErrorReply.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import msgspec

from cplane.orchestrator.ledger import Entry, RequestState
from cplane.schemas.codec import request_decoder, sniff_request_id
from cplane.schemas.messages import PRIORITIES, ErrorCode, Priority, Request, WorkItem
from cplane.schemas.settings import LimitsSettings, TenantPolicy
from cplane.schemas.subjects import (
    INTERACTIVE_GROUP,
    INVALID_GROUP,
    RESERVED_GROUPS,
    Subjects,
    scoped,
    valid_token,
)

_DEFAULT_LIMITS = LimitsSettings()

_PRIORITY_BY_NAME = {p.value: p for p in PRIORITIES}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request cannot run; published as an ErrorReply on `llm.done.<group>.<id>`."""

    request_id: str
    group: str
    code: ErrorCode
    message: str
    reply_to: str | None = None  # a validated reply_to also gets the ErrorReply
    retryable: bool = False
    retry_after_ms: float | None = None


def scoped_key(req: Request) -> str:
    """What names a request across tenants: `<tenant>.<id>`, or its id."""
    return Subjects.scoped_id(req.group, req.request_id)


def over_ceiling(priority: Priority, tenant: str, policy: TenantPolicy) -> str | None:
    """Why `priority` is above the tenant's ceiling, or None."""
    top = policy.max_priority
    if top is not None and priority.level < _PRIORITY_BY_NAME[top].level:
        return (f"priority {priority.value!r} is above tenant {tenant!r}'s ceiling "
                f"{top!r}")
    return None


def _valid_subject(subject: str) -> bool:
    return all(valid_token(t) for t in subject.split("."))


def _too_large(req: Request, lim: LimitsSettings) -> str | None:
    if req.max_tokens > lim.max_tokens:
        return f"max_tokens {req.max_tokens} is above the limit of {lim.max_tokens}"
    chars = len(req.prompt or "") + sum(len(m.content) for m in req.messages or ())
    if chars > lim.max_prompt_chars:
        return f"the prompt has {chars} characters; the limit is {lim.max_prompt_chars}"
    if req.prompt_token_ids is not None and len(req.prompt_token_ids) > lim.max_prompt_token_ids:
        return (f"prompt_token_ids has {len(req.prompt_token_ids)} ids; the limit is "
                f"{lim.max_prompt_token_ids}")
    if req.stop is not None and len(req.stop) > lim.max_stop:
        return f"{len(req.stop)} stop strings; the limit is {lim.max_stop}"
    return None


def _reply_to_problem(reply_to: str, lim: LimitsSettings) -> str | None:
    if not _valid_subject(reply_to):
        return f"reply_to {reply_to!r} is not a publishable subject"
    if not any(reply_to.startswith(p) for p in lim.reply_to_prefixes):
        return (f"reply_to must start with one of {list(lim.reply_to_prefixes)}, "
                "never a subject of the system")
    return None


def _problem(req: Request, lim: LimitsSettings) -> str | None:
    forms = ((req.prompt is not None) + (req.prompt_token_ids is not None)
             + (req.messages is not None))
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
    if req.parallelism_hint < 0:
        return "parallelism_hint must be 0 (any layout) or the GPUs one engine spans"
    if req.top_k < -1 or req.top_k == 0:
        return "top_k must be -1 (off) or at least 1"
    if not valid_token(req.group):
        return f"group {req.group!r} is not a valid subject token"
    if req.group in RESERVED_GROUPS:
        return f"group {req.group!r} is reserved; use 'i' or a batch job id"
    if req.reply_to is not None:
        return _reply_to_problem(req.reply_to, lim)
    return None


_RID = re.compile(rb'"request_id"\s*:\s*"([A-Za-z0-9_\-]{1,256})"')


_GROUP = re.compile(rb'"group"\s*:\s*"([A-Za-z0-9_\-]{1,256})"')


def sniff_group(data: bytes) -> str:
    """The output group a body names, when plainly there (else interactive)."""
    m = _GROUP.search(data[:65536])
    group = m.group(1).decode() if m else INTERACTIVE_GROUP
    return INTERACTIVE_GROUP if group in RESERVED_GROUPS else group


class _ModelOnly(msgspec.Struct):
    model: str = ""


_model_decoder = msgspec.json.Decoder(_ModelOnly)


def sniff_model(data: bytes) -> str | None:
    """The model a request body names ("" = none); None when it does not decode (admit
    then refuses it where it is)."""
    try:
        return _model_decoder.decode(data).model
    except Exception:  # not JSON, wrong shapes, deep nesting...
        return None


def sniff_id(data: bytes) -> str | None:
    """The request id of a body that cannot be decoded, when one is plainly there."""
    try:
        rid = sniff_request_id(data)
    except Exception:  # RecursionError on deep nesting, invalid UTF-8...
        rid = None
    if rid is None:
        m = _RID.search(data[:65536])
        rid = m.group(1).decode() if m else None
    return rid


def _undecodable(data: bytes, exc: BaseException, tenant: str | None) -> Rejection:
    rid = sniff_id(data)
    group = INTERACTIVE_GROUP
    if rid is None or not valid_token(rid):
        rid, group = "", INVALID_GROUP
    reason = str(exc)[:300] or type(exc).__name__
    return Rejection(rid, scoped(tenant, group), ErrorCode.INVALID_REQUEST,
                     f"invalid request: {reason}")


_NO_CEILING = TenantPolicy()


def admit(
    data: bytes, subject_priority: str, subject_slo: str, stored_ms: float, now_ms: float,
    orchestrator_id: str = "", limits: LimitsSettings = _DEFAULT_LIMITS,
    tenant: str | None = None, policy: TenantPolicy = _NO_CEILING,
) -> WorkItem | Rejection:
    """Validate one LLM_REQ message. The subject's priority/slo class win over the body's.

    `tenant`: the subject's tenant token (`llm.req.<tenant>.<priority>.<slo>`: the
    server put it there from the publisher's credentials). It is the request's
    tenant and scopes its output group; a body naming another tenant is refused,
    as is a priority above `policy.max_priority`.
    Never raises: bytes that are not a valid request become a Rejection.
    """
    try:
        return _admit(data, subject_priority, subject_slo, stored_ms, now_ms, orchestrator_id,
                      limits, tenant, policy)
    except Exception as exc:  # msgspec errors, RecursionError, UnicodeDecodeError...
        return _undecodable(data, exc, tenant)


def _admit(
    data: bytes, subject_priority: str, subject_slo: str, stored_ms: float, now_ms: float,
    orchestrator_id: str, limits: LimitsSettings, tenant: str | None, policy: TenantPolicy,
) -> WorkItem | Rejection:
    req = request_decoder.decode(data)
    if not valid_token(req.request_id):
        return Rejection("", scoped(tenant, INVALID_GROUP), ErrorCode.INVALID_REQUEST,
                         f"request_id {req.request_id!r} is not a valid subject token")
    group = scoped(tenant, req.group if valid_token(req.group)
                   and req.group not in RESERVED_GROUPS else INTERACTIVE_GROUP)
    # A valid reply_to gets the rejection too (never one aimed at our subjects).
    reply_to = (req.reply_to if req.reply_to is not None and not tenant
                and _reply_to_problem(req.reply_to, limits) is None else None)
    problem = _problem(req, limits)
    if problem is not None:
        return Rejection(req.request_id, group, ErrorCode.INVALID_REQUEST, problem, reply_to)
    if req.tenant is not None and req.tenant != (tenant or None):
        return Rejection(req.request_id, group, ErrorCode.FORBIDDEN,
                         f"the body names tenant {req.tenant!r}; a request's tenant is its "
                         "publisher's, from the subject (its credentials), never the body",
                         reply_to)
    too_large = _too_large(req, limits)
    if too_large is not None:
        return Rejection(req.request_id, group, ErrorCode.TOO_LARGE, too_large, reply_to)
    priority = _PRIORITY_BY_NAME.get(subject_priority) or req.priority or Priority.NORMAL
    if tenant:
        if req.reply_to is not None:  # it would land in the system's account, not its own
            return Rejection(req.request_id, group, ErrorCode.FORBIDDEN,
                             "reply_to is not for tenants: read llm.*.<group>.<request_id>")
        ceiling = over_ceiling(priority, tenant, policy)
        if ceiling is not None:
            return Rejection(req.request_id, group, ErrorCode.FORBIDDEN, ceiling, reply_to)
        req = msgspec.structs.replace(req, group=group, tenant=tenant)
    return WorkItem(
        request=req,
        priority=priority,
        slo_class=subject_slo or req.slo_class or "standard",
        enqueued_ms=stored_ms,
        dispatched_ms=now_ms,
        orchestrator_id=orchestrator_id,
    )


# A delivery to a replica that no longer leads (Intake.NAK) goes back with a delay: at
# once, it could come straight back to the same open pull (on a cluster that outlives
# our unsubscribe by a route hop), hundreds of times a second, and dead-letter it.
NOT_LEADING_NAK_S = 0.5


class Intake(enum.Enum):
    """What the shell does with one LLM_REQ delivery (orchestrator/service.py `_intake`)."""

    NAK = "nak"  # not leading: hand it to the leader at once
    DEAD_LETTER = "dead_letter"  # delivered too often: ErrorReply + evidence in LLM_DLQ
    FORWARD = "forward"  # its model is another partition's: republished there, then acked
    REJECT = "reject"  # not a valid request: ErrorReply, then ack
    SAME_MESSAGE = "same_message"  # a redelivery of the message we hold: keep the new handle
    DUPLICATE_HELD = "duplicate_held"  # the same id again while held: acked with the first
    DUPLICATE_DONE = "duplicate_done"  # the same id again after dispatch or finish: ack
    RECHECK = "recheck"  # redelivered: an earlier delivery may have run; look first
    HOLD = "hold"  # new: into the ledger, HELD


def held_as(entry: Entry[WorkItem] | None, seq: int) -> Entry[WorkItem] | None:
    """`entry` (the ledger's under a delivery's id) when it holds this very message
    (stream sequence `seq`) and waits to be dispatched; else None."""
    return entry if entry is not None and entry.seq == seq and (
        entry.state is RequestState.HELD) else None


def classify(*, leading: bool, deliveries: int, max_deliveries: int,
             admitted: WorkItem | Rejection | None, seq: int, held_seq: int | None,
             held_waiting: bool, seen: bool, elsewhere: bool = False) -> Intake:
    """The action for a delivery. `admitted`: `admit`'s answer (None when not asked:
    not leading, too many deliveries, or `elsewhere`); `held_seq`: the stream sequence
    of the ledger's entry for its id (None: none), `held_waiting` whether that entry
    is not yet dispatched; `seen`: its id was dispatched or finished recently;
    `elsewhere`: the model it names is another partition's (docs/replicas.md)."""
    if not leading:
        return Intake.NAK
    if deliveries > max_deliveries:
        return Intake.DEAD_LETTER
    if elsewhere:
        return Intake.FORWARD
    if admitted is None or isinstance(admitted, Rejection):
        return Intake.REJECT
    if held_seq is not None:
        if held_seq == seq:
            return Intake.SAME_MESSAGE
        return Intake.DUPLICATE_HELD if held_waiting else Intake.DUPLICATE_DONE
    if seen:
        return Intake.DUPLICATE_DONE
    return Intake.RECHECK if deliveries > 1 else Intake.HOLD
