"""fleetsim metrics, report and plots: hand-built records with known numbers."""

from __future__ import annotations

import math
import pathlib
import random

import orjson
import pytest
from rich.console import Console

from cplane.fleetsim.metrics import (
    Goodput,
    goodput,
    jain_index,
    percentile,
    shared_cache_bound,
    summarize,
    weighted_percentile,
)
from cplane.fleetsim.plots import plot_goodput, plot_ttft_cdf
from cplane.fleetsim.records import RequestRecord, RunResult, TraceRequest
from cplane.fleetsim.report import jsonable, table, write_json
from tests import traces

_ids = iter(range(1_000_000))


def rec(
    *,
    arrival: float = 0.0,
    ttft: float | None = 100.0,
    tpot: float = 10.0,
    n: int = 11,
    finished: bool = True,
    rejected: str = "",
    cls: str = "standard",
    level: int = 2,
    tenant: str = "default",
    prompt: int = 100,
    queue: float | None = 0.0,
    itl: list[tuple[float, int]] | None = None,
) -> RequestRecord:
    """A record whose TTFT/TPOT come out exactly as given (n output tokens)."""
    req = TraceRequest(
        f"r{next(_ids)}", arrival, prompt, n, tenant=tenant, level=level, slo_class=cls
    )
    if rejected:
        return RequestRecord(req, rejected=rejected)
    first = None if ttft is None else arrival + ttft
    last = None if first is None else first + tpot * max(n - 1, 0)
    return RequestRecord(
        req,
        dispatched_ms=None if queue is None else arrival + queue,
        worker="w0",
        first_token_ms=first,
        last_token_ms=last,
        finished_ms=last if finished else None,
        output_tokens=n if finished else (1 if first is not None else 0),
        itl_ms=list(itl) if itl is not None else [(tpot, n - 1)] if n > 1 else [],
    )


def run_of(records: list[RequestRecord], **kw: object) -> RunResult:
    kw.setdefault("duration_ms", 2000.0)
    return RunResult(records=records, workers=4, **kw)  # type: ignore[arg-type]


# -- percentiles --------------------------------------------------------------------------


def test_percentile_matches_numpy_linear() -> None:
    xs = [500.0, 100.0, 300.0, 200.0, 400.0]
    assert percentile(xs, 50) == 300.0
    assert percentile(xs, 90) == pytest.approx(460.0)
    assert percentile(xs, 99) == pytest.approx(496.0)
    assert percentile(xs, 0) == 100.0 and percentile(xs, 100) == 500.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_weighted_percentile_is_nearest_rank_of_expanded_list() -> None:
    samples = [(50.0, 2), (10.0, 8), (20.0, 10), (99.0, 0)]  # zero weight ignored
    expanded = sorted(v for v, w in samples for _ in range(w))
    for p in (1, 10, 40, 41, 50, 89, 90, 91, 99, 100):
        nearest_rank = expanded[max(math.ceil(p / 100 * len(expanded)), 1) - 1]
        assert weighted_percentile(samples, p) == nearest_rank, p
    assert weighted_percentile(samples, 0) == 10.0
    assert weighted_percentile([], 50) is None


def test_latency_distributions() -> None:
    records = [rec(ttft=t, tpot=t / 10) for t in (500.0, 100.0, 300.0, 200.0, 400.0)]
    s = summarize(run_of(records))
    assert s["mean_ttft_ms"] == pytest.approx(300.0)
    assert s["median_ttft_ms"] == pytest.approx(300.0)
    assert s["p90_ttft_ms"] == pytest.approx(460.0)
    assert s["p99_ttft_ms"] == pytest.approx(496.0)
    assert s["mean_tpot_ms"] == pytest.approx(30.0)
    assert s["median_tpot_ms"] == pytest.approx(30.0)
    assert s["p90_tpot_ms"] == pytest.approx(46.0)
    assert s["p99_tpot_ms"] == pytest.approx(49.6)
    # e2e = ttft + 10 * tpot = 2 * ttft
    assert s["median_e2el_ms"] == pytest.approx(600.0)
    assert s["p99_e2el_ms"] == pytest.approx(992.0)


def test_itl_weighted_by_counts() -> None:
    a = rec(n=11, itl=[(10.0, 8), (50.0, 2)])
    b = rec(n=11, itl=[(20.0, 10)])
    s = summarize(run_of([a, b]))
    # expanded: 8 x 10, 10 x 20, 2 x 50 (20 gaps)
    assert s["mean_itl_ms"] == pytest.approx((80 + 200 + 100) / 20)
    assert s["median_itl_ms"] == 20.0
    assert s["p90_itl_ms"] == 20.0
    assert s["p99_itl_ms"] == 50.0


def test_counts_throughput_and_one_token_request() -> None:
    records = [
        rec(n=11, prompt=100),
        rec(n=1, prompt=50),  # no TPOT
        rec(rejected="overloaded", prompt=70),
        rec(finished=False, prompt=30),
    ]
    s = summarize(run_of(records, duration_ms=2000.0))
    assert (s["num_requests"], s["completed"], s["failed"], s["unfinished"]) == (4, 2, 1, 1)
    assert s["duration_s"] == 2.0
    assert s["total_input_tokens"] == 150 and s["total_output_tokens"] == 12
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(6.0)
    assert s["total_token_throughput"] == pytest.approx(81.0)
    assert s["mean_tpot_ms"] == pytest.approx(10.0)  # only the 11-token request


# -- attainment ---------------------------------------------------------------------------


def test_attainment_per_class() -> None:
    records = [
        # interactive: TTFT <= 250, TPOT <= 100
        rec(cls="interactive", ttft=200, tpot=50),  # good
        rec(cls="interactive", ttft=300, tpot=50),  # TTFT too slow
        rec(cls="interactive", ttft=100, tpot=150),  # TPOT too slow
        rec(cls="interactive", ttft=200, tpot=999, n=1),  # one token: TTFT alone, good
        # standard: TTFT <= 1000, TPOT <= 100
        rec(cls="standard", ttft=1000, tpot=100),  # exactly at target: good
        rec(cls="standard", rejected="queue_full"),  # rejected: never good
        rec(cls="standard", ttft=10, finished=False),  # unfinished: never good
        # batch: TTFT <= 30 s, TPOT <= 500
        rec(cls="batch", ttft=20_000, tpot=400),
    ]
    s = summarize(run_of(records))
    assert s["attainment_by_class"] == pytest.approx(
        {"batch": 1.0, "interactive": 0.5, "standard": 1 / 3}
    )
    assert s["attainment"] == pytest.approx(0.5)


def test_unknown_slo_class_fails_loudly() -> None:
    with pytest.raises(ValueError, match="premium"):
        summarize(run_of([rec(cls="premium")]))


def test_ttft_by_priority_and_queue() -> None:
    records = [rec(level=0, ttft=t, queue=t / 2) for t in (10.0, 20.0, 30.0)]
    records += [rec(level=2, ttft=100.0, queue=50.0), rec(level=4, rejected="shed")]
    s = summarize(run_of(records))
    by = s["ttft_by_priority"]
    assert set(by) == {"critical", "normal"}
    assert by["critical"]["count"] == 3
    assert by["critical"]["p50"] == 20.0
    assert by["critical"]["p90"] == pytest.approx(28.0)
    assert by["normal"]["p99"] == 100.0
    assert s["mean_queue_ms"] == pytest.approx((5 + 10 + 15 + 50) / 4)
    assert s["p99_queue_ms"] == pytest.approx(15 + 0.97 * 35)


# -- goodput ------------------------------------------------------------------------------


def test_goodput_interpolates_between_last_pass_and_first_fail() -> None:
    pts = [(4.0, 0.5), (1.0, 1.0), (3.0, 0.85), (2.0, 0.95)]  # unsorted on purpose
    g = goodput(pts)
    assert g.rate == pytest.approx(2.5) and not g.lower_bound
    assert goodput(pts, threshold=0.5).rate == 4.0  # attainment == threshold passes
    assert goodput(pts, threshold=0.5).lower_bound


def test_goodput_edges() -> None:
    assert goodput([(1.0, 0.8), (2.0, 0.7)]) == Goodput(0.0, False)
    assert goodput([(1.0, 0.99), (2.0, 0.95)]) == Goodput(2.0, True)
    # A pass after the first failure does not count: capacity ended at the failure.
    assert goodput([(1.0, 1.0), (2.0, 0.8), (3.0, 0.95)]).rate == pytest.approx(1.5)
    assert goodput([(5.0, 0.9)]) == Goodput(5.0, True)
    with pytest.raises(ValueError):
        goodput([])


# -- fairness and imbalance ---------------------------------------------------------------


def test_jain_index() -> None:
    assert jain_index([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain_index([1.0, 0.5]) == pytest.approx(0.9)
    assert jain_index([]) is None and jain_index([0.0, 0.0]) is None


def test_jain_fairness_over_tenants() -> None:
    equal = [rec(tenant=t, prompt=p, n=n) for t in "ab" for p, n in ((100, 11), (400, 3))]
    s = summarize(run_of(equal))
    assert s["tenants"] == 2 and s["jain_fairness"] == pytest.approx(1.0)
    one_takes_all = [rec(tenant="a")] + [rec(tenant=t, rejected="shed") for t in "bcd"]
    assert summarize(run_of(one_takes_all))["jain_fairness"] == pytest.approx(0.25)
    # b: prefill done + 1 output token = 101 of its 111 tokens; a: all 111 of its 111
    half = [rec(tenant="a", prompt=100, n=11), rec(tenant="b", prompt=100, n=11, finished=False)]
    xb = 101 / 111
    assert summarize(run_of(half))["jain_fairness"] == pytest.approx(
        (1 + xb) ** 2 / (2 * (1 + xb * xb))
    )


def test_load_imbalance_and_prefix_and_events() -> None:
    samples = [
        (0.0, (2, 2, 2, 2)),  # 1.0
        (100.0, (4, 0, 0, 0)),  # 4.0
        (200.0, (0, 0, 0, 0)),  # idle: skipped
        (300.0, (3, 1, 1, 3)),  # 1.5
    ]
    run = run_of(
        [rec()],
        load_samples=samples,
        prefix_hit_tokens=300,
        prefix_query_tokens=1000,
        events=1000,
        wall_s=0.5,
    )
    s = summarize(run)
    assert s["mean_load_imbalance"] == pytest.approx(6.5 / 3)
    assert s["p99_load_imbalance"] == pytest.approx(1.5 + 0.98 * 2.5)
    assert s["prefix_hit_rate"] == pytest.approx(0.3)
    assert s["events"] == 1000 and s["events_per_s"] == pytest.approx(2000.0)
    s0 = summarize(run_of([rec()]))
    assert s0["prefix_hit_rate"] == 0.0
    assert s0["mean_load_imbalance"] is None and s0["events_per_s"] is None


def test_empty_run_is_json_safe(tmp_path: pathlib.Path) -> None:
    s = summarize(RunResult(records=[], workers=2, duration_ms=0.0))
    assert s["completed"] == 0 and s["attainment"] is None
    assert s["request_throughput"] is None and s["jain_fairness"] is None
    payload = {
        "summary": s,
        "goodput": Goodput(1.5, True),
        "bad": float("nan"),
        "keys": {3: (1.0, float("inf"))},
    }
    path = write_json(tmp_path / "sub" / "out.json", payload)
    back = orjson.loads(path.read_bytes())
    assert back["bad"] is None and back["keys"] == {"3": [1.0, None]}
    assert back["goodput"] == {"rate": 1.5, "lower_bound": True}
    assert back["summary"] == jsonable(s)
    assert not (tmp_path / "sub" / "out.json.tmp").exists()


# -- shared cache bound -------------------------------------------------------------------


def _tr(arrival: float, blocks: tuple[int, ...]) -> TraceRequest:
    return TraceRequest(f"t{arrival}", arrival, 512 * len(blocks), 1, block_hashes=blocks)


def test_shared_cache_bound_hand_example() -> None:
    reqs = [_tr(0, (1, 2)), _tr(1, (1, 3)), _tr(2, (1, 2)), _tr(3, (3, 1))]
    shuffled = reqs[::-1]  # replay must follow arrival order, not list order
    # capacity 2: A 0 hits -> {1,2}; B hits 1 -> {1,3}; C hits 1 -> {1,2};
    # D misses 3 first, so 1 (cached) does not count: prefix semantics.
    assert shared_cache_bound(shuffled, 2) == pytest.approx(2 / 8)
    # unlimited: A 0, B 1, C 2, D 2
    assert shared_cache_bound(shuffled, 0) == pytest.approx(5 / 8)
    assert shared_cache_bound(shuffled, -1) == pytest.approx(5 / 8)
    assert shared_cache_bound([], 10) == 0.0


def _mooncake() -> list[TraceRequest]:
    path = traces.need(traces.MOONCAKE)
    reqs = []
    for i, line in enumerate(path.read_bytes().splitlines()):
        if line.strip():
            d = orjson.loads(line)
            reqs.append(
                TraceRequest(
                    f"m{i}",
                    float(d["timestamp"]),
                    d["input_length"],
                    d["output_length"],
                    tuple(d["hash_ids"]),
                )
            )
    return reqs


def test_shared_cache_bound_mooncake() -> None:
    reqs = _mooncake()
    assert len(reqs) > 12_000
    assert shared_cache_bound(reqs, 0) == pytest.approx(0.366, abs=0.02)
    assert shared_cache_bound(reqs, 8 * 900) == pytest.approx(0.163, abs=0.02)


# -- plots and table ----------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path: pathlib.Path) -> None:
    curves = {
        "fcfs/random": [(1.0, 1.0), (2.0, 0.8), (3.0, 0.4)],
        "prio/prefix": [(3.0, 0.9), (1.0, 1.0), (2.0, 0.97)],
    }
    g = plot_goodput(curves, tmp_path / "goodput.png")
    rng = random.Random(7)
    samples = {
        "fcfs/random": [rng.lognormvariate(5, 1) for _ in range(200)],
        "prio/prefix": [0.0, 5.0, 50.0, 500.0],
        "empty": [],
    }
    c = plot_ttft_cdf(samples, tmp_path / "deep" / "ttft.png")
    for p in (g, c):
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_table_renders() -> None:
    s = summarize(
        run_of(
            [rec(ttft=t) for t in (100.0, 200.0)],
            load_samples=[(0.0, (3, 1))],
            prefix_hit_tokens=1,
            prefix_query_tokens=4,
        )
    )
    rows = [
        {"policy": "fcfs", "router": "round_robin", "goodput": Goodput(3.25, False), "summary": s},
        {"policy": "priority", "router": "prefix_load", "goodput": Goodput(8.0, True), **s},
        {"policy": "priority", "router": "least_loaded", "goodput": None, "summary": jsonable(s)},
        orjson.loads(
            orjson.dumps(
                jsonable(
                    {
                        "policy": "p",
                        "router": "json_router",
                        "goodput": Goodput(1.0, True),
                        "summary": s,
                    }
                )
            )
        ),
    ]
    console = Console(record=True, width=220)
    console.print(table(rows, title="sweep"))
    text = console.export_text()
    for router in ("round_robin", "prefix_load", "least_loaded", "json_router"):
        assert router in text
    assert "3.25" in text and ">=8.00" in text and ">=1.00" in text
    assert "25.0%" in text  # prefix hit 1/4
    assert "1.50" in text  # imbalance 3 / 2


def test_maxmin_shares_measure_service_against_the_fair_split() -> None:
    from cplane.fleetsim.metrics import maxmin_shares

    def r(i: int, tenant: str, arrival: float, sent: float | None) -> RequestRecord:
        x = RequestRecord(TraceRequest(f"{tenant}{i}", arrival, 50, 50, tenant=tenant))
        x.dispatched_ms = sent
        return x

    # a asks for 8 units of 100 tokens, b for 2; 6 were served in the window:
    # the fair split gives b all it asked (2) and a the rest (4).
    fair = [r(i, "a", i, i) for i in range(4)] + [r(i, "b", i, i) for i in range(2)] + \
        [r(i, "a", 4 + i, None) for i in range(4)]
    assert maxmin_shares(fair) == {"a": 1.0, "b": 1.0}
    # the same 6 all to a: b got nothing of its share
    unfair = [r(i, "a", i, i) for i in range(6)] + [r(i, "a", 6 + i, None) for i in range(2)] + \
        [r(i, "b", i, None) for i in range(2)]
    shares = maxmin_shares(unfair)
    assert shares["b"] == 0.0 and shares["a"] == pytest.approx(1.5)
