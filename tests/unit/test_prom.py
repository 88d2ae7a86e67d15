"""/metrics never takes a service down: a port taken meanwhile falls back to a free one;
/healthz and /readyz answer from the service's event loop (bus/prom.py)."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric

from cplane.bus.prom import HealthApp, serve_metrics


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


# -- /healthz and /readyz: the dispatcher in front of the metrics app ---------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A service's event loop, running in its own thread (the probes come from others)."""
    lp = asyncio.new_event_loop()
    thread = threading.Thread(target=lp.run_forever, daemon=True)
    thread.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    thread.join(5)
    lp.close()


def _get(app: HealthApp, path: str) -> tuple[str, str]:
    got: list[str] = []
    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"},
                        lambda status, headers, exc_info=None: got.append(status)))
    return got[0], body.decode()


def _metrics_app(environ: dict[str, object], start_response: object) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
    return [b"metrics\n"]


def test_probes_answer_from_the_loop_and_the_rest_is_metrics(
        loop: asyncio.AbstractEventLoop) -> None:
    why: list[str | None] = ["not connected to NATS"]

    async def not_ready() -> str | None:
        assert asyncio.get_running_loop() is loop  # the check runs on the service's loop
        return why[0]

    app = HealthApp(_metrics_app, loop, not_ready, timeout_s=5)
    assert _get(app, "/healthz") == ("200 OK", "alive\n")
    assert _get(app, "/readyz") == ("503 Service Unavailable", "not connected to NATS\n")
    why[0] = None
    assert _get(app, "/readyz") == ("200 OK", "ready\n")
    assert _get(app, "/metrics") == ("200 OK", "metrics\n")


def test_a_blocked_loop_is_neither_alive_nor_ready(loop: asyncio.AbstractEventLoop) -> None:
    app = HealthApp(_metrics_app, loop, None, timeout_s=0.2)
    assert _get(app, "/readyz")[0] == "200 OK"  # no check given: ready when the loop answers
    released = threading.Event()
    loop.call_soon_threadsafe(released.wait, 10)  # a blocking call on the loop
    try:
        status, body = _get(app, "/healthz")
        assert status == "503 Service Unavailable"
        assert body == "event loop did not answer within 0.2 s\n"
        assert _get(app, "/readyz")[0] == "503 Service Unavailable"
    finally:
        released.set()
    assert _get(HealthApp(_metrics_app, loop, None, timeout_s=5), "/healthz")[0] == "200 OK"


def test_a_failing_check_or_a_closed_loop_is_not_ready() -> None:
    lp = asyncio.new_event_loop()
    lp.close()
    status, body = _get(HealthApp(_metrics_app, lp, None, timeout_s=1), "/healthz")
    assert status == "503 Service Unavailable" and body.startswith("check failed: RuntimeError")


async def test_the_probes_are_served_beside_metrics() -> None:
    async def snapshot() -> float:
        return 1.0

    def families(value: float) -> Iterator[Metric]:
        yield GaugeMetricFamily("cplane_test_value", "a test gauge", value=value)

    async def not_ready() -> str | None:
        return "worker draining"

    server = serve_metrics("127.0.0.1", -1, snapshot, families, not_ready)

    def fetch(path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{server.server_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    try:
        assert await asyncio.to_thread(fetch, "/healthz") == (200, b"alive\n")
        assert await asyncio.to_thread(fetch, "/readyz") == (503, b"worker draining\n")
        status, body = await asyncio.to_thread(fetch, "/metrics")
        assert status == 200 and b"cplane_test_value 1.0" in body
    finally:
        server.shutdown()
        server.server_close()
