"""`cplane policy`: a runtime switch that every replica follows and a restart keeps.

Real nats-server; in-process orchestrator replicas on the test's event loop;
the CLI as a subprocess (asyncio's, so the replicas keep answering meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

from cplane.bus.server import EmbeddedNats, free_port
from cplane.client.admin import Admin, NoOrchestrator
from cplane.orchestrator import plugins
from cplane.orchestrator.runtime_config import POLICY_KEY
from cplane.orchestrator.service import Orchestrator
from cplane.schemas.admin import PolicyState
from cplane.schemas.settings import Settings
from tests.natsfix import isolated_settings
from tests.stack import Running, _start, stack
from tests.waiting import until


def _settings(nats_url: str) -> Settings:
    # Settings say priority: every switch below is away from what a replica starts with.
    return isolated_settings(nats_url, orchestrator={"policy": "priority",
                                                     "lease_renew_s": 0.2})


@pytest.fixture
async def conn(nats_url: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


async def _replicas(s: Settings, run: Running, n: int) -> list[Orchestrator]:
    orchs = [Orchestrator(s) for _ in range(n)]
    for o in orchs:
        await _start(o, run)
    return orchs


async def _stored(nc: NATS, s: Settings) -> KeyValue.Entry | None:
    kv = await nc.jetstream().key_value(s.subjects.config_bucket)
    try:
        return await kv.get(POLICY_KEY)
    except KeyNotFoundError:
        return None


def _in_force(o: Orchestrator) -> tuple[str, dict[str, object]]:
    return o.policy_name, dict(o.switches.policy.state.params)


async def test_a_switch_reaches_every_replica_within_a_second(nats_url: str, conn: NATS) -> None:
    s = _settings(nats_url)
    admin = Admin(conn, s)
    async with stack(s, workers=0, orchestrator=False) as run:
        orchs = await _replicas(s, run, 2)
        assert [o.policy_name for o in orchs] == ["priority", "priority"]
        before = [o.cfg.policy for o in orchs]

        reply = await admin.set_policy("fifo", by="test")
        t0 = time.monotonic()
        assert reply.ok and reply.state is not None
        assert (reply.state.name, reply.state.params, reply.state.by) == ("fifo", {}, "test")
        await until(lambda: all(o.policy_name == "fifo" for o in orchs), 1.0, "both follow")
        assert time.monotonic() - t0 < 1.0
        assert all(o.cfg.policy is not b for o, b in zip(orchs, before, strict=True))

        # Parameters travel too; the stored value is what `get` reports.
        reply = await admin.set_policy("priority", {"aging_s": 2.5}, by="test")
        assert reply.ok
        await until(lambda: all(_in_force(o) == ("priority", {"aging_s": 2.5}) for o in orchs),
                    1.0, "both follow the parameters")
        got = await admin.get_policy()
        assert got.ok and got.state == reply.state
        entry = await _stored(conn, s)
        assert entry is not None
        assert msgspec.json.decode(entry.value or b"", type=PolicyState) == reply.state
        assert got.router == s.orchestrator.router  # priority routes with the configured

        # A policy that brings its own router says so, and runs it.
        reply = await admin.set_policy("cost_optimized", by="test")
        assert reply.ok and reply.router == "cheapest"
        await until(lambda: all(o.cfg.router_in_use.name == "cheapest" for o in orchs), 1.0,
                    "both run the policy's router")
        assert (await admin.get_policy()).router == "cheapest"


async def test_a_restart_keeps_the_choice(nats_url: str, conn: NATS) -> None:
    s = _settings(nats_url)
    admin = Admin(conn, s)
    async with stack(s, workers=0, orchestrator=False) as run:
        (first,) = await _replicas(s, run, 1)
        assert (await admin.set_policy("fifo", by="test")).ok
        run.stops[first].set()
        await run.tasks[first]
        with pytest.raises(NoOrchestrator):  # nobody left to ask
            await Admin(conn, s, timeout_s=1.0).get_policy()

        (second,) = await _replicas(s, run, 1)  # its settings still say priority
        assert second.policy_name == "fifo"  # adopted before it was ready to lead
        got = await admin.get_policy()
        assert got.state is not None and (got.state.name, got.state.by) == ("fifo", "test")


async def test_unknown_policy_or_parameter_is_refused_with_the_choices(
        nats_url: str, conn: NATS) -> None:
    s = _settings(nats_url)
    admin = Admin(conn, s)
    async with stack(s, workers=0, orchestrator=False) as run:
        orchs = await _replicas(s, run, 2)
        before = [o.cfg.policy for o in orchs]

        reply = await admin.set_policy("no_such_policy")
        assert not reply.ok and reply.state is None
        assert reply.choices == plugins.names("policy") and "fifo" in reply.choices
        assert "no_such_policy" in reply.error and "fifo" in reply.error

        reply = await admin.set_policy("priority", {"bogus": 1})
        assert not reply.ok and "bogus" in reply.error
        assert "aging_s" in reply.param_choices and "aging_s" in reply.error

        reply = await admin.set_policy("priority", {"aging_s": "soon"})
        assert not reply.ok and "aging_s" in reply.error

        assert await _stored(conn, s) is None  # nothing stored
        got = await admin.get_policy()
        assert got.state is not None and (got.state.name, got.state.by) == ("priority", "settings")
        assert [o.cfg.policy for o in orchs] == before


async def test_garbage_in_the_bucket_is_ignored(nats_url: str, conn: NATS,
                                                caplog: pytest.LogCaptureFixture) -> None:
    s = _settings(nats_url)
    admin = Admin(conn, s)
    async with stack(s, workers=0, orchestrator=False) as run:
        orchs = await _replicas(s, run, 2)
        assert (await admin.set_policy("fifo")).ok
        await until(lambda: all(o.policy_name == "fifo" for o in orchs), 1.0, "fifo")
        kv = await conn.jetstream().key_value(s.subjects.config_bucket)
        caplog.clear()
        caplog.set_level(logging.INFO)

        await kv.put(POLICY_KEY, b"not json at all")
        await kv.put(POLICY_KEY, b'{"name": "lottery"}')
        await kv.put(POLICY_KEY, b'{"name": "priority", "params": {"bogus": 1}}')
        # A valid value after the garbage (the watch is ordered): the replicas follow it...
        await kv.put(POLICY_KEY, msgspec.json.encode(PolicyState(name="priority", by="kv")))
        await until(lambda: all(o.policy_name == "priority" for o in orchs), 1.0, "priority")
        # ...having ignored each bad value (one warning per value and replica), with no
        # switch on the way: the only switches are the two to priority.
        ignored = [r for r in caplog.records
                   if r.name == "cplane.policy_switch" and "ignoring" in r.getMessage()]
        switched = [r.getMessage() for r in caplog.records
                    if r.name == "cplane.orchestrator" and ": policy " in r.getMessage()]
        assert len(ignored) == 3 * len(orchs)
        assert len(switched) == len(orchs) and all("policy priority" in m for m in switched)
        await kv.put(POLICY_KEY, b'{"name": 7}')
        got = await admin.get_policy()
        assert got.ok and got.state is not None and got.state.name == "priority"
        assert all(not run.tasks[o].done() for o in orchs)

        # A deleted key means "back to the settings" (priority, as the settings say).
        assert (await admin.set_policy("fifo")).ok
        await until(lambda: all(o.policy_name == "fifo" for o in orchs), 1.0, "fifo again")
        await kv.delete(POLICY_KEY)
        await until(lambda: all(_in_force(o) == ("priority", {}) for o in orchs), 1.0,
                    "back to the settings")


async def _cli(s: Settings, *args: str) -> tuple[int, str, str]:
    env = dict(os.environ, CPLANE__NATS__PREFIX=s.nats.prefix, CPLANE_LOG_LEVEL="WARNING")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cplane.cli", "policy", *args, "--nats-url", s.nats.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_round_trip(nats_url: str, conn: NATS) -> None:
    s = _settings(nats_url)
    async with stack(s, workers=0, orchestrator=False) as run:
        orchs = await _replicas(s, run, 2)

        rc, out, err = await _cli(s, "set", "fifo")
        assert rc == 0, err
        assert out.startswith("policy: fifo {}")
        await until(lambda: all(o.policy_name == "fifo" for o in orchs), 1.0, "both follow")

        rc, out, err = await _cli(s, "set", "priority", "--param", "aging_s=4")
        assert rc == 0, err
        await until(lambda: all(_in_force(o) == ("priority", {"aging_s": 4}) for o in orchs),
                    1.0, "both follow the parameter")
        rc, out, err = await _cli(s, "get")
        assert rc == 0, err
        assert out.startswith('policy: priority {"aging_s": 4} (set by ')

        rc, out, err = await _cli(s, "set", "no_such_policy")
        assert rc == 2 and out == ""
        assert err.count("\n") == 1 and "no_such_policy" in err
        assert all(name in err for name in plugins.names("policy"))
        rc, out, err = await _cli(s, "set", "fifo", "--param", "bogus=1")
        assert rc == 2 and err.count("\n") == 1 and "bogus" in err
        assert all(o.policy_name == "priority" for o in orchs)

    # Every replica stopped: no answer is exit 1, in one line.
    rc, out, err = await _cli(s, "get", "--timeout", "1")
    assert rc == 1 and err.count("\n") == 1 and "no orchestrator" in err


async def test_replicas_follow_and_keep_the_choice_across_a_broker_restart(
        tmp_path: Path) -> None:
    """kill -9 of the broker: the stored choice survives (file storage), and each replica's
    watch comes back with its connection, so a switch made afterwards reaches both."""
    srv = EmbeddedNats(port=free_port(), store_dir=str(tmp_path)).start()
    nc = None
    try:
        s = _settings(srv.url)
        async with stack(s, workers=0, orchestrator=False) as run:
            orchs = await _replicas(s, run, 2)
            nc = await nats.connect(srv.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
            admin = Admin(nc, s, timeout_s=1.0)
            assert (await admin.set_policy("fifo")).ok
            await until(lambda: all(o.policy_name == "fifo" for o in orchs), 1.0, "fifo")

            srv.kill()
            srv.start()

            async def switched() -> bool:
                with contextlib.suppress(NoOrchestrator):  # until the replicas are back
                    return (await admin.set_policy("priority", {"aging_s": 3})).ok
                return False

            await until(switched, 30, "a replica answers after the restart")
            await until(lambda: all(_in_force(o) == ("priority", {"aging_s": 3}) for o in orchs),
                        10, "both follow after the restart")
            got = await admin.get_policy()
            assert got.state is not None and got.state.name == "priority"
    finally:
        if nc is not None:
            await nc.close()
        srv.stop()


async def test_a_replica_starts_through_a_503_on_its_watch(
        nats_url: str, conn: NATS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster electing answers JetStream API requests 503 for seconds: the watch of
    the stored choice (a consumer made by a request) is asked again, not the end of
    the replica's start-up (the cluster chaos run lost a replica so)."""
    s = _settings(nats_url)
    admin = Admin(conn, s)
    real = KeyValue.watch
    refused: list[str] = []

    async def unavailable_once(self: KeyValue, key: str, **kw: Any) -> Any:
        if not refused:
            refused.append(key)
            raise ServiceUnavailableError(code=503, err_code=10008,
                                          description="JetStream system temporarily unavailable")
        return await real(self, key, **kw)

    async with stack(s, workers=0, orchestrator=False) as run:
        await _replicas(s, run, 1)
        assert (await admin.set_policy("fifo", by="test")).ok
        monkeypatch.setattr(KeyValue, "watch", unavailable_once)
        (second,) = await _replicas(s, run, 1)  # its settings say priority
        assert refused and second.policy_name == "fifo"
