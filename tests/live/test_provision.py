"""Stream, consumer and lease-bucket provisioning against a real server.

Idempotent; never silently weakens an existing stream; updates stale consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from cplane.bus.provision import (
    StreamWeakeningError,
    ensure_all,
    ensure_lease_bucket,
    ensure_request_consumers,
    ensure_streams,
    stream_differences,
    weakening,
)
from cplane.bus.server import EmbeddedNats
from cplane.client.sdk import Client
from cplane.schemas.messages import Request
from cplane.schemas.settings import Settings
from tests.natsfix import isolated_settings
from tests.stack import stack

PRIORITY_NAMES = ("critical", "high", "normal", "low", "background")


def with_stream(s: Settings, key: str, **fields: object) -> Settings:
    streams = msgspec.structs.replace(
        s.streams, **{key: msgspec.structs.replace(getattr(s.streams, key), **fields)})
    return msgspec.structs.replace(s, streams=streams)


def allowing_updates(s: Settings) -> Settings:
    return msgspec.structs.replace(s, nats=msgspec.structs.replace(s.nats, update_streams=True))


# -- the pure comparison --------------------------------------------------------------
def cfg(**kw: object) -> StreamConfig:
    base: dict[str, object] = dict(
        name="S", subjects=["a.>"], retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
        discard=DiscardPolicy.NEW, max_msgs=-1, max_bytes=-1, max_age=None, max_msg_size=-1,
        duplicate_window=120.0, num_replicas=3,
    )
    base.update(kw)
    return StreamConfig(**base)  # type: ignore[arg-type]


def test_weakening_names_fewer_replicas_memory_retention_discard_and_lost_subjects() -> None:
    r3 = cfg()
    assert weakening(r3, cfg(num_replicas=1)) == {"num_replicas": (3, 1)}
    assert weakening(cfg(num_replicas=1), r3) == {}  # more replicas is stronger
    assert weakening(r3, cfg(storage=StorageType.MEMORY)) == {"storage": ("file", "memory")}
    assert weakening(cfg(storage=StorageType.MEMORY), r3) == {}
    assert set(weakening(r3, cfg(retention=RetentionPolicy.WORK_QUEUE))) == {"retention"}
    assert set(weakening(r3, cfg(discard=DiscardPolicy.OLD))) == {"discard"}
    assert set(weakening(r3, cfg(subjects=["b.>"]))) == {"subjects"}
    assert weakening(r3, cfg(subjects=["a.>", "b.>"])) == {}  # added subjects only
    # Limits are operator choices: they differ, but do not weaken.
    limits = cfg(max_msgs=5, max_age=60.0, max_bytes=1 << 20)
    assert weakening(r3, limits) == {}
    assert set(stream_differences(r3, limits)) == {"max_msgs", "max_age", "max_bytes"}
    # The server reports "no age limit" as 0 and enums as strings: not a difference.
    assert stream_differences(cfg(max_age=0.0, storage="file"), r3) == {}


# -- streams on a real server --------------------------------------------------------
async def test_ensure_streams_creates_six_streams_idempotently(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url)
    js = nc.jetstream()
    await ensure_streams(js, s)
    await ensure_streams(js, s)  # no error the second time
    await ensure_request_consumers(js, s)
    await ensure_request_consumers(js, s)
    info = await js.stream_info(s.streams.req.name)
    assert info.config.retention == "workqueue" and info.config.discard == "new"
    assert info.config.duplicate_window == 120.0
    assert sorted(info.config.subjects or []) == sorted(  # the system's, and tenants'
        f"{s.subjects.prefix}.req.{t}{p}.*" for p in PRIORITY_NAMES for t in ("", "*."))
    assert (await js.stream_info(s.streams.out.name)).config.storage == "file"
    cancel = (await js.stream_info(s.streams.cancel.name)).config
    assert cancel.subjects == [f"{s.subjects.prefix}.cancel.>"]
    assert cancel.retention == "limits" and cancel.storage == "file"
    assert cancel.max_age == s.streams.cancel.max_age_s
    dlq = (await js.stream_info(s.streams.dlq.name)).config
    assert dlq.subjects == [f"{s.subjects.prefix}.dlq.>"]
    assert dlq.retention == "limits" and dlq.storage == "file"
    consumers = {c.name for c in await js.consumers_info(s.streams.req.name)}
    assert consumers == {f"orch-{p}" for p in PRIORITY_NAMES}


async def test_many_processes_provisioning_at_once_all_start() -> None:
    # Services start together (cplane up, a fleet rollout): every one runs
    # ensure_all on fresh streams at the same moment, on its own connection.
    # A stream whose limit is a large part of the server's storage: while two
    # creations overlap the server counts it twice and refuses one with
    # "insufficient storage" (seen with four processes on a tmpfs store).
    # The server's file store limit is 75 % of the free space where it stores
    # (a temp dir): take 55 % of that, so one fits and two overlapping do not.
    # A private server: the session's holds other tests' reservations.
    server = EmbeddedNats().start()
    nats_url = server.url
    limit = shutil.disk_usage(tempfile.gettempdir()).free * 3 // 4
    s = isolated_settings(nats_url, stream_done={"max_bytes": limit * 55 // 100})
    conns = [await nats.connect(nats_url) for _ in range(6)]
    try:
        await asyncio.gather(*(ensure_all(c.jetstream(), s) for c in conns))
        js = conns[0].jetstream()
        for cfg in (s.streams.req, s.streams.work, s.streams.out, s.streams.done):
            assert (await js.stream_info(cfg.name)).config.name == cfg.name
    finally:
        # The big reservation would starve every later test of this server.
        js = conns[0].jetstream()
        for cfg in msgspec.structs.asdict(s.streams).values():
            with contextlib.suppress(Exception):
                await js.delete_stream(cfg.name)
        for c in conns:
            await c.close()
        server.stop()


async def test_a_differing_stream_is_kept_and_each_field_named(
    nats_url: str, nc: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker started with other settings (here: limits and storage) changes nothing."""
    s = isolated_settings(nats_url)
    js = nc.jetstream()
    await ensure_streams(js, s)
    other = with_stream(s, "done", max_msgs=77, max_age_s=60.0, storage="memory")
    with caplog.at_level(logging.WARNING, logger="cplane.provision"):
        await ensure_streams(js, other)
    kept = (await js.stream_info(s.streams.done.name)).config
    assert kept.max_msgs == -1 and kept.max_age == s.streams.done.max_age_s
    assert kept.storage == "file"
    warning = next(r.getMessage() for r in caplog.records if s.streams.done.name in r.getMessage())
    for field in ("max_msgs", "max_age", "storage"):
        assert field in warning


async def test_update_streams_applies_limits_but_refuses_weakening(
    nats_url: str, nc: NATS
) -> None:
    s = isolated_settings(nats_url)
    js = nc.jetstream()
    await ensure_streams(js, s)
    await ensure_streams(js, allowing_updates(with_stream(s, "req", max_msgs=77)))
    assert (await js.stream_info(s.streams.req.name)).config.max_msgs == 77
    memory = allowing_updates(with_stream(s, "out", storage="memory", max_msgs=5))
    with pytest.raises(StreamWeakeningError, match="storage") as err:
        await ensure_streams(js, memory)
    assert set(err.value.fields) == {"storage"}
    kept = (await js.stream_info(s.streams.out.name)).config
    assert kept.storage == "file" and kept.max_msgs == -1  # nothing applied


# -- consumers and the lease bucket ----------------------------------------------------
async def test_ensure_consumer_updates_stale_mutable_fields(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, orchestrator={"ack_wait_s": 10.0})
    js = nc.jetstream()
    await ensure_streams(js, s)
    await ensure_request_consumers(js, s)
    newer = isolated_settings(nats_url, orchestrator={"ack_wait_s": 3.0,
                                                      "hold_per_priority": 1000})
    newer = msgspec.structs.replace(newer, nats=s.nats, streams=s.streams)
    await ensure_request_consumers(js, newer)
    info = await js.consumer_info(s.streams.req.name, "orch-normal")
    assert info.config.ack_wait == 3.0
    assert info.config.max_ack_pending == 4000
    assert info.config.max_deliver == -1


async def test_lease_bucket_is_idempotent_with_the_lease_ttl(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, orchestrator={"lease_ttl_s": 2.5})
    js = nc.jetstream()
    kv = await ensure_lease_bucket(js, s)
    await kv.put("leader", b"o1")
    again = await ensure_lease_bucket(js, s)  # second call: same bucket, value kept
    assert (await again.get("leader")).value == b"o1"
    status = await again.status()
    assert status.bucket == s.subjects.leases_bucket
    assert status.ttl == 2.5 and status.history == 1


# -- reply_to end to end -----------------------------------------------------------------
async def test_reply_to_gets_every_output_too(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True})
    got: list[bytes] = []
    final_seen = asyncio.Event()

    async def on(msg: Msg) -> None:
        got.append(msg.data)
        if msgspec.json.decode(msg.data)["type"] == "final":
            final_seen.set()

    inbox = f"_INBOX.{s.subjects.prefix}.r1"
    sub = await nc.subscribe(inbox, cb=on)
    async with stack(s, workers=1):
        client = Client(nc, s)
        final = await client.generate(Request(request_id="rt1", prompt="x", max_tokens=5,
                                              reply_to=inbox), timeout=10)
        await asyncio.wait_for(final_seen.wait(), 10)
    await sub.unsubscribe()
    kinds = [msgspec.json.decode(d)["type"] for d in got]
    assert kinds[-1] == "final" and kinds.count("final") == 1
    assert len(kinds) - 1 == final.chunks
