"""Server-sent events of an OpenAI-compatible stream, read defensively.

A remote server is not trusted to be well-formed: every way a stream can be
wrong (a line that is not SSE, a payload that is not a JSON object, an event
larger than any completion chunk, an error object mid-stream, a stream that
ends without `[DONE]`) raises `ServerProtocolError`, an engine fault.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

# One chunk of a streamed completion is a few hundred bytes (token ids included);
# a line longer than this is a broken or hostile server, not a big token.
MAX_EVENT_BYTES = 1 << 20
DONE = b"[DONE]"


class ServerProtocolError(RuntimeError):
    """The server answered something that is not a valid completion stream."""


def parse_data(payload: bytes) -> dict[str, Any]:
    """One `data:` payload: a JSON object, or ServerProtocolError."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ServerProtocolError(f"malformed SSE payload: {payload[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise ServerProtocolError(f"SSE payload is not an object: {payload[:80]!r}")
    if "error" in obj and "choices" not in obj:
        err = obj["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        raise ServerProtocolError(f"server error mid-stream: {str(msg)[:200]}")
    return obj


async def events(lines: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a `text/event-stream` body, until `data: [DONE]`.

    Data of one event may span several `data:` lines (joined by newlines);
    comments (`:`), `event:`, `id:` and `retry:` lines are skipped."""
    data: list[bytes] = []
    size = 0
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line:  # end of an event
            if data:
                payload, data, size = b"\n".join(data), [], 0
                if payload.strip() == DONE:
                    return
                yield parse_data(payload)
            continue
        size += len(line)
        if size > MAX_EVENT_BYTES:
            raise ServerProtocolError(f"SSE event larger than {MAX_EVENT_BYTES} bytes")
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif line.startswith((b":", b"event:", b"id:", b"retry:")):
            continue
        else:
            raise ServerProtocolError(f"not an SSE line: {line[:80]!r}")
    if data and b"\n".join(data).strip() == DONE:
        return
    raise ServerProtocolError("the stream ended before [DONE]")


__all__ = ["MAX_EVENT_BYTES", "ServerProtocolError", "events", "parse_data"]
