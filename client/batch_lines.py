"""OpenAI batch lines in and out: validation, request building, result lines. Pure.

- `LineChecker.check(raw, line_no)` turns one input line into a `ValidLine`
  (the Request to publish, minus its scheduling subject) or a `LineError`
  (line number and reason). It remembers custom_ids: a repeat is an error.
- `request_id_for(job, custom_id)` derives the request id, so the same
  line of the same job always gets the same id (JetStream and the
  orchestrator drop a repeat).
- `output_line(...)` turns a line and its terminal into one OpenAI output
  line and says whether it belongs to the output or the errors file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from cplane.schemas.batch import (
    BATCH_URLS,
    CHAT_URL,
    BatchError,
    BatchInputLine,
    BatchOutputLine,
    BatchResponse,
)
from cplane.schemas.messages import ChatMessage, ErrorCode, ErrorReply, Final, FinishReason, Request
from cplane.schemas.settings import LimitsSettings

MAX_CUSTOM_ID = 512
_line_decoder = msgspec.json.Decoder(BatchInputLine)
_any_decoder = msgspec.json.Decoder()
# How an ErrorReply's code reads as an HTTP status in the output file.
STATUS_OF: Mapping[str, int] = {
    ErrorCode.INVALID_REQUEST: 400, ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.PROMPT_TOO_LONG: 400, ErrorCode.TOO_LARGE: 413, ErrorCode.OVER_BUDGET: 402,
    ErrorCode.OVERLOADED: 429, ErrorCode.MODEL_UNAVAILABLE: 503, ErrorCode.WORKER_FAILED: 503,
}
CANCELLED_CODE = "batch_cancelled"  # a line that never ran, or was stopped, by a job cancel


@dataclass(frozen=True, slots=True)
class ValidLine:
    line_no: int  # 1-based
    custom_id: str
    url: str
    model: str
    request: Request


@dataclass(frozen=True, slots=True)
class LineError:
    line_no: int
    reason: str
    custom_id: str | None = None

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.reason}"


def request_id_for(job_id: str, custom_id: str) -> str:
    """`<job>-<20 hex of blake2b(custom_id)>`: a subject token whatever the custom_id holds."""
    return f"{job_id}-{hashlib.blake2b(custom_id.encode(), digest_size=10).hexdigest()}"


class _Bad(ValueError):
    """One reason a line is refused."""


def _number(body: Mapping[str, Any], key: str, lo: float, hi: float) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise _Bad(f"body.{key} must be a number in [{lo:g}, {hi:g}]")
    return float(v)


def _int(body: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _Bad(f"body.{key} must be an integer in [{lo}, {hi}]")
    return v


def _content(c: Any, i: int) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                   and isinstance(p.get("text"), str) for p in c):
        return "".join(p["text"] for p in c)
    raise _Bad(f"body.messages[{i}].content must be a string or a list of text parts")


def _messages(body: Mapping[str, Any]) -> list[ChatMessage]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _Bad("body.messages must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Bad(f"body.messages[{i}] must be an object with a string role")
        out.append(ChatMessage(role=m["role"], content=_content(m.get("content"), i)))
    return out


def _prompt(body: Mapping[str, Any]) -> dict[str, Any]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]  # OpenAI accepts a one-element list of strings
    if isinstance(p, str):
        return {"prompt": p}
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
        return {"prompt_token_ids": p}
    raise _Bad("body.prompt must be a string or a list of token ids (one prompt per line)")


def _stop(body: Mapping[str, Any], limits: LimitsSettings) -> list[str] | None:
    s = body.get("stop")
    if s is None:
        return None
    stops = [s] if isinstance(s, str) else s
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise _Bad("body.stop must be a string or a list of strings")
    if len(stops) > limits.max_stop:
        raise _Bad(f"body.stop has {len(stops)} strings; at most {limits.max_stop}")
    return stops


def build_request(line: BatchInputLine, *, job_id: str, model: str,
                  limits: LimitsSettings) -> tuple[str, Request]:
    """(model, Request) for one decoded line; raises _Bad with the reason."""
    body = line.body
    if line.method.upper() != "POST":
        raise _Bad(f"method must be POST, not {line.method!r}")
    if line.url not in BATCH_URLS:
        raise _Bad(f"url must be one of {list(BATCH_URLS)}, not {line.url!r}")
    if not line.custom_id or len(line.custom_id) > MAX_CUSTOM_ID:
        raise _Bad(f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters")
    name = model or body.get("model")
    if not isinstance(name, str) or not name:
        raise _Bad("body.model is missing (or pass --model)")
    if body.get("stream"):
        raise _Bad("body.stream must be false in a batch")
    if (_int(body, "n", 1, 1 << 30) or 1) != 1:
        raise _Bad("body.n must be 1 (one completion per line)")
    prompt: dict[str, Any] = ({"messages": _messages(body)} if line.url == CHAT_URL
                              else _prompt(body))
    max_tokens = _int(body, "max_completion_tokens", 1, limits.max_tokens)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, limits.max_tokens)
    extra: dict[str, Any] = {}
    for key, value in (("temperature", _number(body, "temperature", 0.0, 2.0)),
                       ("top_p", _number(body, "top_p", 1e-9, 1.0)),
                       ("seed", _int(body, "seed", -(1 << 63), (1 << 63) - 1)),
                       ("max_tokens", max_tokens), ("stop", _stop(body, limits))):
        if value is not None:
            extra[key] = value
    user = body.get("user")
    if isinstance(user, str) and user:
        extra["user_id"] = user
    return name, Request(request_id=request_id_for(job_id, line.custom_id), model=name,
                         group=job_id, **prompt, **extra)


class LineChecker:
    """Checks a file line by line (streaming); remembers custom_ids to refuse repeats."""

    def __init__(self, job_id: str, *, model: str = "", limits: LimitsSettings | None = None,
                 max_bytes: int = 1 << 20) -> None:
        self.job_id = job_id
        self.model = model
        self.limits = limits or LimitsSettings()
        self.max_bytes = max_bytes  # an encoded Request above this cannot be published
        self._first_line: dict[str, int] = {}

    def check(self, raw: bytes, line_no: int) -> ValidLine | LineError:
        try:
            line = _line_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            return LineError(line_no, f"not an OpenAI batch line: {exc}", _sniff(raw))
        except msgspec.DecodeError:
            return LineError(line_no, "not JSON")
        try:
            model, req = build_request(line, job_id=self.job_id, model=self.model,
                                       limits=self.limits)
        except _Bad as exc:
            return LineError(line_no, str(exc), line.custom_id or None)
        first = self._first_line.setdefault(line.custom_id, line_no)
        if first != line_no:
            return LineError(line_no, f"custom_id {line.custom_id!r} repeats line {first}",
                             line.custom_id)
        if len(msgspec.json.encode(req)) > self.max_bytes:
            return LineError(line_no, f"request is larger than {self.max_bytes} bytes",
                             line.custom_id)
        return ValidLine(line_no, line.custom_id, line.url, model, req)


def _sniff(raw: bytes) -> str | None:
    try:
        obj = _any_decoder.decode(raw)
    except msgspec.DecodeError:
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) else None


def invalid_line(err: LineError) -> BatchOutputLine:
    """An errors-file line for a line refused at validation (skipped with --skip-invalid)."""
    return BatchOutputLine(id=f"batch_req_line{err.line_no}", custom_id=err.custom_id,
                           error=BatchError(code=ErrorCode.INVALID_REQUEST.value,
                                            message=str(err)))


def not_run_line(line: ValidLine) -> BatchOutputLine:
    """An errors-file line for a line the job's cancel kept from running."""
    rid = line.request.request_id
    return BatchOutputLine(id=f"batch_req_{rid}", custom_id=line.custom_id,
                           error=BatchError(code=CANCELLED_CODE,
                                            message="the job was cancelled before this line ran"))


def _body(line: ValidLine, final: Final) -> dict[str, Any]:
    rid = line.request.request_id
    u = final.usage
    chat = line.url == CHAT_URL
    choice: dict[str, Any] = {"index": 0, "finish_reason": final.finish_reason.value}
    if chat:
        choice["message"] = {"role": "assistant", "content": final.text}
    else:
        choice |= {"text": final.text, "logprobs": None}
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(final.ts_ms / 1000),
        "model": final.model or line.model,
        "choices": [choice],
        "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                  "total_tokens": u.prompt_tokens + u.completion_tokens},
    }


def output_line(line: ValidLine, terminal: Final | ErrorReply) -> tuple[bool, BatchOutputLine]:
    """(ok, line): ok lines go to the output file, the others to the errors file."""
    rid = line.request.request_id
    out_id = f"batch_req_{rid}"
    if isinstance(terminal, Final) and terminal.finish_reason in (FinishReason.STOP,
                                                                  FinishReason.LENGTH):
        return True, BatchOutputLine(
            id=out_id, custom_id=line.custom_id,
            response=BatchResponse(status_code=200, request_id=rid, body=_body(line, terminal)))
    if isinstance(terminal, Final):  # cancelled or aborted
        return False, BatchOutputLine(id=out_id, custom_id=line.custom_id, error=BatchError(
            code=CANCELLED_CODE, message=f"stopped: {terminal.finish_reason.value}"))
    code = terminal.code.value
    status = STATUS_OF.get(terminal.code, 500)
    return False, BatchOutputLine(
        id=out_id, custom_id=line.custom_id,
        response=BatchResponse(status_code=status, request_id=rid, body={
            "error": {"message": terminal.message, "type": code, "code": code}}),
        error=BatchError(code=code, message=terminal.message))


def succeeded(terminal: Final | ErrorReply) -> bool:
    """True for a completion (stop/length); cancelled, aborted and errors count as failed."""
    return isinstance(terminal, Final) and terminal.finish_reason in (FinishReason.STOP,
                                                                      FinishReason.LENGTH)


__all__ = [
    "CANCELLED_CODE",
    "LineChecker",
    "LineError",
    "ValidLine",
    "build_request",
    "invalid_line",
    "not_run_line",
    "output_line",
    "request_id_for",
    "succeeded",
]
