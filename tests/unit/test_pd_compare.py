"""bench/pd_compare.py's helpers, the sweep's search, and the engine step's interference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import pd_compare as pdc
from cplane.fleetsim.bench import crossing
from cplane.fleetsim.gpus import gpu
from cplane.fleetsim.model_config import parse
from cplane.fleetsim.perf_model import Layout
from cplane.fleetsim.records import RequestRecord, SloTarget, TraceRequest
from cplane.fleetsim.worker import Item, SimWorker
from cplane.schemas.messages import Role
from cplane.schemas.settings import SimSettings
from cplane.workers.engines.stepcore import fused_ms
from tests.unit.test_planner_perf import LLAMA3_8B

H100 = gpu("h100-80gb")


def test_parse_slo() -> None:
    assert pdc.parse_slo("tight=300/40") == ("tight", SloTarget(ttft_ms=300, tpot_ms=40))
    for bad in ("tight", "tight=300", "=300/40", "t=a/40", "t=0/40"):
        with pytest.raises(ValueError):
            pdc.parse_slo(bad)


def test_links_and_kv_transfer_per_token() -> None:
    assert pdc.link_gb_s(H100, "node") == 450  # 900 GB/s NVLink is both directions
    assert pdc.link_gb_s(H100, "50") == 50
    with pytest.raises(ValueError):
        pdc.link_gb_s(H100, "fast")
    m = parse(LLAMA3_8B)
    # 128 KiB per token (32 layers x 8 KV heads x 128 x K,V x 2 bytes) at 0.7 x 50 GB/s
    assert pdc.kv_ms_per_token(m, Layout(), 50) == pytest.approx(131072 / 35e9 * 1e3)
    # TP2: each GPU sends half the heads over its own link
    assert pdc.kv_ms_per_token(m, Layout(tp=2), 50) == pytest.approx(
        pdc.kv_ms_per_token(m, Layout(), 50) / 2)
    # a 12k-token Mooncake prompt: ~5 ms over NVLink, ~45 ms over one 400 Gb/s NIC
    assert 12_000 * pdc.kv_ms_per_token(m, Layout(), 450) == pytest.approx(5.0, abs=0.1)
    assert 12_000 * pdc.kv_ms_per_token(m, Layout(), 50) == pytest.approx(44.9, abs=0.1)


def _rec(ttft: float | None, tpot: float, n: int = 11, rejected: str = "") -> RequestRecord:
    r = RequestRecord(TraceRequest("r", 0.0, 100, n))
    if ttft is not None:
        r.first_token_ms = ttft
        r.last_token_ms = ttft + tpot * (n - 1)
        r.finished_ms = r.last_token_ms
        r.output_tokens = n
    r.rejected = rejected
    return r


def test_attainment_counts_every_request() -> None:
    t = SloTarget(ttft_ms=300, tpot_ms=40)
    recs = [_rec(100, 30), _rec(400, 30), _rec(100, 50), _rec(None, 0), _rec(100, 30,
                                                                            rejected="x")]
    assert pdc.attainment(recs, t) == pytest.approx(1 / 5)
    assert pdc.attainment([], t) == 0.0


def test_one_class_and_fleets() -> None:
    r = TraceRequest("a", 0, 10, 5, tenant="t", level=0, slo_class="interactive")
    (got,) = pdc.one_class([r])
    assert (got.slo_class, got.tenant, got.level) == ("standard", "default", 2)
    modes = [(c.unified, c.prefill, c.decode) for c in pdc.fleets(4, 0.3, every=True)]
    assert modes == [(4, 0, 0), (0, 1, 3), (0, 2, 2), (0, 3, 1)]


def test_verdict_picks_the_best_split_per_slo() -> None:
    def row(mode: str, p: int, loose: float, tight: float, ttft: float, tpot: float) -> dict:
        return {"mode": mode, "prefill": p, "goodput": {"loose": loose, "tight": tight},
                "ref": {"p99_ttft_ms": ttft, "p99_tpot_ms": tpot}}

    rows = [row("unified", 0, 10, 2, 100, 50), row("PD 1:3", 1, 8, 3, 150, 20),
            row("PD 2:2", 2, 6, 4, 80, 25)]
    v = pdc.verdict(rows, "tight")
    assert v["best_pd"] == "PD 2:2" and v["goodput_change"] == pytest.approx(1.0)
    assert v["ttft_p99_change"] == pytest.approx(-0.2) and v["tpot_p99_change"] == (
        pytest.approx(-0.5))
    assert pdc.verdict(rows, "loose")["goodput_change"] == pytest.approx(-0.2)
    assert pdc.verdict(rows[:1], "loose") == {}
    assert pdc.change(1, 0) is None and pdc.change(None, 1) is None


def test_crossing_doubles_then_bisects_within_max_points() -> None:
    seen: list[float] = []

    def at(f: float) -> float:
        seen.append(f)
        return 1.0 if f <= 3 else 0.5

    crossing(at, refine=2, max_points=10)
    assert seen == [1, 2, 4, 3, 3.5]
    seen.clear()

    def fails(f: float) -> float:
        seen.append(f)
        return 0.0

    crossing(fails, refine=3, max_points=10)
    assert seen == [1, 0.5, 0.25, 0.125, 0.0625]  # max_points // 2 calls in all


def _worker(fused: bool) -> SimWorker:
    s = SimSettings(prefix_cache_tokens=0)
    w = SimWorker("u000", Role.UNIFIED, "sim", 64, s, 1, fused_steps=fused)
    for i in range(8):  # eight sequences decoding, 1000 tokens of context each
        w.take([Item(RequestRecord(TraceRequest(f"d{i}", 0, 1000, 200)), ("", ""),
                     Role.UNIFIED)], 0.0, 0.0)
    run = w.plan(0.0)
    assert run is not None
    w.finish_run(run)
    return w


def test_a_prefill_in_a_unified_step_stalls_its_decodes() -> None:
    """The interference PD removes: a long prompt admitted into a busy engine makes
    every running sequence wait for its prefill (the step is prefill + decode)."""
    w = _worker(False)
    s = w.core.s
    decode_only = w.core.step_ms([], w.core.running)
    w.take([Item(RequestRecord(TraceRequest("p", 0, 8000, 10)), ("", ""), Role.UNIFIED)],
           0.0, 0.0)
    run = w.plan(0.0)
    assert run is not None
    prefill = s.prefill_a_ms + s.prefill_b_ms * 8000 + s.prefill_c_ms * 8000**2
    assert run.end_ms - run.start_ms == pytest.approx(decode_only + prefill)
    assert prefill > 10 * decode_only  # the decodes' next token comes ~13x later


def test_fused_steps_share_the_weight_read_and_default_is_the_sum() -> None:
    s = SimSettings()
    assert fused_ms(s, 100.0, 8) == pytest.approx(100 - s.decode_a_ms + 8 * s.prefill_b_ms)
    assert fused_ms(SimSettings(zero_cost=True), 0.0, 8) == 0.0
    plain, fused = _worker(False), _worker(True)
    for w in (plain, fused):
        w.take([Item(RequestRecord(TraceRequest("p", 0, 2000, 10)), ("", ""),
                     Role.UNIFIED)], 0.0, 0.0)
    a, b = plain.plan(0.0), fused.plan(0.0)
    assert a is not None and a.step is not None and b is not None
    assert a.end_ms == pytest.approx(plain.core.step_ms(a.step.prefills, a.step.decodes))
    assert b.end_ms == pytest.approx(fused_ms(s, a.end_ms, 8))
    # decode-only steps are the same either way
    assert plain.core.decode_run_ms(3) == fused.core.decode_run_ms(3)


def test_the_script_end_to_end_on_a_tiny_synthetic_fleet(tmp_path: Path) -> None:
    out = tmp_path / "pd.json"
    assert pdc.main(["--gpus", "2", "--requests", "300", "--per-engine", "60:60", "--refine",
                     "1", "--links", "node,50", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    (block,) = d["blocks"]
    modes = [(r["mode"], r["link_gb_s"]) for r in block["rows"]]
    # every fleet at the node link (NVLink, 450 GB/s a direction), the best split at 50
    assert modes == [("unified", 450), ("PD 1:1", 450), ("PD 1:1", 50)]
    assert set(block["rows"][0]["goodput"]) == {"loose", "tight"}
    assert all("p99_tpot_ms" in r["ref"] for r in block["rows"])
    best = pdc.best_pd(block["rows"], "loose")
    assert best is not None and best["mode"] == "PD 1:1"
