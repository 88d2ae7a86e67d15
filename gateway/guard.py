"""The gateway's door: one ASGI layer in front of every route (pure policy in limits.py).

Per HTTP request, in order:
1. `/health` and `/metrics` answer 404 when not exposed; `/metrics` wants a
   valid key when `metrics_require_key` (and keys are configured).
2. `/v1/*`: the API key -> a `Caller` (401 without a valid one), put in the
   scope for the handlers (`caller_of`).
3. A declared Content-Length over the limit: 413 before a byte is read.
4. The key's token bucket (429 + Retry-After), then a slot among the open
   requests, per key and overall (429 + Retry-After). The slot is held until
   the handler returns, that is until the last byte of the answer went out.
   Paths outside /v1/ (/health, /metrics) take no slot: probes still answer
   when the gateway is full.
5. The body is counted as it arrives: past the limit the read stops and the
   answer is 413; a body slower than its timeout gets 408. Both close the
   connection, so the rest of the body is never read.

Slow headers are the connection's business, before any of this: gateway/conn.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from starlette.datastructures import Headers
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cplane.gateway import limits
from cplane.gateway.auth import OPEN, Caller, caller_for, key_book
from cplane.gateway.limits import BodyLimit, TokenBucket
from cplane.gateway.metrics import GatewayMetrics
from cplane.gateway.openai_map import ApiError
from cplane.schemas.settings import GatewaySettings

_encode = msgspec.json.Encoder().encode
CALLER = "cplane.caller"  # the scope["state"] key of the request's Caller
CLOSE = {"connection": "close"}


class BodyRefused(Exception):
    """Raised from `receive` when a body passes its limit or its time: the handler's
    read stops there and the app answers `error` (gateway/app.py)."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def error_response(e: ApiError, close: bool = False) -> Response:
    """An OpenAI-shaped error; `close` ends the connection after it (a body left unread)."""
    headers = {**e.headers(), **(CLOSE if close else {})}
    return Response(_encode(e.body()), status_code=e.status, headers=headers,
                    media_type="application/json")


def caller_of(request: HttpRequest) -> Caller:
    """The Caller the guard admitted this request as (OPEN outside /v1/)."""
    found = request.scope.get("state", {}).get(CALLER)
    return found if isinstance(found, Caller) else OPEN


class MeteredReceive:
    """An ASGI `receive` that counts body bytes and watches the clock.

    The body's time starts at the handler's first read; once the body ended
    (or the client left) messages pass through untouched, so a handler that
    watches for `http.disconnect` afterwards is not timed.
    """

    def __init__(self, receive: Receive, limit: BodyLimit) -> None:
        self.receive = receive
        self.limit = limit
        self.seen = 0
        self.done = False
        self.deadline: float | None = None

    async def __call__(self) -> Message:
        if self.done:
            return await self.receive()
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.limit.timeout_s
        try:
            async with asyncio.timeout(self.deadline - now):
                message = await self.receive()
        except TimeoutError:
            raise BodyRefused(limits.too_slow(self.limit.timeout_s)) from None
        if message["type"] != "http.request":
            self.done = True
            return message
        self.seen += len(message.get("body", b""))
        if self.seen > self.limit.max_bytes:
            raise BodyRefused(limits.too_large(self.limit.max_bytes))
        self.done = not message.get("more_body", False)
        return message


class Slots:
    """Rate buckets and open-request counts of one gateway process (decisions: limits.py)."""

    def __init__(self, cfg: GatewaySettings) -> None:
        self.cfg = cfg
        self.open_total = 0
        self.open_by_key: dict[str, int] = {}
        self.buckets: dict[str, TokenBucket] = {}

    def enter(self, caller: Caller, now_s: float) -> ApiError | None:
        """Take a slot for the caller (None), or the refusal; a refused call takes none."""
        policy = caller.policy
        key = caller.key
        if key is not None and policy is not None and policy.max_rps:
            self.buckets[key], wait = limits.take(self.buckets.get(key), policy.max_rps, now_s)
            if wait > 0:
                return limits.rate_limited(wait, policy.max_rps)
        key_cap = None
        if key is not None:
            key_cap = (policy.max_in_flight if policy and policy.max_in_flight
                       else self.cfg.max_streams_per_key)
        err = limits.admit(self.open_by_key.get(key or "", 0), self.open_total,
                           key_cap=key_cap, total_cap=self.cfg.max_streams,
                           retry_after_s=self.cfg.retry_after_s)
        if err:
            return err
        self.open_total += 1
        if key is not None:
            self.open_by_key[key] = self.open_by_key.get(key, 0) + 1
        return None

    def leave(self, caller: Caller) -> None:
        self.open_total -= 1
        key = caller.key
        if key is not None:
            left = self.open_by_key.get(key, 1) - 1
            if left:
                self.open_by_key[key] = left
            else:
                self.open_by_key.pop(key, None)


class Guard:
    """The ASGI layer around the gateway's Starlette app."""

    def __init__(self, app: ASGIApp, cfg: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.app = app
        self.cfg = cfg
        self.metrics = metrics
        self.book = key_book(cfg.api_keys, cfg.api_key_policies)
        self.slots = Slots(cfg)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = Headers(scope=scope)
        refusal = self._exposure(path, headers)
        if refusal is not None:
            await self._refuse(refusal, scope, receive, send)
            return
        c = self.cfg
        limit = limits.body_limit(scope["method"], path, max_body_bytes=c.max_body_bytes,
                                  max_file_bytes=c.max_file_bytes,
                                  body_timeout_s=c.body_timeout_s,
                                  upload_timeout_s=c.upload_timeout_s)
        metered = MeteredReceive(receive, limit)
        if not path.startswith("/v1/"):  # probes, and 404s: no key, no slot
            await self.app(scope, metered, send)
            return
        caller = caller_for(headers.get("authorization"), self.book)
        if isinstance(caller, ApiError):
            await self._refuse(caller, scope, receive, send)
            return
        err = limits.declared_size(headers.get("content-length"), limit.max_bytes)
        if err is not None:
            await self._refuse(err, scope, receive, send, close=True)
            return
        err = self.slots.enter(caller, time.monotonic())
        if err is not None:
            await self._refuse(err, scope, receive, send)
            return
        self.metrics.open_requests.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.slots.leave(caller)
                self.metrics.open_requests.dec()

        async def sending(message: Message) -> None:
            # The slot is free once the response's last bytes are handed over, not when
            # the app returns (it may still clean up): a client that sends its next
            # request on seeing the end must not find this one still open.
            if message["type"] == "http.response.body" and not message.get("more_body"):
                release()
            await send(message)

        try:
            state: dict[str, Any] = scope.setdefault("state", {})
            state[CALLER] = caller
            await self.app(scope, metered, sending)
        finally:
            release()

    def _exposure(self, path: str, headers: Headers) -> ApiError | None:
        hidden = ApiError(404, f"{path}: Not Found", code="404")
        if path == "/health" and not self.cfg.expose_health:
            return hidden
        if path == "/metrics":
            if not self.cfg.expose_metrics:
                return hidden
            if self.cfg.metrics_require_key:
                found = caller_for(headers.get("authorization"), self.book)
                if isinstance(found, ApiError):
                    return found
        return None

    async def _refuse(self, e: ApiError, scope: Scope, receive: Receive, send: Send,
                      close: bool = False) -> None:
        self.metrics.refused_at_door.labels(e.code or str(e.status)).inc()
        await error_response(e, close)(scope, receive, send)
