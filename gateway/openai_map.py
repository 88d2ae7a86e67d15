"""OpenAI HTTP bodies <-> the wire types of schemas/messages.py. Pure: no I/O.

In: a `/v1/chat/completions` or `/v1/completions` body (n=1) becomes one
`Request` plus what the HTTP side needs (`Mapped`: stream flags, the queue).
Out: TokenChunk / Final become OpenAI objects (`chat.completion[.chunk]`,
`text_completion`); ErrorReply and refusals become an `ApiError`: an HTTP
status, an OpenAI-shaped body `{"error": {"message", "type", "param", "code"}}`
and, for 429/503, a Retry-After.

Priority: a body `priority` (or header `x-priority`) is vLLM's int, where
lower runs first and 0 is the default, or one of our names:
    <= -2 critical, -1 high, 0 normal, 1 low, >= 2 background.
Header text is an int of at most 6 digits or a name; anything else is a 400.
`slo_class` comes from the body or header `x-slo-class` (default: the
subject's `standard`) and must match `[A-Za-z0-9_-]{1,64}`.

ErrorReply codes -> HTTP: invalid_request, prompt_too_long, too_large 400;
unknown_model 404; over_budget 402 (Payment Required: the request's
cost_budget cannot buy the cheapest pool); overloaded 429 + Retry-After;
model_unavailable, worker_failed 503 (+ Retry-After when retryable);
engine_error, internal, dead_letter 500.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

from cplane.schemas.messages import (
    PRIORITIES,
    ChatMessage,
    ErrorCode,
    ErrorReply,
    Final,
    FinishReason,
    Priority,
    Request,
    TokenChunk,
)

SSE_DONE = "[DONE]"


class Kind(StrEnum):
    """Which OpenAI endpoint a request came through (shapes the reply objects)."""

    CHAT = "chat"
    COMPLETION = "completion"


@dataclass(frozen=True, slots=True)
class ApiError:
    """An HTTP error with an OpenAI-shaped body."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None  # sets the Retry-After header

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"retry-after": str(self.retry_after_s)}


@dataclass(frozen=True, slots=True)
class Mapped:
    """One OpenAI request, translated: what to publish and how to answer."""

    kind: Kind
    request: Request
    priority: Priority
    slo_class: str | None
    stream: bool
    include_usage: bool


# -- request bodies (unknown fields are ignored, as OpenAI's servers do) ------
class _ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class _InMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[_ContentPart] | None = None


class _StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _Body(msgspec.Struct, kw_only=True):
    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    n: int | None = 1
    user: str | None = None
    priority: int | str | None = None
    slo_class: str | None = None
    ignore_eos: bool = False
    logprobs: Any = None
    best_of: int | None = None
    echo: bool | None = False
    cost_budget: float | None = None  # cplane extension: Request.cost_budget
    # Not supported: refused unless absent or neutral (never silently dropped).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class ChatBody(_Body, kw_only=True):
    messages: list[_InMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens


class CompletionBody(_Body, kw_only=True):
    prompt: Any  # str, [str], [int] or [[int]] (one prompt: n=1, no batching)


_chat_decoder = msgspec.json.Decoder(ChatBody)
_completion_decoder = msgspec.json.Decoder(CompletionBody)
_PATH = re.compile(r"at `\$\.?([^`]*)`|missing required field `([^`]*)`")


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=ErrorCode.INVALID_REQUEST.value)


# A vLLM int as text (the header): a few digits, one optional sign. Longer or
# odder text ("--5", 5,000 digits) is refused before int() could choke on it.
_PRIORITY_INT = re.compile(r"[+-]?[0-9]{1,6}")
# An SLO class is a subject token and a metrics label: plain ASCII, short.
SLO_CLASS = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _shown(value: object) -> str:
    """A client's value for an error message: repr'd (escapes NUL, bidi marks), cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def priority_of(value: int | str | None) -> Priority | ApiError:
    """vLLM's int (lower first, 0 default) or one of our names -> Priority; else a 400."""
    if value is None or value == "":
        return Priority.NORMAL
    if isinstance(value, bool):
        return _invalid("priority must be an integer or a name", "priority")
    if isinstance(value, str):
        text = value.strip().lower()
        if _PRIORITY_INT.fullmatch(text):
            return priority_of(int(text))
        try:
            return Priority(text)
        except ValueError:
            return _invalid(f"priority {_shown(value)} is not an integer nor one of "
                            f"{[p.value for p in PRIORITIES]}", "priority")
    return PRIORITIES[min(max(value + Priority.NORMAL.level, 0), len(PRIORITIES) - 1)]


def slo_class_error(value: str | None, source: str = "slo_class") -> ApiError | None:
    """A 400 unless `value` is None or matches `[A-Za-z0-9_-]{1,64}`."""
    if value is None or SLO_CLASS.fullmatch(value):
        return None
    return _invalid(f"{source} {_shown(value)} must match [A-Za-z0-9_-]{{1,64}}", "slo_class")


def _decode(kind: Kind, body: bytes) -> ChatBody | CompletionBody | ApiError:
    try:
        if kind is Kind.CHAT:
            return _chat_decoder.decode(body)
        return _completion_decoder.decode(body)
    except msgspec.ValidationError as exc:
        m = _PATH.search(str(exc))
        return _invalid(f"invalid body: {exc}", (m.group(1) or m.group(2)) if m else None)
    except msgspec.DecodeError as exc:
        return _invalid(f"the body is not JSON: {exc}")


def _check_common(b: _Body) -> ApiError | None:
    if b.n not in (None, 1):
        return _invalid("only n=1 is supported", "n")
    if b.best_of not in (None, 1):
        return _invalid("best_of is not supported", "best_of")
    if b.echo:
        return _invalid("echo is not supported", "echo")
    if b.logprobs not in (None, False, 0):
        return _invalid("logprobs are not supported", "logprobs")
    if b.temperature is not None and b.temperature < 0:
        return _invalid("temperature must be >= 0", "temperature")
    if b.top_p is not None and not 0 < b.top_p <= 1:
        return _invalid("top_p must be in (0, 1]", "top_p")
    slo_err = slo_class_error(b.slo_class)
    if slo_err:
        return slo_err
    unsupported = _unsupported(b)
    if unsupported:
        return _invalid(f"{unsupported} is not supported by this gateway", unsupported)
    if b.stream_options is not None and not b.stream:
        return _invalid("stream_options is only allowed with stream=true", "stream_options")
    return None


def _unsupported(b: _Body) -> str | None:
    """The first field asking for what cplane's engines do not do, if any."""
    neutral = {"frequency_penalty": (None, 0), "presence_penalty": (None, 0),
               "repetition_penalty": (None, 1)}
    for name, ok in neutral.items():
        if getattr(b, name) not in ok:
            return name
    if b.logit_bias or b.tools:
        return "logit_bias" if b.logit_bias else "tools"
    if b.response_format and b.response_format.get("type", "text") != "text":
        return "response_format"
    return None


def _chat_messages(b: ChatBody) -> list[ChatMessage] | ApiError:
    if not b.messages:
        return _invalid("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(b.messages):
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                return _invalid("only text content parts are supported", f"messages[{i}].content")
            text = "".join(p.text or "" for p in m.content)
        else:
            text = m.content or ""
        out.append(ChatMessage(role=m.role, content=text))
    return out


def _prompt(value: Any) -> dict[str, Any] | ApiError:
    """`prompt` as Request fields: text, or token ids; one prompt only."""
    if isinstance(value, str):
        return {"prompt": value}
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        return _prompt(value[0])
    if (isinstance(value, list) and value
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
        return {"prompt_token_ids": value}
    return _invalid("prompt must be a string, a list of token ids, or a list of one of those "
                    "(one prompt per request)", "prompt")


def parse(kind: Kind, body: bytes, *, request_id: str, headers: Mapping[str, str],
          tenant: str | None = None, now_ms: float | None = None,
          fresh_id: bool = False) -> Mapped | ApiError:
    """An OpenAI body (and its `x-priority` / `x-slo-class` headers) -> Mapped, or a 400.
    `fresh_id`: the caller minted `request_id` for this request (Request.fresh_id)."""
    b = _decode(kind, body)
    if isinstance(b, ApiError):
        return b
    err = _check_common(b)
    if err:
        return err
    fields: dict[str, Any]
    if isinstance(b, ChatBody):
        msgs = _chat_messages(b)
        if isinstance(msgs, ApiError):
            return msgs
        fields = {"messages": msgs}
        max_tokens = b.max_tokens if b.max_completion_tokens is None else b.max_completion_tokens
    else:
        got = _prompt(b.prompt)
        if isinstance(got, ApiError):
            return got
        fields, max_tokens = got, b.max_tokens
    if max_tokens is not None:
        if max_tokens < 1:
            return _invalid("max_tokens must be >= 1", "max_tokens")
        fields["max_tokens"] = max_tokens
    prio = priority_of(headers.get("x-priority") or b.priority)
    if isinstance(prio, ApiError):
        return prio
    slo = headers.get("x-slo-class") or b.slo_class
    slo_err = slo_class_error(slo, "x-slo-class")
    if slo_err:
        return slo_err
    stop = [b.stop] if isinstance(b.stop, str) else b.stop
    for key, value in (("temperature", b.temperature), ("top_p", b.top_p), ("top_k", b.top_k),
                       ("seed", b.seed), ("stop", stop or None), ("user_id", b.user),
                       ("cost_budget", b.cost_budget), ("tenant", tenant),
                       ("created_ms", now_ms)):
        if value is not None:
            fields[key] = value
    req = Request(request_id=request_id, model=b.model, ignore_eos=b.ignore_eos, priority=prio,
                  slo_class=slo, fresh_id=fresh_id, **fields)
    include_usage = bool(b.stream_options and b.stream_options.include_usage)
    return Mapped(kind=kind, request=req, priority=prio, slo_class=slo, stream=bool(b.stream),
                  include_usage=include_usage)


def model_error(model: str, live: frozenset[str], ever: frozenset[str]) -> ApiError | None:
    """404 for a model no worker serves nor served since the gateway started.

    An empty fleet, or a model seen before (its workers may be restarting),
    goes through: the orchestrator waits `model_wait_s` for it.
    """
    if not model or not live or model in live or model in ever:
        return None
    return ApiError(404, f"the model {model!r} does not exist; served: {sorted(live)}",
                    type="NotFoundError", param="model", code="model_not_found")


# -- replies -----------------------------------------------------------------
_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.PROMPT_TOO_LONG: (400, "invalid_request_error"),
    ErrorCode.TOO_LARGE: (400, "invalid_request_error"),
    ErrorCode.UNKNOWN_MODEL: (404, "NotFoundError"),
    ErrorCode.OVER_BUDGET: (402, "over_budget"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error"),
    ErrorCode.RATE_LIMITED: (429, "rate_limit_error"),  # the tenant's rate or in-flight cap
    ErrorCode.FORBIDDEN: (403, "permission_error"),  # e.g. above the tenant's priority ceiling
    ErrorCode.MODEL_UNAVAILABLE: (503, "service_unavailable"),
    ErrorCode.WORKER_FAILED: (503, "service_unavailable"),
}


def retry_after_s(ms: float | None, default_s: float) -> int:
    """Whole seconds for Retry-After (at least 1)."""
    return max(1, math.ceil(ms / 1000.0 if ms is not None else default_s))


def error_of(reply: ErrorReply, default_retry_s: float = 1.0) -> ApiError:
    """An ErrorReply as an HTTP status and an OpenAI-shaped body."""
    status, kind = _STATUS.get(reply.code, (500, "server_error"))
    retry = None
    if status == 429 or (status == 503 and reply.retryable):
        retry = retry_after_s(reply.retry_after_ms, default_retry_s)
    return ApiError(status, reply.message, type=kind, code=reply.code.value, retry_after_s=retry)


def overloaded(message: str, default_retry_s: float) -> ApiError:
    """The request stream refused the publish."""
    return ApiError(429, message, type="rate_limit_error", code=ErrorCode.OVERLOADED.value,
                    retry_after_s=retry_after_s(None, default_retry_s))


_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
           FinishReason.CANCELLED: "abort", FinishReason.ABORT: "abort"}


def usage_of(final: Final) -> dict[str, Any]:
    u = final.usage
    out: dict[str, Any] = {"prompt_tokens": u.prompt_tokens,
                           "completion_tokens": u.completion_tokens,
                           "total_tokens": u.prompt_tokens + u.completion_tokens}
    if u.cached_prompt_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": u.cached_prompt_tokens}
    return out


def response_id(kind: Kind, request_id: str) -> str:
    return ("chatcmpl-" if kind is Kind.CHAT else "cmpl-") + request_id


def completion(m: Mapped, final: Final, created_s: int) -> dict[str, Any]:
    """The non-streaming reply: `chat.completion` or `text_completion`."""
    reason = _FINISH[final.finish_reason]
    if m.kind is Kind.CHAT:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason,
                                  "message": {"role": "assistant", "content": final.text}}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "logprobs": None, "finish_reason": reason, "text": final.text}
        obj = "text_completion"
    return {"id": response_id(m.kind, m.request.request_id), "object": obj,
            "created": created_s, "model": final.model or m.request.model,
            "choices": [choice], "usage": usage_of(final)}


class StreamMapper:
    """Builds the SSE payloads of one streamed reply, in order.

    The first content chunk carries `role: assistant` (no empty role-only
    chunk ahead of it, so a client's TTFT is the first token's); the Final
    adds a chunk with `finish_reason`, then (include_usage) one with
    `choices: []` and the usage, as OpenAI does.
    """

    def __init__(self, m: Mapped, created_s: int) -> None:
        self.m = m
        self.model = m.request.model
        self.base = {"id": response_id(m.kind, m.request.request_id),
                     "object": "chat.completion.chunk" if m.kind is Kind.CHAT
                     else "text_completion", "created": created_s}
        self.first = True

    def _choice(self, text: str | None, reason: str | None) -> dict[str, Any]:
        if self.m.kind is not Kind.CHAT:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if self.first:
            delta["role"] = "assistant"
            self.first = False
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

    def _obj(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        obj = {**self.base, "model": self.model, "choices": choices, **extra}
        if self.m.include_usage:
            obj.setdefault("usage", None)
        return obj

    def chunk(self, c: TokenChunk) -> dict[str, Any]:
        return self._obj([self._choice(c.text, None)])

    def final(self, f: Final) -> list[dict[str, Any]]:
        self.model = f.model or self.model
        out = [self._obj([self._choice(None, _FINISH[f.finish_reason])])]
        if self.m.include_usage:
            out.append(self._obj([], usage=usage_of(f)))
        return out

    @staticmethod
    def error(e: ApiError) -> dict[str, Any]:
        """An error after the 200 went out: one `data: {"error": ...}` event, as vLLM sends."""
        return {"error": {**e.body()["error"], "status": e.status}}
