"""Least privilege, against a real nats-server with the orchestrator running.

- A push consumer aimed at `llm.admin.policy` (the server checks no permission
  for a delivery subject) cannot switch the fleet's policy: the orchestrator
  receives the message, refuses and counts it, and a real request still works.
- The orchestrator provisions every stream, bucket and object store, each with
  its limits; nobody else creates one (the others only open them).
- A store a client made before the orchestrator started, with a config cplane
  does not make, is refused (routing: RePublish, sources, other subjects) or
  brought to the settings' limits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RePublish,
    StreamConfig,
    StreamSource,
)
from nats.js.errors import APIError

from cplane.bus.claims import Claims
from cplane.bus.control import ADMIN_GUARD
from cplane.bus.provision import (
    ForeignStreamError,
    StoreMissingError,
    ensure_all,
    foreign_routing,
    open_key_value,
    store_configs,
    stream_configs,
    stream_differences,
)
from cplane.bus.stream_config import ROUTING_FIELDS
from cplane.client.admin import Admin
from cplane.client.batch_store import JobStore
from cplane.client.control import ControlPlane
from cplane.orchestrator.runtime_config import ADMIN_QUEUE, POLICY_KEY
from cplane.schemas.admin import PolicySet
from cplane.schemas.codec import encode
from cplane.schemas.settings import Settings, load_settings
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.waiting import until


def _settings(nats_url: str) -> Settings:
    return isolated_settings(nats_url, orchestrator={"policy": "priority"})


@pytest.fixture
async def tenant(nats_url: str) -> AsyncIterator[NATS]:
    """The attacker's own connection."""
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


# -- (a) a push consumer delivering into llm.admin.policy ---------------------------------
async def test_a_push_consumer_aimed_at_the_policy_subject_switches_nothing(
        nats_url: str, nc: NATS, tenant: NATS) -> None:
    s = _settings(nats_url)
    served = s.subjects.admin_policy
    async with stack(s, workers=0) as run:
        orch = run.orchestrator
        assert orch is not None and orch.policy_name == "priority"
        js = tenant.jetstream()
        bucket = await open_key_value(js, s.subjects.batch_jobs_bucket)  # a client may write it
        await js.add_consumer(f"KV_{s.subjects.batch_jobs_bucket}", ConsumerConfig(
            durable_name="evil", deliver_subject=served, deliver_group=ADMIN_QUEUE,
            ack_policy=AckPolicy.EXPLICIT))
        before = ADMIN_GUARD.by_subject[served]
        await bucket.put("job-1", encode(PolicySet(name="fifo", by="tenant-A")))

        # The orchestrator got it (and refused it): its refusal counter moved...
        await until(lambda: ADMIN_GUARD.by_subject[served] > before, 10,
                    "the orchestrator receives the pushed command")
        orchs, _ = await ControlPlane(nc, s).get_reports()
        assert len(orchs) == 1 and orchs[0].counters["admin_refused"] >= 1
        # ...and applied nothing: in force, answered, stored.
        assert orch.policy_name == "priority"
        admin = Admin(nc, s)
        got = await admin.get_policy()
        assert got.ok and got.state is not None
        assert (got.state.name, got.state.by) == ("priority", "settings")
        assert POLICY_KEY not in await _keys(nc, s.subjects.config_bucket)

        # A real request still works, and is stored.
        reply = await admin.set_policy("fifo", by="operator")
        assert reply.ok and reply.state is not None and reply.state.by == "operator"
        assert orch.policy_name == "fifo"
        assert (await admin.get_policy()).state == reply.state


async def _keys(nc: NATS, bucket: str) -> list[str]:
    """The bucket's keys from its stream's subject counts (no watcher)."""
    pre = f"$KV.{bucket}."
    info = await nc.jetstream().stream_info(f"KV_{bucket}", subjects_filter=f"{pre}>")
    return [subj[len(pre):] for subj in (info.state.subjects or {})]


# -- (b), (c): the orchestrator provisions every store, bounded --------------------------
async def test_nobody_but_the_orchestrator_creates_a_store(nats_url: str, nc: NATS) -> None:
    s = _settings(nats_url)
    js = nc.jetstream()
    with pytest.raises(StoreMissingError) as missing:
        await JobStore.open(js, s)
    assert s.subjects.batch_jobs_bucket in str(missing.value)
    assert "start an orchestrator first (it provisions every store)" in str(missing.value)
    claims = Claims(js, s, "w1")
    await claims.start()  # a worker may come up first: it opens the bucket later
    with pytest.raises(StoreMissingError, match=f"{s.subjects.prefix}_claims"):
        await claims.acquire("r1")
    await claims.stop()
    names = {si.config.name for si in await js.streams_info()}
    assert not {cfg.name for cfg in store_configs(s).values()} & names  # nothing made

    async with stack(s, workers=0):
        for key, cfg in store_configs(s).items():
            got = (await js.stream_info(cfg.name or "")).config
            limits = getattr(s.streams, key)
            assert got.max_bytes == limits.max_bytes and limits.max_bytes > 0, key
            assert got.max_msg_size == limits.max_value_size > 0, key
            assert got.discard == DiscardPolicy.NEW and not got.republish and not got.sources
        for cfg in stream_configs(s):
            assert ((await js.stream_info(cfg.name or "")).config.max_bytes or -1) > 0, cfg.name
        store = await JobStore.open(js, s)  # now the client opens both
        assert await store.list() == []
        await claims.start()
        assert await claims.acquire("r1")
        await claims.stop()


def test_every_store_has_limits_by_default() -> None:
    s = load_settings(env={})
    cfgs = store_configs(s)
    assert set(cfgs) == {"leases", "claims", "config", "batch_jobs", "batch_files"}
    assert {c.name for c in cfgs.values()} == {
        "KV_llm_leases", "KV_llm_claims", "KV_llm_config", "KV_llm_batches",
        "OBJ_llm_batch_files"}
    assert all((c.max_bytes or -1) > 0 and (c.max_msg_size or -1) > 0 for c in cfgs.values())
    assert cfgs["batch_files"].max_bytes == 1 << 30
    assert cfgs["batch_jobs"].max_bytes == 256 << 20
    assert all(cfgs[k].max_bytes == 64 << 20 for k in ("leases", "claims", "config"))
    assert all((c.max_bytes or -1) > 0 for c in stream_configs(s))


def test_only_routing_we_configure_passes() -> None:
    s = load_settings(env={})
    for cfg in stream_configs(s):  # LLM_OUT's RePublish, LLM_DONE's source: ours
        assert foreign_routing(cfg, cfg) == {}
    jobs = store_configs(s)["batch_jobs"]
    planted = dataclasses.replace(jobs, republish=RePublish(src="$KV.llm_batches.>",
                                                            dest="llm.admin.policy"))
    assert set(foreign_routing(planted, jobs)) == {"republish"}
    sourced = dataclasses.replace(jobs, sources=[StreamSource(name="LLM_REQ")])
    assert set(foreign_routing(sourced, jobs)) == {"sources"}
    mirrored = dataclasses.replace(jobs, mirror=StreamSource(name="LLM_DONE"))
    assert set(foreign_routing(mirrored, jobs)) == {"mirror"}


# -- a store planted before the orchestrator ----------------------------------------------
def _planted(s: Settings, how: str) -> StreamConfig:
    b = s.subjects.batch_jobs_bucket
    base = StreamConfig(name=f"KV_{b}", subjects=[f"$KV.{b}.>"], max_msgs_per_subject=1,
                        discard=DiscardPolicy.NEW, allow_rollup_hdrs=True, deny_delete=True)
    if how == "republish":  # every record it writes re-sent as a policy command
        base.republish = RePublish(src=f"$KV.{b}.>", dest=f"{s.subjects.prefix}.admin.>")
    elif how == "subjects":  # captures the admin subjects themselves
        base.subjects = [f"$KV.{b}.>", f"{s.subjects.prefix}.admin.>"]
    elif how == "sources":  # pulls in what it may not read
        base.sources = [StreamSource(name=s.streams.req.name)]
    return base


@pytest.mark.parametrize("how", ["republish", "subjects", "sources"])
async def test_a_planted_store_stops_the_orchestrator_with_a_clear_error(
        nats_url: str, tenant: NATS, how: str) -> None:
    s = _settings(nats_url)
    js = tenant.jetstream()
    if how == "sources":
        await ensure_all(js, s)  # LLM_REQ exists; then the store is planted over its own
        await js.delete_key_value(s.subjects.batch_jobs_bucket)
    await js.add_stream(_planted(s, how))
    with pytest.raises(ForeignStreamError) as refused:
        async with stack(s, workers=0):
            pass
    text = str(refused.value)
    assert f"KV_{s.subjects.batch_jobs_bucket}" in text and how in text
    assert "refusing to start" in text and "nats stream rm" in text
    # Nothing was changed: the operator deletes it, and the next start provisions ours.
    kept = (await js.stream_info(f"KV_{s.subjects.batch_jobs_bucket}")).config
    assert stream_differences(kept, _planted(s, how), ("subjects", *ROUTING_FIELDS)) == {}
    await js.delete_stream(f"KV_{s.subjects.batch_jobs_bucket}")
    async with stack(s, workers=0):
        got = (await js.stream_info(f"KV_{s.subjects.batch_jobs_bucket}")).config
        assert got.republish is None and got.max_bytes == s.streams.batch_jobs.max_bytes


async def test_a_planted_store_without_limits_gets_the_settings_limits(
        nats_url: str, tenant: NATS) -> None:
    s = _settings(nats_url)
    js = tenant.jetstream()
    bucket = s.subjects.batch_jobs_bucket
    # No limits, 64 values per key, and old records dropped when full.
    await js.create_key_value(KeyValueConfig(bucket=bucket, history=64))
    await js.update_stream(dataclasses.replace(
        (await js.stream_info(f"KV_{bucket}")).config, discard=DiscardPolicy.OLD))
    kv = await open_key_value(js, bucket)
    await kv.put("job-0", b"{}")
    async with stack(s, workers=0):
        got = (await js.stream_info(f"KV_{bucket}")).config
        assert got.max_bytes == s.streams.batch_jobs.max_bytes
        assert got.max_msg_size == s.streams.batch_jobs.max_value_size
        assert got.max_msgs_per_subject == 1 and got.discard == DiscardPolicy.NEW
        assert (await kv.get("job-0")).value == b"{}"  # its data kept
        # Once it exists, a client cannot make it over with another config.
        with pytest.raises(APIError):
            await js.add_stream(_planted(s, "republish"))
