"""`/metrics` over HTTP for a service whose figures live on its event loop.

Each scrape asks the loop for a fresh report (in a thread-safe call) and turns
it into metric families with the service's own function: the services record
into plain stats objects and only their metrics module knows Prometheus.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger("cplane.metrics")
SCRAPE_TIMEOUT_S = 5.0
R = TypeVar("R")


class ReportCollector(Collector, Generic[R]):
    """Asks the service's event loop for a fresh report at each scrape."""

    def __init__(self, snapshot: Callable[[], Awaitable[R]],
                 families: Callable[[R], Iterator[Metric]],
                 loop: asyncio.AbstractEventLoop) -> None:
        self._snapshot = snapshot
        self._families = families
        self._loop = loop

    def collect(self) -> Iterator[Metric]:
        async def take() -> R:
            return await self._snapshot()

        try:
            report = asyncio.run_coroutine_threadsafe(take(), self._loop).result(
                SCRAPE_TIMEOUT_S)
        except Exception as exc:  # the loop is busy or gone: an empty scrape, not a crash
            log.warning("metrics scrape failed: %r", exc)
            return
        yield from self._families(report)


def serve_metrics(host: str, port: int, snapshot: Callable[[], Awaitable[R]],
                  families: Callable[[R], Iterator[Metric]]) -> WSGIServer:
    """Serve `/metrics` on `host:port` (-1: any free port) in a daemon thread.

    A port taken meanwhile (chosen free by `cplane up`, then grabbed by another
    process, e.g. an engine's own sockets) falls back to any free one, logged:
    a service never dies for its metrics port (`server.server_port` says which)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReportCollector(snapshot, families, asyncio.get_running_loop()))
    try:
        server, _ = start_http_server(max(0, port), addr=host, registry=registry)
    except OSError as exc:
        if port <= 0:
            raise
        log.warning("metrics port %d unavailable (%s): using a free one", port, exc)
        server, _ = start_http_server(0, addr=host, registry=registry)
    return server


__all__ = ["ReportCollector", "serve_metrics"]
