"""`cplane router`: a runtime router switch that every replica follows and a restart
keeps; a switch to a prefix router starts the KV-event feed that routes by the
engines' caches, and a switch away stops it.

Real nats-server; in-process orchestrator replicas on the test's event loop; sim
workers; the CLI in-process on a thread (its own event loop), so the replicas keep
answering meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError

from cplane.cli import main as cplane_main
from cplane.client.admin import Admin, NoOrchestrator
from cplane.client.control import ControlPlane
from cplane.client.sdk import Client
from cplane.orchestrator import plugins
from cplane.orchestrator.runtime_config import ROUTER_KEY
from cplane.orchestrator.service import Orchestrator
from cplane.schemas.admin import RouterState
from cplane.schemas.messages import Request
from cplane.schemas.settings import Settings
from cplane.workers.engines.base import EngineRequest
from cplane.workers.engines.sim import SimEngine
from tests.natsfix import isolated_settings
from tests.stack import Running, _start, stack
from tests.waiting import until

BLOCK = 16


def _settings(nats_url: str, **sections: dict[str, object]) -> Settings:
    # Settings say least_loaded: every switch below is away from what a replica starts with.
    orchestrator = {"router": "least_loaded", "policy": "priority", "lease_renew_s": 0.2,
                    **sections.pop("orchestrator", {})}
    return isolated_settings(nats_url, orchestrator=orchestrator, **sections)


@pytest.fixture
async def admin_conn(nats_url: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


async def _orchestrators(s: Settings, run: Running, n: int = 2) -> list[Orchestrator]:
    started = []
    while len(started) < n:
        started.append(Orchestrator(s))
        await _start(started[-1], run)
    return started


def _routing(orchs: list[Orchestrator]) -> set[tuple[str, str]]:
    """(set router, router in force) of each replica."""
    return {(o.cfg.router.name, o.cfg.router_in_use.name) for o in orchs}


async def _stored(nc: NATS, s: Settings) -> RouterState | None:
    kv = await nc.jetstream().key_value(s.subjects.config_bucket)
    try:
        return msgspec.json.decode((await kv.get(ROUTER_KEY)).value or b"", type=RouterState)
    except KeyNotFoundError:
        return None


async def test_a_switch_reaches_every_replica_and_get_tells_the_router_in_force(
        nats_url: str, admin_conn: NATS) -> None:
    s = _settings(nats_url)
    cp = ControlPlane(admin_conn, s)
    admin = Admin(admin_conn, s)
    async with stack(s, workers=0, orchestrator=False) as run:
        orchs = await _orchestrators(s, run)
        assert _routing(orchs) == {("least_loaded", "least_loaded")}
        got = await cp.get_router()
        assert got.ok and got.router == "least_loaded" and got.router_state is not None
        assert (got.router_state.name, got.router_state.by) == ("least_loaded", "settings")

        reply = await cp.update_router("load_balanced", {"load_weight": 0.9}, by="test")
        assert reply.ok and reply.router == "load_balanced" and reply.router_state is not None
        assert (reply.router_state.name, reply.router_state.params, reply.router_state.by) == (
            "load_balanced", {"load_weight": 0.9}, "test")
        await until(lambda: _routing(orchs) == {("load_balanced", "load_balanced")}, 1.0,
                    "both follow")
        assert all(o.switches.router.state == reply.router_state for o in orchs)
        assert (await cp.get_router()).router_state == reply.router_state
        assert await _stored(admin_conn, s) == reply.router_state
        assert (await admin.get_policy()).router == "load_balanced"  # policy get tells it too

        # A policy that brings its own router routes with it; the set router waits.
        assert (await admin.set_policy("cost_optimized", by="test")).router == "cheapest"
        await until(lambda: _routing(orchs) == {("load_balanced", "cheapest")}, 1.0,
                    "the policy's own router")
        got = await cp.get_router()
        assert got.router == "cheapest" and got.router_state == reply.router_state
        reply = await cp.update_router("random", by="test")
        assert reply.ok and reply.router == "cheapest"
        await until(lambda: _routing(orchs) == {("random", "cheapest")}, 1.0, "set, waiting")
        assert (await admin.set_policy("fifo", by="test")).router == "random"
        await until(lambda: _routing(orchs) == {("random", "random")}, 1.0, "the set router")


async def test_an_unknown_router_or_parameter_is_refused_and_nothing_is_stored(
        nats_url: str, admin_conn: NATS) -> None:
    s = _settings(nats_url)
    admin = Admin(admin_conn, s)
    async with stack(s, workers=0, orchestrator=False) as run:
        orchs = await _orchestrators(s, run)
        before = [o.cfg for o in orchs]

        reply = await admin.set_router("lottery")
        assert not reply.ok and reply.router_state is None
        assert reply.choices == plugins.names("router") and "round_robin" in reply.error
        reply = await admin.set_router("prefix_aware", {"bogus": 1})
        assert not reply.ok and "bogus" in reply.error and "slack" in reply.param_choices
        reply = await admin.set_router("prefix_aware", {"slack": "some"})
        assert not reply.ok and "slack" in reply.error

        assert await _stored(admin_conn, s) is None
        assert [o.cfg for o in orchs] == before
        got = await admin.get_router()
        assert got.router_state is not None and got.router_state.by == "settings"


async def test_a_restarted_replica_starts_with_the_stored_router_and_its_feed(
        nats_url: str, admin_conn: NATS) -> None:
    s = _settings(nats_url)
    cp = ControlPlane(admin_conn, s)
    async with stack(s, workers=0, orchestrator=False) as run:
        (first,) = await _orchestrators(s, run, 1)
        assert (await cp.update_router("prefix_aware", by="test")).ok
        await until(lambda: first._kv is not None, 5, "the feed of the first replica")
        run.stops[first].set()
        await run.tasks[first]
        assert first._kv is None  # stopped with its replica
        with pytest.raises(NoOrchestrator):  # nobody left to ask
            await Admin(admin_conn, s, timeout_s=1.0).get_router()

        # Its settings still say least_loaded: the stored router is adopted, and its
        # prefix inputs are running, before the replica is ready to lead.
        (second,) = await _orchestrators(s, run, 1)
        assert second.cfg.router_in_use.name == "prefix_aware"
        assert second._kv is not None and second._hasher is not None
        got = await cp.get_router()
        assert got.router_state is not None and got.router_state.by == "test"


def _prefix(tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(4 * BLOCK))  # four blocks of 16 words


async def _warm(engine: object, text: str) -> None:
    """Run a prompt on the engine itself: its cache holds the prefix, sent by nobody."""
    assert isinstance(engine, SimEngine)
    async for _ in engine.generate(EngineRequest(request_id=f"warm-{text[:8]}", prompt=text,
                                                 max_tokens=1, temperature=0.0)):
        pass


async def test_a_switch_to_a_prefix_router_starts_the_kv_feed_and_routes_by_it(
        nats_url: str, admin_conn: NATS) -> None:
    s = _settings(nats_url, sim={"zero_cost": True, "prefix_block_tokens": BLOCK},
                  worker={"kv_events_ms": 10.0},
                  orchestrator={"router": "round_robin", "prefix_tokenizer": "words",
                                "prefix_block_tokens": BLOCK, "policy": "fifo"})
    admin = Admin(admin_conn, s)
    homes = {_prefix("alpha"): "w0", _prefix("beta"): "w1"}
    async with stack(s, workers=2, orchestrator=False) as run:
        orchs = await _orchestrators(s, run)
        await until(lambda: all(o.registry.knows("w0") and o.registry.knows("w1")
                                for o in orchs), 10, "both workers heard")
        assert all(o._kv is None and o._hasher is None for o in orchs)
        # The caches fill while no replica listens to KV events: only the snapshots a
        # starting feed asks for can tell where the prefixes are.
        engines = {w.worker_id: w.engine for w in run.workers}
        for text, wid in homes.items():
            await _warm(engines[wid], text)

        assert (await admin.set_router("prefix_aware", by="test")).ok
        await until(lambda: all(o._kv is not None and o._kv.snapshots >= 2 for o in orchs),
                    10, "each replica's feed has both workers' caches")
        for o in orchs:
            hasher = o._hasher
            assert hasher is not None
            blocks = {t: hasher.blocks(Request(request_id="x", prompt=t)) for t in homes}
            assert all(o.core.state.prefix.match(w, blocks[t]) == 4 for t, w in homes.items())

        client = Client(await nats.connect(nats_url), s)
        try:
            # Twice each in a row: no rotation of the workers gets this right.
            for i, (text, wid) in enumerate(sorted([*homes.items(), *homes.items()])):
                handle = await client.submit(Request(request_id=f"px{i}", max_tokens=2,
                                                     prompt=text + " and a tail"))
                final = await handle.result(timeout=30)
                assert final.workers == [wid], (text[:8], final.workers)
                assert final.usage.cached_prompt_tokens >= 4 * BLOCK
        finally:
            await client.close()

        assert (await admin.set_router("round_robin", by="test")).ok
        await until(lambda: all(o._kv is None and o._hasher is None for o in orchs), 5,
                    "each replica stops its feed")


async def test_a_deleted_key_means_the_settings_and_garbage_is_ignored(
        nats_url: str, admin_conn: NATS, caplog: pytest.LogCaptureFixture) -> None:
    s = _settings(nats_url)
    admin = Admin(admin_conn, s)
    async with stack(s, workers=0, orchestrator=False) as run:
        orchs = await _orchestrators(s, run)
        assert (await admin.set_router("random")).ok
        await until(lambda: _routing(orchs) == {("random", "random")}, 1.0, "random")
        kv = await admin_conn.jetstream().key_value(s.subjects.config_bucket)
        caplog.clear()
        caplog.set_level(logging.INFO)

        for garbage in (b"not json", b'{"name": "lottery"}',
                        b'{"name": "prefix_aware", "params": {"bogus": 1}}'):
            await kv.put(ROUTER_KEY, garbage)
        # A valid value after the garbage (the watch is ordered): the replicas follow it,
        # having ignored each bad value (one warning per value and replica).
        await kv.put(ROUTER_KEY, msgspec.json.encode(RouterState(name="power_of_two", by="kv")))
        await until(lambda: _routing(orchs) == {("power_of_two", "power_of_two")}, 1.0,
                    "power_of_two")
        ignored = [r for r in caplog.records
                   if r.name == "cplane.router_switch" and "ignoring" in r.getMessage()]
        assert len(ignored) == 3 * len(orchs)
        assert all(not run.tasks[o].done() for o in orchs)
        await kv.put(ROUTER_KEY, b'{"name": 7}')  # get tells what is in force
        got = await admin.get_router()
        assert got.router_state is not None and got.router_state.name == "power_of_two"

        await kv.delete(ROUTER_KEY)
        await until(lambda: _routing(orchs) == {("least_loaded", "least_loaded")}, 1.0,
                    "back to the settings")
        got = await admin.get_router()
        assert got.router_state is not None and got.router_state.by == "settings"


async def _router_cli(s: Settings, capsys: pytest.CaptureFixture[str], *args: str
                      ) -> tuple[int, str, str]:
    """`cplane router ARGS` in this process, on a thread with its own event loop."""
    code = await asyncio.to_thread(cplane_main, ["router", *args, "--nats-url", s.nats.url])
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_round_trip(nats_url: str, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    s = _settings(nats_url)
    monkeypatch.setenv("CPLANE__NATS__PREFIX", s.nats.prefix)
    async with stack(s, workers=0, orchestrator=False) as run:
        orchs = await _orchestrators(s, run)

        code, out, err = await _router_cli(s, capsys, "set", "load_balanced",
                                           "--param", "kv-weight=0.5")
        assert code == 0, err
        assert out.startswith('router: load_balanced {"kv_weight": 0.5} (set by ')
        assert out.rstrip().endswith("in force: load_balanced")
        await until(lambda: _routing(orchs) == {("load_balanced", "load_balanced")}, 1.0,
                    "both follow")

        code, out, err = await _router_cli(s, capsys, "get", "--json")
        assert code == 0, err
        got = json.loads(out)
        assert (got["name"], got["params"], got["in_force"]) == (
            "load_balanced", {"kv_weight": 0.5}, "load_balanced")
        code, out, err = await _router_cli(s, capsys, "get")
        assert code == 0 and out.startswith('router: load_balanced {"kv_weight": 0.5}')

        code, out, err = await _router_cli(s, capsys, "set", "lottery")
        assert code == 2 and out == "" and err.count("\n") == 1 and "lottery" in err
        assert all(name in err for name in plugins.names("router"))
        code, out, err = await _router_cli(s, capsys, "set", "random", "--param", "bogus=1")
        assert code == 2 and err.count("\n") == 1 and "bogus" in err
        code, out, err = await _router_cli(s, capsys, "set", "random", "--param", "bogus")
        assert code == 2 and err.count("\n") == 1 and "KEY=VALUE" in err
        assert _routing(orchs) == {("load_balanced", "load_balanced")}

    # Every replica stopped: no answer is exit 1, in one line.
    code, out, err = await _router_cli(s, capsys, "get", "--timeout", "1")
    assert code == 1 and err.count("\n") == 1 and "no orchestrator" in err
