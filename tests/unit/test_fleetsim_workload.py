"""fleetsim.workload / fleetsim.synthetic: trace loaders, synthetic generator, trace tools."""

from __future__ import annotations

import statistics
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from cplane.fleetsim.records import TraceRequest
from cplane.fleetsim.workload import (
    LengthDist,
    SyntheticSpec,
    assign_classes,
    generate,
    load_azure,
    load_mooncake,
    load_trace,
    scale_rate,
    slice_requests,
    summary,
)
from tests import traces

# The real traces live beside the repository (tests/traces.py finds them).


@pytest.fixture(scope="module")
def azure() -> list[TraceRequest]:
    return load_trace(traces.need(traces.AZURE))


@pytest.fixture(scope="module")
def mooncake() -> list[TraceRequest]:
    return load_trace(traces.need(traces.MOONCAKE))


def test_azure_trace(azure: list[TraceRequest]) -> None:
    s = summary(azure)
    assert s["count"] == 19366
    assert azure[0].arrival_ms == 0.0 and azure[0].request_id == "az-0"
    assert azure[-1].request_id == "az-19365"
    assert all(a.arrival_ms <= b.arrival_ms for a, b in pairwise(azure))
    assert 5.35 <= s["rate_per_s"] <= 5.65
    assert abs(s["prompt_mean"] - 1155) / 1155 < 0.02
    assert abs(s["output_mean"] - 211) / 211 < 0.02
    assert s["prompt_p99"] == pytest.approx(4142, rel=0.02)
    assert s["blocks"] == 0 and s["block_reuse"] == 0.0
    # 7 fractional digits: the second row is 4.3145790 s after the first
    assert azure[1].arrival_ms == pytest.approx(4314.579)


def test_mooncake_trace(mooncake: list[TraceRequest]) -> None:
    s = summary(mooncake)
    assert s["count"] == 12031
    assert abs(s["block_reuse"] - 0.37) < 0.03
    assert mooncake[0].request_id == "mc-0" and mooncake[0].block_hashes[:3] == (0, 1, 2)
    assert abs(s["prompt_mean"] - 12000) / 12000 < 0.05


def test_limit() -> None:
    assert len(load_azure(traces.need(traces.AZURE), limit=10)) == 10
    assert len(load_mooncake(traces.need(traces.MOONCAKE), limit=7)) == 7


def test_malformed_files(tmp_path: Path) -> None:
    bad_csv = tmp_path / "t.csv"
    bad_csv.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:47.0000000,abc,44\n"
    )
    with pytest.raises(ValueError, match=r"t\.csv:3"):
        load_trace(bad_csv)
    no_col = tmp_path / "c.csv"
    no_col.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,374\n")
    with pytest.raises(ValueError, match=r"c\.csv.*GeneratedTokens"):
        load_trace(no_col)
    bad_ts = tmp_path / "ts.csv"
    bad_ts.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n")
    with pytest.raises(ValueError, match=r"ts\.csv:2"):
        load_trace(bad_ts)

    bad_json = tmp_path / "m.jsonl"
    ok = '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}\n'
    bad_json.write_text(ok + "\n" + '{"timestamp": 5, "input_length": 600\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:3"):
        load_trace(bad_json)
    no_key = tmp_path / "k.jsonl"
    no_key.write_text(ok + '{"timestamp": 5, "input_length": 6, "output_length": 5}\n')
    with pytest.raises(ValueError, match=r"k\.jsonl:2.*hash_ids"):
        load_trace(no_key)
    with pytest.raises(ValueError, match=r"x\.parquet"):
        load_trace(tmp_path / "x.parquet")


def test_small_files_parse(tmp_path: Path) -> None:
    csv_path = tmp_path / "a.csv"
    csv_path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 23:59:59.9999999,10,1\n"
        "2023-11-17 00:00:00.5,20,2\n"
    )
    reqs = load_azure(csv_path)
    assert [r.arrival_ms for r in reqs] == [0.0, pytest.approx(500.0001)]
    jl = tmp_path / "m.jsonl"
    jl.write_text(
        '{"timestamp": 100, "input_length": 1024, "output_length": 5, "hash_ids": [7, 8]}\n'
        '{"timestamp": 250, "input_length": 600, "output_length": 3, "hash_ids": [7, 9]}\n'
    )
    m = load_mooncake(jl)
    assert [r.arrival_ms for r in m] == [0.0, 150.0]
    assert m[1].block_hashes == (7, 9) and summary(m)["block_reuse"] == 0.25


def test_synthetic_deterministic() -> None:
    spec = SyntheticSpec(count=500, prefix_groups=3, prefix_share=0.5, sessions=20,
                         session_share=0.4, tenants={"a": 1, "b": 1})
    assert generate(spec, 7) == generate(spec, 7)
    assert generate(spec, 7) != generate(spec, 8)
    ids = [r.request_id for r in generate(spec, 7)]
    assert len(set(ids)) == len(ids) == 500


def test_poisson_rate() -> None:
    reqs = generate(SyntheticSpec(rate_per_s=20.0, count=20_000), seed=1)
    assert abs(summary(reqs)["rate_per_s"] - 20.0) / 20.0 < 0.05
    timed = generate(SyntheticSpec(rate_per_s=20.0, duration_s=10.0), seed=1)
    assert all(r.arrival_ms < 10_000 for r in timed) and 150 < len(timed) < 250


def _gap_cv(reqs: list[TraceRequest]) -> float:
    gaps = [b.arrival_ms - a.arrival_ms for a, b in pairwise(reqs)]
    return statistics.pstdev(gaps) / statistics.fmean(gaps)


def test_gamma_burstiness() -> None:
    poisson = generate(SyntheticSpec(rate_per_s=10.0, count=20_000), seed=2)
    bursty = generate(SyntheticSpec(rate_per_s=10.0, count=20_000, arrivals="gamma", cv=3.0), seed=2)
    assert abs(_gap_cv(poisson) - 1.0) < 0.15
    assert abs(_gap_cv(bursty) - 3.0) / 3.0 < 0.15
    assert abs(summary(bursty)["rate_per_s"] - 10.0) / 10.0 < 0.1


def test_tenant_weights_and_mixes() -> None:
    spec = SyntheticSpec(count=10_000, tenants={"a": 4, "b": 1}, levels={0: 1, 4: 1},
                         slo_classes={"interactive": 1, "batch": 3})
    s = summary(generate(spec, seed=3))
    assert 3.6 < s["tenants"]["a"] / s["tenants"]["b"] < 4.4
    assert set(s["levels"]) == {0, 4}
    assert 2.7 < s["slo_classes"]["batch"] / s["slo_classes"]["interactive"] < 3.3


def test_lengths_clamped() -> None:
    spec = SyntheticSpec(count=5000, prompt=LengthDist(mean=800, sigma=1.5, max=4000),
                         output=LengthDist(mean=100, sigma=0.0))
    reqs = generate(spec, seed=4)
    assert all(1 <= r.prompt_tokens <= 4000 for r in reqs)
    assert {r.output_tokens for r in reqs} == {100}


def test_shared_prefix_groups() -> None:
    spec = SyntheticSpec(count=2000, prefix_groups=4, prefix_tokens=2048, prefix_share=1.0)
    reqs = generate(spec, seed=5)
    leads = Counter(r.block_hashes[:4] for r in reqs)
    assert len(leads) == 4 and all(len(k) == 4 for k in leads)  # every request: 4 shared blocks
    assert all(r.prompt_tokens >= 2048 for r in reqs)
    assert all(len(r.block_hashes) == r.prompt_tokens // 512 for r in reqs)
    none = generate(SyntheticSpec(count=2000), seed=5)
    assert summary(none)["block_reuse"] == 0.0 < summary(reqs)["block_reuse"]


def test_sessions_extend_prompts() -> None:
    spec = SyntheticSpec(count=3000, sessions=30, session_share=1.0,
                         prompt=LengthDist(mean=300, sigma=0.5, max=32_000),
                         tenants={"a": 1, "b": 1, "c": 1})
    reqs = generate(spec, seed=6)
    by_session: dict[str, list[TraceRequest]] = {}
    for r in reqs:
        by_session.setdefault(r.session, []).append(r)
    assert "" not in by_session and len(by_session) == 30
    extended = 0
    for turns in by_session.values():
        assert len({t.tenant for t in turns}) == 1  # a conversation keeps its classes
        for prev, cur in pairwise(turns):
            if cur.prompt_tokens > prev.prompt_tokens + prev.output_tokens:
                n = prev.prompt_tokens // 512
                assert cur.block_hashes[:n] == prev.block_hashes[:n]
                extended += 1
    assert extended > 2000
    assert summary(reqs)["block_reuse"] > 0.5


def test_assign_classes_stable_under_slicing(azure: list[TraceRequest]) -> None:
    def assign(reqs: list[TraceRequest], seed: int = 11) -> list[TraceRequest]:
        return assign_classes(reqs, seed=seed, tenants={"a": 4, "b": 1},
                              levels={1: 1, 2: 2, 3: 1},
                              slo_classes={"interactive": 1, "standard": 1})

    full = assign(azure[:5000])
    part = assign(slice_requests(azure[:5000], start=1234, count=500))
    by_id = {r.request_id: r for r in full}
    for r in part:
        f = by_id[r.request_id]
        assert (r.tenant, r.level, r.slo_class) == (f.tenant, f.level, f.slo_class)
    tenants = Counter(r.tenant for r in full)
    assert 3.4 < tenants["a"] / tenants["b"] < 4.6
    assert assign(azure[:5000], seed=12) != full
    # mappings left out keep the request's values (the TraceRequest defaults here)
    only_t = assign_classes(azure[:10], seed=1, tenants={"x": 1})
    assert {(r.tenant, r.level, r.slo_class) for r in only_t} == {("x", 2, "standard")}


def test_scale_and_slice(azure: list[TraceRequest]) -> None:
    fast = scale_rate(azure, 2.0)
    assert summary(fast)["rate_per_s"] == pytest.approx(2 * summary(azure)["rate_per_s"])
    assert [r.request_id for r in fast] == [r.request_id for r in azure]
    with pytest.raises(ValueError):
        scale_rate(azure, 0.0)
    part = slice_requests(azure, start=10, count=100)
    assert len(part) == 100 and part[0].request_id == "az-10" and part[0].arrival_ms == 0.0
    assert part[-1].arrival_ms == pytest.approx(azure[109].arrival_ms - azure[10].arrival_ms)
    window = slice_requests(azure, start_ms=60_000, end_ms=120_000)
    assert window[0].arrival_ms == 0.0
    assert all(60_000 <= azure[int(r.request_id[3:])].arrival_ms < 120_000 for r in window)
    assert 250 < len(window) < 400
    assert slice_requests(azure, start_ms=1e12) == []
