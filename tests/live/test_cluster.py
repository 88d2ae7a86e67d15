"""cplane on a 3-node JetStream cluster (bus/cluster.py): R3 provisioning, what an ack
means, and `cplane up --cluster 3` serving while any one node is killed -9.

The chaos run of the cluster (faults under load, figures) is tests/chaos, marker `cluster`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import RetentionPolicy, StreamConfig

from cplane.bus.cluster import EmbeddedCluster
from cplane.bus.provision import StreamWeakeningError, ensure_all
from cplane.bus.server import EmbeddedNats
from cplane.bus.stream_config import store_configs, stream_configs
from cplane.client.sdk import Client
from cplane.schemas.messages import Final, Request
from cplane.schemas.settings import Settings
from cplane.stack import Stack, StackSpec
from tests.natsfix import isolated_settings

T = TypeVar("T")


async def eventually(get: Callable[[], Awaitable[T]], holds: Callable[[T], bool],
                     timeout_s: float, what: str) -> T:
    """Ask `get()` until `holds` its answer (asking may fail while a leader is elected)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: object = None
    while True:
        try:
            last = await get()
            if holds(last):  # type: ignore[arg-type]
                return last  # type: ignore[return-value]
        except Exception as exc:  # a timeout or "no leader" while the cluster elects
            last = exc
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s (last: {last!r})")
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(3, max_file_store="64T") as c:
        yield c


@pytest.fixture
async def cnc(cluster: EmbeddedCluster) -> AsyncIterator[NATS]:
    conn = await nats.connect(cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    yield conn
    await conn.close()


def replicated(s: Settings, n: int, update: bool = False) -> Settings:
    return msgspec.structs.replace(
        s, streams=msgspec.structs.replace(s.streams, replicas=n),
        nats=msgspec.structs.replace(s.nats, update_streams=update))


async def replicas_of(js: nats.js.JetStreamContext, stream: str) -> tuple[int, int]:
    """(configured replicas, peers the cluster reports beside the leader)."""
    info = await js.stream_info(stream)
    assert info.cluster is not None
    return info.config.num_replicas or 1, len(info.cluster.replicas or [])


async def test_provisioning_makes_every_stream_store_and_consumer_r3(
        cluster: EmbeddedCluster, cnc: NATS) -> None:
    s = replicated(isolated_settings(cluster.url), 3)
    js = cnc.jetstream()
    await ensure_all(js, s)
    names = [c.name for c in stream_configs(s)] + [c.name for c in store_configs(s).values()]
    assert len(names) == 11
    for name in names:
        assert name is not None
        await eventually(lambda n=name: replicas_of(js, n), lambda r: r == (3, 2),
                    timeout_s=20, what=f"{name} R3 with two peers")
    # Consumers are created following the stream: the server puts them on its three peers.
    infos = await eventually(lambda: js.consumers_info(s.streams.req.name),
                             lambda cis: len(cis) == 5 and all(
                                 len(c.cluster.replicas or []) == 2 for c in cis),
                             timeout_s=20, what="the request consumers on three peers")
    assert all((c.config.num_replicas or 0) == 0 for c in infos)


async def test_fewer_replicas_are_reported_raised_with_update_and_never_lowered(
        cluster: EmbeddedCluster, cnc: NATS, caplog: pytest.LogCaptureFixture) -> None:
    base = isolated_settings(cluster.url)
    js = cnc.jetstream()
    await ensure_all(js, replicated(base, 1))
    # A consumer someone pinned to one replica: put back to follow the stream.
    req = base.streams.req.name
    pinned = (await js.consumers_info(req))[0].name
    cur = (await js.consumer_info(req, pinned)).config
    await js.add_consumer(req, dataclasses.replace(cur, num_replicas=1))
    assert (await js.consumer_info(req, pinned)).config.num_replicas == 1

    with caplog.at_level(logging.WARNING, logger="cplane.provision"):
        await ensure_all(js, replicated(base, 3))  # no update_streams: reported, kept
    assert await replicas_of(js, req) == (1, 0)
    assert any(req in r.getMessage() and "num_replicas" in r.getMessage()
               for r in caplog.records), "the R1 stream was not reported"

    await ensure_all(js, replicated(base, 3, update=True))
    for cfg in [*stream_configs(base), *store_configs(base).values()]:
        assert cfg.name is not None
        await eventually(lambda n=cfg.name: replicas_of(js, n), lambda r: r == (3, 2),
                    timeout_s=30, what=f"{cfg.name} raised to R3")
    await eventually(lambda: js.consumer_info(req, pinned),
                lambda ci: (ci.config.num_replicas or 0) == 0 and len(ci.cluster.replicas or []) == 2,
                timeout_s=30, what="the pinned consumer following the stream again")

    with pytest.raises(StreamWeakeningError, match="num_replicas"):
        await ensure_all(js, replicated(base, 1, update=True))
    assert await replicas_of(js, req) == (3, 2)


# -- what an ack means ---------------------------------------------------------------
N_ACKED = 300


async def _publish_acked(js: nats.js.JetStreamContext, subject: str, n: int) -> None:
    acks = await asyncio.gather(*(js.publish(subject, b"%d" % i, headers={"Nats-Msg-Id": str(i)})
                                  for i in range(n)))
    assert len({a.seq for a in acks}) == n


async def test_an_ack_on_one_server_survives_its_kill_9_after_the_sync_interval() -> None:
    """One server, `sync_interval: 100ms`: an acked message is on disk within 100 ms, so
    it survives the process's kill -9 (a machine crash inside those 100 ms could lose it)."""
    with EmbeddedNats() as server:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="ACKED", subjects=["acked.>"],
                                         retention=RetentionPolicy.WORK_QUEUE))
        await _publish_acked(js, "acked.x", N_ACKED)
        await asyncio.sleep(0.25)  # past the sync interval: the server has fsynced them
        server.kill()
        server.start()
        await eventually(lambda: js.stream_info("ACKED"), lambda i: i.state.messages == N_ACKED,
                    timeout_s=20, what="every acked message after the restart")
        await nc.close()


async def test_an_ack_on_the_cluster_is_a_quorum_a_leader_kill_loses_nothing(
        cluster: EmbeddedCluster, cnc: NATS) -> None:
    """R3: a publish is acked once two of three nodes have stored it, so kill -9 of the
    leader right after the last ack loses nothing, with no sleep and no restart; with two
    nodes down there is no quorum and a publish gets no ack: an error or a timeout, whose
    outcome is unknown (the proposal may be stored once a quorum is back: publishers
    retry with the same Nats-Msg-Id), never a lost acked message."""
    js = cnc.jetstream(timeout=2)
    name = f"ACKED_{id(cnc)}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], num_replicas=3,
                                     retention=RetentionPolicy.WORK_QUEUE))
    await _publish_acked(js, f"{name}.x", N_ACKED)
    leader = cluster.stream_leader(name)
    assert leader is not None
    cluster.kill(leader)
    try:
        await eventually(lambda: js.stream_info(name), lambda i: i.state.messages == N_ACKED
                    and i.cluster.leader is not None
                    and cluster.node_named(i.cluster.leader) != leader,
                    timeout_s=30, what="every acked message at a new leader")
        # A second node down: no quorum. The publish is not acked.
        other = next(i for i in range(3) if i != leader and cluster.nodes[i].running
                     and cluster.nodes[i].url not in str(cnc.connected_url))
        cluster.kill(other)
        with pytest.raises((TimeoutError, nats.js.errors.Error, nats.errors.Error)):
            await js.publish(f"{name}.x", b"late", headers={"Nats-Msg-Id": "late"})
        cluster.start_node(other)
    finally:
        if not cluster.nodes[leader].running:
            cluster.start_node(leader)
    cluster.wait_ready(30)
    # Every acked message; the unacked one may have been stored when the quorum came back.
    info = await eventually(lambda: js.stream_info(name),
                            lambda i: i.state.messages in (N_ACKED, N_ACKED + 1),
                            timeout_s=30, what="the acked messages after the restarts")
    sub = await js.pull_subscribe(f"{name}.>", durable="check")
    # The new consumer answers 503 until its own leader is elected: ask again (nothing
    # was delivered by a refused fetch).
    msgs = await eventually(lambda: sub.fetch(info.state.messages, timeout=10), bool,
                            timeout_s=30, what="the consumer delivering")
    got = [m.data for m in msgs]
    assert len(got) == info.state.messages and len(set(got)) == len(got)
    assert set(got) - {b"late"} == {b"%d" % i for i in range(N_ACKED)}


# -- cplane up --cluster 3 ---------------------------------------------------------------
async def test_cplane_up_cluster_serves_while_any_one_node_is_killed() -> None:
    """`cplane up --cluster 3` (the Stack it runs): requests go on being served while
    each node in turn is killed -9 mid-load and restarted on its store."""
    stack = Stack(StackSpec(cluster=3, workers=2, gateway=False))
    await asyncio.to_thread(stack.start, 120.0)
    try:
        assert stack.cluster is not None and stack.spec.orchestrators == 2
        settings = Settings(nats=stack.operator_nats())
        client = await Client.connect(stack.url, settings)
        try:
            # Served once first: the orchestrators have provisioned and one leads.
            await _served(client, Request(request_id="up-warm", prompt="hi", max_tokens=2))
            for victim in range(3):
                reqs = [Request(request_id=f"up-{victim}-{i}", prompt="hello cluster",
                                max_tokens=8) for i in range(20)]
                pending = [asyncio.ensure_future(_served(client, r)) for r in reqs]
                await asyncio.sleep(0.05)
                stack.cluster.kill(victim)
                # Sent while the cluster elects new stream leaders: a publish that no
                # stream answers yet is not a bad request (it is sent again).
                pending += [asyncio.ensure_future(_served(client, Request(
                    request_id=f"up-{victim}-late-{i}", prompt="hello cluster", max_tokens=8)))
                    for i in range(20)]
                results = await asyncio.gather(*pending)
                assert all(r.finish_reason == "length" for r in results), results
                stack.cluster.start_node(victim)
                stack.cluster.wait_ready(30)
        finally:
            await client.close()
    finally:
        await asyncio.to_thread(stack.stop)


async def _served(client: Client, req: Request) -> Final:
    """Submit as a user would while a node dies: an unanswered publish is published
    again with the same id (an idempotency key), then the Final is awaited."""
    for _ in range(6):
        try:
            handle = await client.submit(req, timeout=5.0)
            break
        except TimeoutError:
            continue
    else:
        raise AssertionError(f"{req.request_id}: never accepted")
    return await handle.result(60)
