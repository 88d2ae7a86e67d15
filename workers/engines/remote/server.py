"""HTTP to one OpenAI-compatible server: a pooled client and the server's answers.

One `aiohttp` session per server: a keep-alive pool of HTTP/1.1 connections
sized to the requests the worker holds for it, so a completion reuses an open
connection instead of paying a TCP handshake (`opened` against `sent` says how
well: see `pool_stats`). Every failure is one of two kinds:

- `ServerRefused`: the server read the request and said no (HTTP 400/413/422):
  the request itself is wrong for this server, and would be everywhere.
- `ServerFault`: anything else (refused or dropped connection, timeout, 5xx,
  429, a malformed answer): an engine fault; the item is retried elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError

from cplane.workers.engines.remote.sse import (
    MAX_EVENT_BYTES,
    ServerProtocolError,
    event_batches,
)

_INPUT_STATUSES = frozenset({400, 413, 422})
_ERROR_BODY_BYTES = 2048
# A whole (non-streaming) answer: a prefill's one token, or /tokenize's ids of a long
# prompt (a million tokens is ~8 MB of JSON). More than this is a broken server.
MAX_BODY_BYTES = 64 << 20
# What reading a response can raise besides ServerFault: aiohttp's errors, its
# timeouts, and its parser's (a line over max_line_size raises LineTooLong, an
# HttpProcessingError that is neither a ClientError nor a ValueError).
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, HttpProcessingError)


class ServerFault(RuntimeError):
    """The server could not serve (down, slow, 5xx, broken answer): try elsewhere."""


class ServerRefused(ValueError):
    """The server refused the request as invalid (HTTP 4xx on the request's content)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _message(status: int, body: bytes) -> str:
    """The server's error message (OpenAI error object or text), one line."""
    text = body[:_ERROR_BODY_BYTES].decode("utf-8", "replace")
    try:
        obj = orjson.loads(body)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        text = str(err.get("message", err) if isinstance(err, dict) else err)
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return f"HTTP {status}: {' '.join(text.split())[:300]}"


class ServerClient:
    """Requests to one server at `base_url` (http://host:port), over one pooled session."""

    def __init__(self, base_url: str, *, api_key: str = "", pool: int = 64,
                 connect_timeout_s: float = 3.0, stall_timeout_s: float = 60.0,
                 probe_timeout_s: float = 2.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._pool = pool
        self._connect_timeout_s = connect_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._probe_timeout_s = probe_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self.opened = 0  # TCP connections opened (connection reuse: opened / sent)
        self.sent = 0  # HTTP requests sent

    async def open(self) -> None:
        if self._session is not None:
            return
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._on_connection)
        trace.on_request_start.append(self._on_request)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._pool + 4, keepalive_timeout=30.0),
            timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout_s,
                                          sock_read=self._stall_timeout_s),
            headers=self._headers, trace_configs=[trace], read_bufsize=MAX_EVENT_BYTES,
            max_line_size=MAX_EVENT_BYTES, raise_for_status=False)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _on_connection(self, _s: Any, _c: SimpleNamespace, _p: Any) -> None:
        self.opened += 1

    async def _on_request(self, _s: Any, _c: SimpleNamespace, _p: Any) -> None:
        self.sent += 1

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ServerFault(f"client of {self.base_url} is closed")
        return self._session

    # -- probes ------------------------------------------------------------------
    async def health(self) -> str | None:
        """None when `/health` answers 200 in time, else why not (one line)."""
        try:
            async with self.session.get(f"{self.base_url}/health",
                                        timeout=self._probe_timeout()) as resp:
                if resp.status == 200:
                    return None
                return _message(resp.status, await resp.content.read(_ERROR_BODY_BYTES))
        except (*_TRANSPORT_ERRORS, ServerFault) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    async def get_text(self, path: str) -> str:
        """GET a small text document (`/metrics`) with the probe timeout."""
        return (await self._get(path)).decode("utf-8", "replace")

    async def get_json(self, path: str) -> Any:
        try:
            return orjson.loads(await self._get(path))
        except orjson.JSONDecodeError as exc:
            raise ServerFault(f"{path} of {self.base_url} is not JSON") from exc

    async def _get(self, path: str) -> bytes:
        try:
            async with self.session.get(f"{self.base_url}{path}",
                                        timeout=self._probe_timeout()) as resp:
                if resp.status != 200:
                    raise ServerFault(f"{path}: " + _message(resp.status, await resp.read()))
                return await resp.read()
        except _TRANSPORT_ERRORS as exc:
            raise self._fault(path, exc) from exc

    def _fault(self, path: str, exc: BaseException) -> ServerFault:
        return ServerFault(f"{path} of {self.base_url}: {type(exc).__name__}: {exc}")

    def _probe_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self._probe_timeout_s)

    # -- requests ------------------------------------------------------------------
    async def post(self, path: str, body: dict[str, Any],
                   timeout: aiohttp.ClientTimeout | None = None) -> Any:
        """POST JSON, return the JSON answer (non-streaming). `timeout`: the session's
        (connect, and `stall_timeout_s` without a byte) when None; the body, once its
        headers came, must follow within `stall_timeout_s` and MAX_BODY_BYTES."""
        # Fix: `timeout=None` passed on to aiohttp means no timeout at all (its default
        # is a sentinel), so a server that accepted a prefill or a /tokenize and then
        # said nothing held the request forever; and `resp.read()` had no bound, so a
        # body trickled a byte at a time (each byte resets sock_read) never ended.
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            async with self.session.post(f"{self.base_url}{path}", data=orjson.dumps(body),
                                         headers={"Content-Type": "application/json"},
                                         **extra) as resp:
                try:
                    async with asyncio.timeout(self._stall_timeout_s):
                        raw = await _read_body(resp, MAX_BODY_BYTES)
                except TimeoutError as exc:
                    raise ServerFault(f"{path} of {self.base_url}: HTTP {resp.status}, its body "
                                      f"not whole after {self._stall_timeout_s:g} s") from exc
                _check(resp.status, raw)
                return orjson.loads(raw)
        except _TRANSPORT_ERRORS as exc:
            raise self._fault(path, exc) from exc
        except orjson.JSONDecodeError as exc:
            raise ServerFault(f"{path} of {self.base_url} answered no JSON") from exc

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]
                     ) -> AsyncIterator[tuple[aiohttp.ClientResponse,
                                              AsyncIterator[list[dict[str, Any]]]]]:
        """POST a streaming request; yields (response, its SSE objects in batches: what
        each read of the socket completed). Closing the
        response (cancel) drops the connection, and vLLM aborts the request."""
        url = f"{self.base_url}{path}"
        try:
            resp = await self.session.post(url, data=orjson.dumps(body),
                                           headers={"Content-Type": "application/json",
                                                    "Accept": "text/event-stream"})
        except _TRANSPORT_ERRORS as exc:
            raise self._fault(path, exc) from exc
        try:
            if resp.status != 200:
                _check(resp.status, await self._error_body(path, resp))
            yield resp, _guarded(event_batches(resp.content.iter_any()), self.base_url)
        finally:
            resp.close()  # not release(): a connection left mid-stream is never reused

    async def _error_body(self, path: str, resp: aiohttp.ClientResponse) -> bytes:
        """The start of an error answer's body. Fix: a 5xx whose body stalls raised
        aiohttp's own timeout error here, not ServerFault."""
        try:
            return await resp.content.read(_ERROR_BODY_BYTES)
        except _TRANSPORT_ERRORS as exc:
            raise ServerFault(f"{path} of {self.base_url}: HTTP {resp.status}, then "
                              f"{type(exc).__name__}: {exc}") from exc


async def _read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or ServerFault once it passes `limit` bytes."""
    parts: list[bytes] = []
    size = 0
    async for part in resp.content.iter_any():
        size += len(part)
        if size > limit:
            raise ServerFault(f"{resp.url}: answer larger than {limit} bytes")
        parts.append(part)
    return b"".join(parts)


def _check(status: int, body: bytes) -> None:
    if status == 200:
        return
    if status in _INPUT_STATUSES:
        raise ServerRefused(_message(status, body), status)
    raise ServerFault(_message(status, body))


async def _guarded(source: AsyncIterator[list[dict[str, Any]]], url: str
                   ) -> AsyncIterator[list[dict[str, Any]]]:
    """Transport errors while reading the stream, as ServerFault."""
    try:
        async for obj in source:
            yield obj
    except ServerProtocolError as exc:
        raise ServerFault(f"{url}: {exc}") from exc
    except (*_TRANSPORT_ERRORS, ValueError) as exc:  # ValueError: line too long
        raise ServerFault(f"{url}: stream broken: {type(exc).__name__}: {exc}") from exc


__all__ = ["ServerClient", "ServerFault", "ServerRefused"]
