"""W3C Trace Context (`traceparent`) as carried in NATS headers. Pure, stdlib only.

`00-<trace id: 32 hex>-<parent span id: 16 hex>-<flags: 2 hex>`. The SDK puts
one on each request it publishes (from the caller's OpenTelemetry span when
there is one); the orchestrator copies it into the request's WorkItem (a work
message can carry many requests, so per-request context rides in the item);
the worker runs the request as a child span and puts its own `traceparent`
(same trace id) on the terminal it stores, so a reader of `llm.done` can
join the trace.
"""

from __future__ import annotations

import re
import secrets

HEADER = "traceparent"
_FORMAT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parse(value: str | None) -> tuple[str, str, str] | None:
    """(trace id, parent span id, flags) of a valid version-00 traceparent, else None."""
    m = _FORMAT.match(value or "")
    if m is None or m[1] == "0" * 32 or m[2] == "0" * 16:
        return None
    return m[1], m[2], m[3]


def new() -> str:
    """A fresh trace, sampled."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child(value: str | None) -> str:
    """A new span in the same trace (a fresh trace when `value` is not valid)."""
    parts = parse(value)
    if parts is None:
        return new()
    return f"00-{parts[0]}-{secrets.token_hex(8)}-{parts[2]}"


def trace_id(value: str | None) -> str:
    parts = parse(value)
    return parts[0] if parts else ""


__all__ = ["HEADER", "child", "new", "parse", "trace_id"]
