"""Connection-level guards uvicorn lacks: a deadline and a size cap on request headers.

uvicorn closes a kept-alive connection that stays idle (`timeout_keep_alive`),
but a connection that sends half a request line, or headers one byte at a
time, stays open for good (slowloris), and httptools caps no header size.
`guarded_protocol` subclasses uvicorn's httptools protocol:

- from the connection's start, and from the first byte of each later
  request, the request line and headers must be complete within
  `header_timeout_s`: else 408 and the connection is closed;
- the request line and headers together may hold `max_header_bytes`: else
  431 and the connection is closed;
- an answer that goes out before its request's body was all received (a
  refusal, a route that never reads it) closes the connection: uvicorn would
  otherwise read and drop the rest for as long as the client sends it, one
  byte at a time if it likes. (Bodies a handler reads are timed by
  gateway/guard.py.)

The hooks are uvicorn's own protocol callbacks (connection_made,
on_message_begin, on_url, on_header, on_headers_complete, on_response_complete,
connection_lost);
tests/security/test_gateway_attacks.py checks the behaviour on a real socket.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
            b"content-length: 33\r\nconnection: close\r\n\r\n"
            b"the request headers came too late")
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
              b"content-length: 33\r\nconnection: close\r\n\r\n"
              b"the request headers are too large")


class _HeadersTooLarge(Exception):
    pass


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a header size cap."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 << 10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._refused: bytes | None = None  # what to answer instead of uvicorn's 400

    # -- the deadline ----------------------------------------------------------------
    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no answer being written
            self.transport.write(_TIMEOUT)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        unread = self.cycle is not None and self.cycle.more_body
        super().on_response_complete()
        if unread and not self.transport.is_closing():
            self.transport.close()

    # -- the size cap ------------------------------------------------------------------
    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.max_header_bytes:
            self._refused = _TOO_LARGE
            raise _HeadersTooLarge  # stops the parser; uvicorn answers via send_400_response

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        if self._refused is None:
            super().send_400_response(msg)
            return
        self._disarm()
        self.transport.write(self._refused)
        self.transport.close()


def guarded_protocol(header_timeout_s: float, max_header_bytes: int) -> type[GuardedHttpTools]:
    """The protocol class for `uvicorn.Config(http=...)`, with these limits."""
    return type("GatewayHttpProtocol", (GuardedHttpTools,),
                {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes})
