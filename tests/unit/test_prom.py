"""/metrics never takes a service down: a port taken meanwhile falls back to a free one."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from cplane.bus.prom import serve_metrics


async def test_a_taken_metrics_port_falls_back_to_a_free_one() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]

    async def snapshot() -> float:
        return 42.0

    def families(value: float) -> Iterator[Metric]:
        yield GaugeMetricFamily("cplane_test_value", "a test gauge", value=value)

    server = serve_metrics("127.0.0.1", port, snapshot, families)
    try:
        assert server.server_port != port
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        assert b"cplane_test_value 42.0" in body
    finally:
        server.shutdown()
        server.server_close()
        taken.close()
