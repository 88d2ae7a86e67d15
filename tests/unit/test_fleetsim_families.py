"""fleetsim.families: named synthetic trace families, their load, and Mooncake JSONL output."""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from cplane.fleetsim import bench
from cplane.fleetsim.families import (
    FAMILIES,
    LOAD_TOKENS_PER_WORKER_S,
    at_load,
    family,
    family_workload,
    offered_tokens_per_s,
)
from cplane.fleetsim.records import TraceRequest
from cplane.fleetsim.synthetic import LengthDist, SyntheticSpec, generate
from cplane.fleetsim.workload import load_mooncake, write_mooncake

BLOCK = 512


def _gaps_cv(reqs: list[TraceRequest]) -> float:
    gaps = [b.arrival_ms - a.arrival_ms for a, b in pairwise(reqs)]
    return statistics.pstdev(gaps) / statistics.fmean(gaps)


def test_deterministic() -> None:
    for name in FAMILIES:
        a = family_workload(name, 8, requests=300, seed=3)
        assert a == family_workload(name, 8, requests=300, seed=3)
        assert a != family_workload(name, 8, requests=300, seed=4)


def test_blocks_match_prompts() -> None:
    for name in FAMILIES:
        for r in family_workload(name, 8, requests=400):
            assert len(r.block_hashes) == r.prompt_tokens // BLOCK


def test_unknown_family_names_the_choices() -> None:
    with pytest.raises(ValueError, match="system-4k"):
        family("nope")


def test_offered_load_per_worker() -> None:
    for name, fam in FAMILIES.items():
        for workers in (8, 64):
            reqs = family_workload(name, workers, requests=50 * workers)
            want = fam.load * LOAD_TOKENS_PER_WORKER_S * workers
            assert offered_tokens_per_s(reqs) == pytest.approx(want, rel=1e-9)
    # an explicit load overrides the family's own
    reqs = family_workload("docs-12k", 8, requests=400, tokens_per_worker_s=1000.0)
    assert offered_tokens_per_s(reqs) == pytest.approx(8000.0)


def test_rate_grows_with_the_fleet() -> None:
    for name in FAMILIES:
        small = family_workload(name, 8, requests=1600)
        big = family_workload(name, 64, requests=12_800)
        ratio = (len(big) / big[-1].arrival_ms) / (len(small) / small[-1].arrival_ms)
        assert 6.5 < ratio < 9.5, (name, ratio)


def test_documents_and_sessions_grow_with_the_fleet() -> None:
    docs, chat = family("docs-12k"), family("chat-12k")
    assert docs.spec(64, 10).prefix_groups == 8 * docs.spec(8, 10).prefix_groups
    assert chat.spec(64, 10).sessions == 8 * chat.spec(8, 10).sessions
    assert family("system-4k").spec(64, 10).prefix_groups == 1  # one prompt for everybody


def test_context_lengths() -> None:
    means = {n: statistics.fmean(r.prompt_tokens for r in family_workload(n, 8))
             for n in FAMILIES}
    assert 3000 < means["system-4k"] < 5000
    assert 3000 < means["chat-bursty-4k"] < 5000
    for n in ("docs-12k", "chat-12k", "docs-chat-12k"):
        assert 10_000 < means[n] < 15_000, (n, means[n])
    assert 28_000 < means["docs-32k"] < 36_000


def test_burstiness() -> None:
    assert 0.9 < _gaps_cv(family_workload("system-4k", 8)) < 1.1  # Poisson
    assert 1.6 < _gaps_cv(family_workload("docs-32k", 8)) < 2.4
    assert 3.0 < _gaps_cv(family_workload("chat-bursty-4k", 8, requests=8000)) < 5.0


def test_system_prompt_is_the_only_shared_part() -> None:
    reqs = family_workload("system-4k", 8, requests=500)
    head = reqs[0].block_hashes[:2]
    assert all(r.block_hashes[:2] == head for r in reqs)
    uses = Counter(h for r in reqs for h in r.block_hashes)
    assert {h for h, n in uses.items() if n > 1} == set(head)


def test_documents_are_shared_deep_and_skewed() -> None:
    reqs = family_workload("docs-12k", 8, requests=3000)
    depth = 8192 // BLOCK
    docs = Counter(r.block_hashes[:depth] for r in reqs if len(r.block_hashes) >= depth)
    shared = {d for d, n in docs.items() if n > 1}
    on_doc = sum(n for d, n in docs.items() if d in shared)
    assert 0.8 < on_doc / len(reqs) < 0.97  # prefix_share 0.9 (a few one-off documents)
    for d in shared:  # a document is shared whole: its blocks are never mixed
        assert len(set(d)) == depth
    counts = sorted(docs.values(), reverse=True)
    assert counts[0] > 10 * statistics.median(counts)  # Zipf: a few hot documents


def test_conversations_repeat_their_history() -> None:
    reqs = family_workload("chat-12k", 8, requests=2000)
    last: dict[str, TraceRequest] = {}
    grew = 0
    for r in reqs:
        prev = last.get(r.session)
        if prev is not None and r.prompt_tokens > prev.prompt_tokens:
            kept = prev.prompt_tokens // BLOCK
            assert r.block_hashes[:kept] == prev.block_hashes[:kept]
            grew += 1
        if r.session:
            last[r.session] = r
    assert grew > 1000
    assert all(r.block_hashes[:2] == reqs[0].block_hashes[:2] for r in reqs)  # system prompt


def test_group_skew_zero_replays_old_seeds() -> None:
    base = SyntheticSpec(count=300, prefix_groups=20, prefix_share=0.8,
                         prompt=LengthDist(600, 0.5, 4096))
    skewed = generate(SyntheticSpec(count=300, prefix_groups=20, prefix_share=0.8,
                                    prompt=LengthDist(600, 0.5, 4096), group_skew=1.5), 0)
    assert generate(base, 0) == generate(SyntheticSpec(
        count=300, prefix_groups=20, prefix_share=0.8, prompt=LengthDist(600, 0.5, 4096),
        group_skew=0.0), 0)
    firsts = Counter(r.block_hashes[0] for r in skewed if r.block_hashes and r.block_hashes[0] < 40)
    assert firsts.most_common(1)[0][0] == 0  # group 0 is the most popular
    with pytest.raises(ValueError):
        SyntheticSpec(count=1, group_skew=-1.0)


def test_at_load() -> None:
    reqs = [TraceRequest("a", 0.0, 900, 100), TraceRequest("b", 1000.0, 900, 100)]
    assert offered_tokens_per_s(reqs) == 2000.0
    slower = at_load(reqs, 2, 500.0)  # 1000 tokens/s for the fleet: half the rate
    assert [r.arrival_ms for r in slower] == [0.0, 2000.0]
    assert at_load(reqs[:1], 2, 500.0) == reqs[:1]  # nothing to scale


def test_mooncake_round_trip(tmp_path: Path) -> None:
    reqs = family_workload("docs-chat-12k", 8, requests=300)
    path = tmp_path / "t.jsonl"
    assert write_mooncake(reqs, path) == len(reqs)
    back = load_mooncake(path)
    assert [r.request_id for r in back] == [f"mc-{i}" for i in range(len(reqs))]
    t0 = round(reqs[0].arrival_ms)
    for a, b in zip(reqs, back, strict=True):
        assert (a.prompt_tokens, a.output_tokens, a.block_hashes, a.session) == (
            b.prompt_tokens, b.output_tokens, b.block_hashes, b.session)
        assert b.arrival_ms == round(a.arrival_ms) - t0


def test_bench_writes_a_family(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "fam.jsonl"
    args = p.parse_args(["--family", "system-4k", "--workers", "4", "--requests", "200",
                         "--write-trace", str(out)])
    assert bench.main(args) == 0
    assert len(load_mooncake(out)) == 200
    with pytest.raises(ValueError, match="not both"):
        bench.main(p.parse_args(["--family", "system-4k", "--trace", str(out), "--out", "x"]))
