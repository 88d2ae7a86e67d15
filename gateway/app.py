"""The OpenAI-compatible gateway: HTTP in, published Requests out, one NATS connection.

Routes: POST `/v1/chat/completions`, `/v1/completions` (JSON or SSE);
GET `/v1/models` (live, from heartbeats), `/health`, `/metrics`; `/v1/files`
and `/v1/batches` onto batch jobs (gateway/batches.py).

Every request first passes the guard (gateway/guard.py: exposure of /health
and /metrics, API key -> Caller, body size and time, per-key rate and open
requests); slow or huge headers are refused on the connection (gateway/conn.py).
One completion request then: body -> Request (gateway/openai_map.py), the key's
priority ceiling (403), a 404 for a model the fleet does not serve, then
`Client.submit` on the process's one shared Client, and the answer.

Promises:
- A stream's status waits for its first event, so a request the orchestrator
  sheds (ErrorReply overloaded) still gets HTTP 429 with Retry-After, as does
  one the request stream refuses at publish. An error after the 200 went out
  is one `data: {"error": ...}` event, then `data: [DONE]`.
- A client that goes away (or a request past `gateway.request_timeout_s`)
  cancels its request in the engine (`llm.cancel.<id>`), whether it was
  queued, running or streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cplane.client.sdk import (
    Client,
    Overloaded,
    RejectedAtPublish,
    RequestFailed,
    RequestHandle,
    new_request_id,
)
from cplane.gateway import openai_map as om
from cplane.gateway import sse
from cplane.gateway.batches import BatchApi
from cplane.gateway.conn import guarded_protocol
from cplane.gateway.guard import BodyRefused, Guard, caller_of, error_response
from cplane.gateway.limits import priority_allowed
from cplane.gateway.metrics import GatewayMetrics
from cplane.gateway.models import LiveModels, model_list
from cplane.schemas.messages import ErrorReply, Final
from cplane.schemas.settings import Settings

log = logging.getLogger("cplane.gateway")
_encode = msgspec.json.Encoder().encode
CLIENT_GONE = 499  # status recorded for a client that left before its answer (nginx's)


class _Json(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encode(content)


def _error(e: om.ApiError) -> Response:
    return _Json(e.body(), status_code=e.status, headers=e.headers())


class Gateway:
    """The HTTP handlers, over one Client (one NATS connection) shared by every request."""

    def __init__(self, settings: Settings, client: Client, models: LiveModels,
                 metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.cfg = settings.gateway
        self.client = client
        self.models = models
        self.metrics = metrics
        metrics.watch_quiet(client.quiet)
        self._bg: set[asyncio.Future[None]] = set()  # cancels in flight
        self.batches = BatchApi(client, settings)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            *self.batches.routes(),
        ]

    def app(self) -> Guard:
        """The ASGI app: the routes behind the guard. The two completion routes are
        called directly (`_fast`), the rest through Starlette's router."""
        routes = Starlette(routes=self.routes(), exception_handlers={
            HTTPException: _http_error, BodyRefused: self._body_refused})
        fast = {"/v1/chat/completions": om.Kind.CHAT, "/v1/completions": om.Kind.COMPLETION}

        async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
            kind = fast.get(scope["path"]) if scope["method"] == "POST" else None
            if kind is None:
                await routes(scope, receive, send)
            else:
                await self._fast(kind, scope, receive, send)

        return Guard(dispatch, self.cfg, self.metrics)

    async def _fast(self, kind: om.Kind, scope: Scope, receive: Receive, send: Send) -> None:
        """A completion without Starlette's middleware, which wraps every `send` (each
        SSE event) in two more layers: the handler and its answer, called directly."""
        request = HttpRequest(scope, receive)
        try:
            response = await self._openai(request, kind)
        except BodyRefused as exc:
            response = await self._body_refused(request, exc)
        await response(scope, receive, send)

    async def _body_refused(self, request: HttpRequest, exc: Exception) -> Response:
        """A body over its size or time (the guard's reader raised): 413 / 408, then close."""
        assert isinstance(exc, BodyRefused)
        self.metrics.refused_at_door.labels(exc.error.code or str(exc.error.status)).inc()
        return error_response(exc.error, close=True)

    async def close(self) -> None:
        await self.batches.close()
        if self._bg:
            await asyncio.wait(self._bg, timeout=5)

    # -- small endpoints -----------------------------------------------------
    async def health(self, request: HttpRequest) -> Response:
        ok = self.client.nc.is_connected
        live = self.models.live()
        body = {"status": "ok" if ok else "nats disconnected", "nats": ok,
                "workers": self.models.workers(), "models": sorted(live)}
        return _Json(body, status_code=200 if ok else 503)

    async def list_models(self, request: HttpRequest) -> Response:
        return _Json(model_list(self.models.live()))

    async def prometheus(self, request: HttpRequest) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    # -- completions ---------------------------------------------------------
    async def chat(self, request: HttpRequest) -> Response:
        return await self._openai(request, om.Kind.CHAT)

    async def completions(self, request: HttpRequest) -> Response:
        return await self._openai(request, om.Kind.COMPLETION)

    def _refuse(self, endpoint: str, e: om.ApiError) -> Response:
        self.metrics.requests.labels(endpoint, str(e.status)).inc()
        return _error(e)

    async def _openai(self, request: HttpRequest, kind: om.Kind) -> Response:
        t0 = time.perf_counter()
        endpoint = request.url.path
        caller = caller_of(request)
        body = await request.body()  # counted and timed by the guard
        mapped = om.parse(kind, body, request_id=new_request_id(), headers=request.headers,
                          tenant=caller.tenant, now_ms=time.time() * 1000, fresh_id=True)
        if isinstance(mapped, om.ApiError):
            return self._refuse(endpoint, mapped)
        ceiling = caller.policy.max_priority if caller.policy else None
        denied = priority_allowed(mapped.priority, ceiling)
        if denied:
            return self._refuse(endpoint, denied)
        err = om.model_error(mapped.request.model, frozenset(self.models.live()),
                             frozenset(self.models.ever))
        if err:
            return self._refuse(endpoint, err)
        return sse.Watched(partial(self._exchange, mapped, endpoint, t0),
                           on_gone=self.metrics.cancelled.inc)

    async def _exchange(self, m: om.Mapped, endpoint: str, t0: float, out: sse.Out) -> None:
        """Publish, wait, answer; whatever ends it early cancels the request in the engine."""
        rid = m.request.request_id
        try:
            handle = await self.client.submit(m.request, priority=m.priority,
                                              slo_class=m.slo_class)
        except Overloaded as exc:
            self.metrics.refused.inc()
            await self._answer_error(out, om.overloaded(str(exc), self.cfg.retry_after_s), endpoint)
            return
        except RejectedAtPublish as exc:
            await self._answer_error(out, om.ApiError(400, str(exc)), endpoint)
            return
        except Exception as exc:  # NATS down or JetStream not answering: retry later
            log.warning("%s: publish failed: %r", rid, exc)
            e = om.ApiError(503, f"the request queue did not take the request: {exc!r}",
                            type="service_unavailable", code="unavailable",
                            retry_after_s=om.retry_after_s(None, self.cfg.retry_after_s))
            await self._answer_error(out, e, endpoint)
            return
        finished = False
        self.metrics.in_flight.inc()
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                if m.stream:
                    finished = await self._stream(handle, m, endpoint, t0, out)
                else:
                    finished = await self._complete(handle, m, out)
        except TimeoutError:
            e = om.ApiError(504, f"no result within {self.cfg.request_timeout_s} s; cancelled",
                            type="timeout", code="timeout")
            await self._late_error(out, e)
        finally:
            self.metrics.in_flight.dec()
            handle.close()
            if not finished:
                self._cancel(rid)
            status = str(out.status if out.status is not None else CLIENT_GONE)
            self.metrics.requests.labels(endpoint, status).inc()
            self.metrics.latency.labels(endpoint, str(m.stream).lower()).observe(
                time.perf_counter() - t0)

    async def _answer_error(self, out: sse.Out, e: om.ApiError, endpoint: str) -> None:
        self.metrics.requests.labels(endpoint, str(e.status)).inc()
        await out.json(e.status, e.body(), e.headers())

    async def _late_error(self, out: sse.Out, e: om.ApiError) -> None:
        """An error as a status when none went out yet, else as the stream's last event."""
        if not out.started:
            await out.json(e.status, e.body(), e.headers())
        elif out.status == 200:
            await out.body(sse.event(om.StreamMapper.error(e)) + sse.DONE, more=False)

    def _error_of(self, reply: ErrorReply) -> om.ApiError:
        e = om.error_of(reply, self.cfg.retry_after_s)
        if e.status == 429:
            self.metrics.refused.inc()
        return e

    async def _complete(self, handle: RequestHandle, m: om.Mapped, out: sse.Out) -> bool:
        term = await handle.terminal()
        if isinstance(term, ErrorReply):
            e = self._error_of(term)
            await out.json(e.status, e.body(), e.headers())
        else:
            await out.json(200, om.completion(m, term, int(time.time())),
                           {"x-request-id": m.request.request_id})
        return True

    async def _stream(self, handle: RequestHandle, m: om.Mapped, endpoint: str, t0: float,
                      out: sse.Out) -> bool:
        """SSE: the status waits for the first event (so a shed request still gets 429)."""
        chunks = aiter(handle)
        try:
            first = await anext(chunks, None)
        except RequestFailed as exc:
            e = self._error_of(exc.error)
            await out.json(e.status, e.body(), e.headers())
            return True
        mapper = om.StreamMapper(m, int(time.time()))
        headers = {**sse.SSE_HEADERS, "x-request-id": m.request.request_id}
        await out.start(200, sse.SSE_TYPE, headers)
        self.metrics.open_streams.inc()
        try:
            if first is not None:
                await out.body(sse.event(mapper.chunk(first)))
                self.metrics.ttft.labels(endpoint).observe(time.perf_counter() - t0)
                try:
                    async for chunk in chunks:
                        # What has arrived meanwhile goes in the same write: one event
                        # per chunk still, one send for all of them.
                        await out.body(sse.events(mapper.chunk(c)
                                                  for c in (chunk, *handle.ready())))
                except RequestFailed as exc:
                    await self._late_error(out, self._error_of(exc.error))
                    return True
            term = await handle.terminal()
            if isinstance(term, ErrorReply):
                await self._late_error(out, self._error_of(term))
                return True
            await out.body(self._final_events(mapper, term) + sse.DONE, more=False)
            return True
        finally:
            self.metrics.open_streams.dec()

    @staticmethod
    def _final_events(mapper: om.StreamMapper, final: Final) -> bytes:
        return sse.events(mapper.final(final))

    def _cancel(self, request_id: str) -> None:
        """Cancel in the engine, from a task of its own (the caller may be cancelled)."""
        fut = asyncio.ensure_future(self._send_cancel(request_id))
        self._bg.add(fut)
        fut.add_done_callback(self._bg.discard)

    async def _send_cancel(self, request_id: str) -> None:
        try:
            await self.client.cancel(request_id)
        except Exception as exc:  # the connection is down: the request runs out its course
            log.warning("%s: could not cancel: %s", request_id, exc)


async def _http_error(request: HttpRequest, exc: Exception) -> Response:
    """404/405 and the like, OpenAI-shaped."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return _error(om.ApiError(status, f"{request.method} {request.url.path}: {detail}",
                              code=str(status)))


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: `cplane gateway`'s stop event ends it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 = a free one; read it from getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


async def serve(settings: Settings, sock: socket.socket, stop: asyncio.Event) -> None:
    """Run the gateway on `sock` until `stop` is set; open streams get 5 s to finish."""
    client = await Client.connect(settings.nats.url, settings, default_timeout_s=None)
    models = LiveModels(client.nc, settings)
    gw = Gateway(settings, client, models, GatewayMetrics())
    try:
        await models.start()
        cfg = settings.gateway
        protocol = guarded_protocol(cfg.header_timeout_s, cfg.max_header_bytes)
        config = uvicorn.Config(gw.app(), http=protocol, lifespan="off", access_log=False,
                                log_level="warning", timeout_graceful_shutdown=5,
                                timeout_keep_alive=max(1, math.ceil(cfg.keep_alive_timeout_s)),
                                backlog=4096, ssl_certfile=cfg.tls_cert,
                                ssl_keyfile=cfg.tls_key)
        server = _Server(config)
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        server.should_exit = True
        await task
    finally:
        await models.stop()
        await gw.close()
        await client.close()
