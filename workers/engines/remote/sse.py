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


class SseSplitter:
    """Bytes as they arrive -> the JSON objects of complete events (pure; no I/O).

    Data of one event may span several `data:` lines (joined by newlines);
    comments (`:`), `event:`, `id:` and `retry:` lines are skipped. `done` turns
    True at `data: [DONE]`; bytes after it are ignored."""

    __slots__ = ("_buf", "_data", "_size", "done", "error")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._size = 0
        self.done = False
        # A fault met after good events in one feed: those are returned first, the
        # fault waits here (`check()`), as if the bytes had come one event at a time.
        self.error: ServerProtocolError | None = None

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.done:
            return out
        buf = self._buf + chunk if self._buf else chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            try:
                self._line(buf[start:end], out)
            except ServerProtocolError as exc:
                if not out:
                    raise
                self.error = exc
                return out
            start = end + 1
            if self.done:
                self._buf = b""
                return out
        self._buf = buf[start:]
        if len(self._buf) + self._size > MAX_EVENT_BYTES:
            raise ServerProtocolError(f"SSE event larger than {MAX_EVENT_BYTES} bytes")
        return out

    def end(self) -> None:
        """The stream closed: ServerProtocolError unless `[DONE]` came (its event may
        lack the closing blank line; an unfinished event is not used)."""
        if self.done:
            return
        line = self._buf.rstrip(b"\r")
        data = [*self._data, line[5:].removeprefix(b" ")] if line.startswith(b"data:") else (
            self._data)
        if b"\n".join(data).strip() != DONE:
            raise ServerProtocolError("the stream ended before [DONE]")
        self.done = True

    def _line(self, raw: bytes, out: list[dict[str, Any]]) -> None:
        line = raw.rstrip(b"\r")
        if not line:  # end of an event
            if self._data:
                payload = b"\n".join(self._data)
                self._data, self._size = [], 0
                if payload.strip() == DONE:
                    self.done = True
                else:
                    out.append(parse_data(payload))
            return
        self._size += len(line)
        if self._size > MAX_EVENT_BYTES:
            raise ServerProtocolError(f"SSE event larger than {MAX_EVENT_BYTES} bytes")
        if line.startswith(b"data:"):
            self._data.append(line[5:].removeprefix(b" "))
        elif not line.startswith((b":", b"event:", b"id:", b"retry:")):
            raise ServerProtocolError(f"not an SSE line: {line[:80]!r}")


async def event_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[dict[str, Any]]]:
    """The events of a `text/event-stream` body, a list per read of the socket, until
    `data: [DONE]`: a reader that fell behind takes what piled up in one step instead
    of one step per token."""
    splitter = SseSplitter()
    async for chunk in chunks:
        batch = splitter.feed(chunk)
        if batch:
            yield batch
        splitter.check()
        if splitter.done:
            return
    splitter.end()


async def events(lines: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The same, one object at a time (any split of the body into pieces)."""
    async for batch in event_batches(lines):
        for obj in batch:
            yield obj


__all__ = ["MAX_EVENT_BYTES", "ServerProtocolError", "SseSplitter", "event_batches", "events",
           "parse_data"]
