"""The probes' endpoints on a real nats-server (bus/prom.py): `/healthz` and `/readyz`
on the metrics port of an orchestrator and of workers, what the Kubernetes
manifests' httpGet probes ask (deploy/k8s)."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import msgspec
import nats

from cplane.bus.provision import ensure_all
from cplane.schemas.settings import Settings
from cplane.workers.engines.base import EngineDeadError
from tests.live.test_worker_faults import FAST, Fleet, item, put
from tests.live.test_worker_health import FailingEngine
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.waiting import until


def _metered(url: str) -> Settings:
    s = isolated_settings(url, worker=FAST)
    return msgspec.structs.replace(s, metrics=msgspec.structs.replace(
        s.metrics, orchestrator_port=-1, worker_port=-1))


async def _get(port: int, path: str) -> tuple[int, str]:
    """Status and body; in a thread, since the server asks this test's loop."""
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    return await asyncio.to_thread(fetch)


async def test_orchestrator_and_worker_are_alive_and_ready(nats_url: str) -> None:
    async with stack(_metered(nats_url), workers=1) as run:
        assert run.orchestrator is not None
        ports = [run.orchestrator.control.metrics_port, run.workers[0].control.metrics_port]
        for port in ports:
            assert await _get(port, "/healthz") == (200, "alive\n")
            assert await _get(port, "/readyz") == (200, "ready\n")
        status, body = await _get(ports[0], "/metrics")
        assert status == 200 and "cplane_orchestrator_leader" in body
        status, body = await _get(ports[1], "/metrics")
        assert status == 200 and "cplane_worker_healthy" in body


async def test_a_worker_whose_engine_died_is_alive_but_not_ready(nats_url: str) -> None:
    s = _metered(nats_url)
    nc = await nats.connect(nats_url)
    try:
        await ensure_all(nc.jetstream(), s)  # no orchestrator here
        f = Fleet(s)
        try:
            sick = await f.start("sick", FailingEngine(s, EngineDeadError("gone")))
            port = sick.control.metrics_port
            assert await _get(port, "/readyz") == (200, "ready\n")
            await put(nc.jetstream(), s, item("r1", 5), target="sick")

            async def unready() -> bool:
                return (await _get(port, "/readyz")) == (503, "worker unhealthy\n")

            await until(unready, 10, "/readyz answers 503 once the engine died")
            # Alive: its loop answers; it hands its work back and waits to be replaced.
            assert await _get(port, "/healthz") == (200, "alive\n")
        finally:
            await f.close()
    finally:
        await nc.close()


async def test_a_worker_without_nats_is_not_ready(nats_url: str) -> None:
    s = _metered(nats_url)
    nc = await nats.connect(nats_url)
    try:
        await ensure_all(nc.jetstream(), s)
        f = Fleet(s)
        try:
            w = await f.start("cut")
            port = w.control.metrics_port
            assert await _get(port, "/readyz") == (200, "ready\n")
            await f.running[0].nc.close()  # its connection (no reconnect) is gone

            async def unready() -> bool:
                return (await _get(port, "/readyz")) == (503, "not connected to NATS\n")

            await until(unready, 10, "/readyz answers 503 without a connection")
            assert await _get(port, "/healthz") == (200, "alive\n")
        finally:
            await f.close()
    finally:
        await nc.close()
