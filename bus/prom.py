"""`/metrics`, `/healthz` and `/readyz` over HTTP for a service whose state lives on
its event loop.

Each scrape asks the loop for a fresh report (in a thread-safe call) and turns
it into metric families with the service's own function: the services record
into plain stats objects and only their metrics module knows Prometheus.

The two probes take the same path into the loop, from the server's thread:

- `/healthz` (liveness): the event loop ran a no-op within `HEALTH_TIMEOUT_S`.
  Nothing else: a service that lost NATS is alive and reconnecting, and a
  restart would not help it; a loop stuck in a blocking call or a busy loop
  does not answer, and a restart is the cure.
- `/readyz` (readiness): the service's own `NotReady` check, run on the loop,
  found nothing wrong (200 `ready`), else 503 and its reason. A loop that does
  not answer is not ready either.

Both answer `text/plain`, 200 or 503; every other path is the metrics app's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import make_wsgi_app
from prometheus_client.core import Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger("cplane.metrics")
SCRAPE_TIMEOUT_S = 5.0
# Below the manifests' probe timeoutSeconds (5 s), so the kubelet reads our 503.
HEALTH_TIMEOUT_S = 3.0
LIVE_PATH, READY_PATH = "/healthz", "/readyz"
R = TypeVar("R")
# Why the service is not ready, or None when it is. Runs on the service's loop.
NotReady = Callable[[], Awaitable[str | None]]


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], Awaitable[R]],
            timeout_s: float) -> R:
    """Run `fn()` on `loop` from another thread; its result, or raise (TimeoutError
    when the loop did not finish it within `timeout_s`, RuntimeError when closed)."""
    async def call() -> R:
        return await fn()

    coro = call()
    try:
        future = asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError:
        coro.close()  # never scheduled: no "was never awaited" warning
        raise
    try:
        return future.result(timeout_s)
    finally:
        future.cancel()  # a late answer is dropped, not left running


class ReportCollector(Collector, Generic[R]):
    """Asks the service's event loop for a fresh report at each scrape."""

    def __init__(self, snapshot: Callable[[], Awaitable[R]],
                 families: Callable[[R], Iterator[Metric]],
                 loop: asyncio.AbstractEventLoop) -> None:
        self._snapshot = snapshot
        self._families = families
        self._loop = loop

    def collect(self) -> Iterator[Metric]:
        try:
            report = on_loop(self._loop, self._snapshot, SCRAPE_TIMEOUT_S)
        except Exception as exc:  # the loop is busy or gone: an empty scrape, not a crash
            log.warning("metrics scrape failed: %r", exc)
            return
        yield from self._families(report)


async def _nothing() -> None:
    return None


class HealthApp:
    """WSGI: `/healthz` and `/readyz` answered here, every other path by `metrics`."""

    def __init__(self, metrics: WSGIApplication, loop: asyncio.AbstractEventLoop,
                 not_ready: NotReady | None = None,
                 timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        self._metrics = metrics
        self._loop = loop
        self._not_ready = not_ready
        self._timeout_s = timeout_s

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == LIVE_PATH:
            return _answer(start_response, self._ask(_nothing), "alive")
        if path == READY_PATH:
            return _answer(start_response, self._ask(self._not_ready or _nothing), "ready")
        return self._metrics(environ, start_response)

    def _ask(self, check: NotReady) -> str | None:
        """What `check` says on the loop; the loop's silence or error as a reason."""
        try:
            return on_loop(self._loop, check, self._timeout_s)
        except TimeoutError:
            return f"event loop did not answer within {self._timeout_s:g} s"
        except Exception as exc:  # a closed loop, a failing check: not healthy, and say why
            return f"check failed: {exc!r}"


def _answer(start_response: StartResponse, why_not: str | None, ok: str) -> list[bytes]:
    status = "200 OK" if why_not is None else "503 Service Unavailable"
    body = f"{ok if why_not is None else why_not}\n".encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [body]


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape or probe."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def _start(host: str, port: int, app: WSGIApplication) -> WSGIServer:
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family  # IPv6 hosts too

    server = make_server(str(sockaddr[0]), port, app, Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def serve_metrics(host: str, port: int, snapshot: Callable[[], Awaitable[R]],
                  families: Callable[[R], Iterator[Metric]],
                  not_ready: NotReady | None = None) -> WSGIServer:
    """Serve `/metrics`, `/healthz` and `/readyz` on `host:port` (-1: any free port)
    in a daemon thread; called on the service's running loop, which they all ask.

    A port taken meanwhile (chosen free by `cplane up`, then grabbed by another
    process, e.g. an engine's own sockets) falls back to any free one, logged:
    a service never dies for its metrics port (`server.server_port` says which)."""
    loop = asyncio.get_running_loop()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReportCollector(snapshot, families, loop))
    app = HealthApp(make_wsgi_app(registry), loop, not_ready)
    try:
        return _start(host, max(0, port), app)
    except OSError as exc:
        if port <= 0:
            raise
        log.warning("metrics port %d unavailable (%s): using a free one", port, exc)
        return _start(host, 0, app)


__all__ = ["HEALTH_TIMEOUT_S", "LIVE_PATH", "READY_PATH", "HealthApp", "NotReady",
           "ReportCollector", "on_loop", "serve_metrics"]
