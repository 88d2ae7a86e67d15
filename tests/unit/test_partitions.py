"""Partitioned leadership, the pure part (orchestrator/partitions.py) and its subjects."""

from __future__ import annotations

import math

import pytest

from cplane.bus.accounts import Principal, render_accounts
from cplane.bus.stream_config import request_consumer_config, stream_configs
from cplane.orchestrator.intake import Intake, classify, sniff_model
from cplane.orchestrator.partitions import (
    PartitionMap,
    assign,
    lease_key,
    plan_leases,
    replica_key,
)
from cplane.schemas.messages import Priority
from cplane.schemas.settings import Settings, load_settings
from cplane.schemas.subjects import DEFAULT_PARTITION, Subjects, partition_token, pool_of

S = Subjects()


def test_partition_subjects_are_told_apart_by_length() -> None:
    assert S.request("high", "batch", None, "m1") == "llm.req.pool.m1.high.batch"
    assert S.request("high", "batch", "acme", "m1") == "llm.req.acme.pool.m1.high.batch"
    for subject, want in [
        ("llm.req.high.batch", (None, "", "high", "batch")),
        ("llm.req.acme.high.batch", ("acme", "", "high", "batch")),
        ("llm.req.pool.high.batch", ("pool", "", "high", "batch")),  # a tenant named pool
        ("llm.req.pool.m1.high.batch", (None, "m1", "high", "batch")),
        ("llm.req.acme.pool.m1.high.batch", ("acme", "m1", "high", "batch")),
    ]:
        r = S.parse_request_subject(subject)
        assert (r.tenant, r.pool, r.priority, r.slo_class) == want, subject
        assert S.parse_request(subject) == want[2:]


def test_partition_tokens_are_subject_tokens() -> None:
    assert partition_token("m1") == "m1"
    tok = partition_token("meta-llama/Llama-3.1-8B")
    assert "." not in tok and "/" not in tok and tok != partition_token("meta-llama/Llama-3.2")
    assert pool_of("m1", ("m1",)) == "m1"
    assert pool_of("other", ("m1",)) == DEFAULT_PARTITION == pool_of("", ("m1",))


def test_partition_consumers_do_not_overlap() -> None:
    s = load_settings(env={}, orchestrator={"partitions": ["m1", "m2"]})
    filters = [f for pool in ("", "m1", "m2") for p in Priority
               for f in request_consumer_config(s, S, p, pool).filter_subjects or []]
    assert len(filters) == len(set(filters))
    (req,) = [c for c in stream_configs(s) if c.name == "LLM_REQ"]
    # every stream subject is read, each pool's by its own consumers
    wild = {f.replace(".m1.", ".*.").replace(".m2.", ".*.") for f in filters}
    assert wild == set(req.subjects or [])
    plain = stream_configs(Settings())[0].subjects or []
    assert not any(".pool." in f for f in plain)  # unpartitioned: as before


def test_partition_settings_from_env_and_checks() -> None:
    s = load_settings(env={"CPLANE__ORCHESTRATOR__PARTITIONS": "m1, m2"})
    assert s.orchestrator.partitions == ("m1", "m2")
    pm = PartitionMap.of(s.orchestrator.partitions)
    assert pm.pools == ("", "m1", "m2") and pm.of_model("m2") == "m2" and pm.of_model("x") == ""
    with pytest.raises(ValueError):
        PartitionMap.of(["m1", ""])
    assert lease_key("") == "orchestrator" and lease_key("m1") == "orchestrator.m1"
    assert replica_key("o1") == "replica.o1"


@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 5])
def test_partition_assignment_spreads_within_the_quota(replicas: int) -> None:
    pools = ["", "a", "b", "c"]
    live = [f"orch-{i}" for i in range(replicas)]
    got = assign(pools, live)
    assert set(got) == set(pools)
    models = [got[p] for p in pools if p]
    quota = math.ceil(len(models) / replicas)
    assert max(models.count(r) for r in live) <= quota
    assert len(set(models)) == min(replicas, len(models))  # N replicas lead N pools
    counts = [list(got.values()).count(r) for r in live]
    assert sum(1 for c in counts if c) == min(replicas, len(pools))
    assert assign(pools, reversed(live)) == got  # every replica computes the same


def test_partition_plan_acquires_its_share_and_hands_over_one_at_a_time() -> None:
    pools = ["", "a", "b", "c"]
    alone = plan_leases("o1", pools, ["o1"], dict.fromkeys(pools), ())
    assert set(alone.acquire) == set(pools) and not alone.release
    mine = {p: "o1" for p in pools}
    joined = plan_leases("o1", pools, ["o1", "o2"], mine, ())
    assert len(joined.release) == 1 and assign(pools, ["o1", "o2"])[joined.release[0]] == "o2"
    # A free partition assigned elsewhere waits one renewal for its assignee, then is taken.
    other = next(p for p, r in assign(pools, ["o1", "o2"]).items() if r == "o2")
    holders = {p: ("o1" if p != other else None) for p in pools}
    assert other not in plan_leases("o1", pools, ["o1", "o2"], holders, ()).acquire
    assert other in plan_leases("o1", pools, ["o1", "o2"], holders, {other}).acquire


def test_partition_intake_forwards_a_model_of_another_partition() -> None:
    assert sniff_model(b'{"model": "m1", "prompt": "x"}') == "m1"
    assert sniff_model(b'{"prompt": "x"}') == ""
    assert sniff_model(b"not json") is None
    kw = dict(deliveries=1, max_deliveries=8, admitted=None, seq=1, held_seq=None,
              held_waiting=False, seen=False)
    assert classify(leading=True, elsewhere=True, **kw) is Intake.FORWARD  # type: ignore[arg-type]
    assert classify(leading=False, elsewhere=True, **kw) is Intake.NAK  # type: ignore[arg-type]


def test_partition_tenant_accounts_map_configured_pools_only() -> None:
    ps = [Principal("o", "orchestrator", "pw"), Principal("t", "tenant", "pw", tenant="acme")]
    plain = render_accounts(ps)
    assert ".pool." not in plain
    conf = render_accounts(ps, partitions=["m1"])
    assert '"llm.req.acme.pool.m1.*.*"' in conf and 'to: "llm.req.pool.m1.*.*"' in conf
