"""`cplane workers` on a real nats-server: sim workers in-process, the CLI as users run it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import nats

from cplane.schemas.messages import Heartbeat, Role, WorkerState
from cplane.schemas.settings import Settings
from cplane.workers_cmd import HeartbeatCollector, health
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.waiting import until

IDS = ["wk-alpha", "wk-beta"]


async def _cli(s: Settings, *args: str, url: str | None = None) -> tuple[int, str, str]:
    env = dict(os.environ, CPLANE__NATS__PREFIX=s.nats.prefix, CPLANE_LOG_LEVEL="WARNING")
    env.pop("COLUMNS", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cplane.cli", "workers", *args, "--nats-url", url or s.nats.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _line(out: str, worker_id: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.split()[:1] == [worker_id]]
    assert len(lines) == 1, out
    return lines[0]


async def test_workers_table_and_json_show_each_worker_and_its_health(nats_url: str) -> None:
    s = isolated_settings(nats_url)
    async with stack(s, workers=[{"worker_id": i} for i in IDS], orchestrator=False) as run:
        t0 = time.monotonic()
        (rc, out, err), (jrc, jout, jerr) = await asyncio.gather(
            _cli(s), _cli(s, "--json", "--wait", "10"))
        assert rc == 0, err
        header = out.splitlines()[0].split()
        assert "health" in header and "state" in header and "held/cap" in header
        for wid in IDS:
            line = _line(out, wid)
            assert " ready " in line and " healthy " in line and "unhealthy" not in line
            assert "sim" in line and "0/" in line
        assert "2 worker(s), 2 healthy" in out
        # Every worker answers the request at once: well under the 10 s --wait.
        assert time.monotonic() - t0 < 8

        assert jrc == 0, jerr
        rows = json.loads(jout)
        assert [r["worker_id"] for r in rows] == IDS
        for r in rows:
            assert r["healthy"] is True and r["health"] == "healthy" and r["reason"] == ""
            assert r["state"] == "ready" and r["role"] == "unified" and r["engine"] == "sim"
            assert r["capacity"] == s.worker.capacity and r["heartbeat_age_s"] < 8

        # Unhealthy: still listed, with the reason; a stopped worker is gone.
        await run.workers[1]._become_unhealthy("test")
        await run.stop_worker(run.workers[0])
        rc, out, err = await _cli(s)
        assert rc == 0, err
        assert IDS[0] not in out
        line = _line(out, IDS[1])
        assert "unhealthy (state unhealthy)" in line and " healthy " not in line
        assert "1 worker(s), 0 healthy" in out


async def test_a_worker_stopping_while_listed_shows_stopped(nats_url: str) -> None:
    s = isolated_settings(nats_url)
    nc = await nats.connect(nats_url)
    try:
        async with stack(s, workers=[{"worker_id": i} for i in IDS],
                         orchestrator=False) as run:
            collector = HeartbeatCollector(nc, s.subjects)
            await collector.start()
            await until(lambda: set(collector.seen) == set(IDS), 5, "both answer")
            await run.stop_worker(run.workers[0])
            await until(lambda: collector.seen[IDS[0]].hb.state is WorkerState.STOPPED, 5,
                        "the stopped heartbeat")
            await collector.stop()
            rows = {r.worker_id: r for r in collector.rows(s.orchestrator.worker_timeout_s)}
            assert rows[IDS[0]].healthy is False and rows[IDS[0]].reason == "state stopped"
            assert rows[IDS[1]].healthy is True
    finally:
        await nc.close()


def test_health_needs_ready_and_a_fresh_heartbeat() -> None:
    hb = Heartbeat(worker_id="w", role=Role.UNIFIED, models=["m"], engine="sim", capacity=4)
    assert health(hb, 0.2, 3.5) == (True, "")
    assert health(hb, 7.4, 3.5) == (False, "no heartbeat for 7 s")
    for state in (WorkerState.DRAINING, WorkerState.UNHEALTHY, WorkerState.STOPPED):
        draining = Heartbeat(worker_id="w", role=Role.UNIFIED, models=[], engine="sim",
                             capacity=4, state=state)
        assert health(draining, 0.0, 3.5) == (False, f"state {state.value}")


async def test_no_workers_or_no_broker_is_exit_1_in_one_line(nats_url: str) -> None:
    s = isolated_settings(nats_url)
    (rc, out, err), (jrc, jout, jerr), (nrc, nout, nerr) = await asyncio.gather(
        _cli(s, "--wait", "0.3"), _cli(s, "--wait", "0.3", "--json"),
        _cli(s, url="nats://127.0.0.1:1"))
    assert rc == 1 and out == "" and err == "cplane workers: no workers answered within 0.3 s\n"
    assert jrc == 1 and json.loads(jout) == [] and err == jerr
    assert nrc == 1 and nout == "" and nerr.count("\n") == 1
    assert "cannot reach NATS at nats://127.0.0.1:1" in nerr and "Traceback" not in nerr
