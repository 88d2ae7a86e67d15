"""The planner's search, mixed-layout fleets in the simulator, and `cplane plan` output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cplane import cli, plan_cmd
from cplane.fleetsim import planner
from cplane.fleetsim.engine_model import sim_settings
from cplane.fleetsim.gpus import gpu
from cplane.fleetsim.model_config import parse
from cplane.fleetsim.perf_model import Layout
from cplane.fleetsim.sim import FleetSpec, simulate
from cplane.fleetsim.synthetic import LengthDist, SyntheticSpec, generate
from cplane.orchestrator.dispatch import DispatchConfig
from cplane.schemas.settings import SimSettings
from tests.unit.test_planner_perf import LLAMA3_8B, LLAMA3_70B

H100 = gpu("h100-80gb")


def _reqs(n: int = 400, rate: float = 20.0) -> list:
    return generate(SyntheticSpec(rate_per_s=rate, count=n, prompt=LengthDist(800, 0.5, 4096),
                                  output=LengthDist(150, 0.5, 1024)), seed=3)


def test_layouts_prune_what_does_not_fit_and_pp_when_tp_suffices() -> None:
    s = planner.Shape(1000, 200, 8192)
    got = planner.layouts(parse(LLAMA3_70B), H100, 8, "bf16", s.longest)
    assert [(x.tp, x.pp) for x in got] == [(4, 1), (8, 1)]
    # 24 GB per GPU: only a whole node holds the weights; a 32k context needs PP too
    assert [(x.tp, x.pp) for x in planner.layouts(parse(LLAMA3_70B), gpu("a10g"), 16, "bf16",
                                                   s.longest)] == [(8, 1)]
    got = planner.layouts(parse(LLAMA3_70B), gpu("a10g"), 16, "bf16", 200_000)
    assert got and all(x.pp > 1 for x in got)


def test_candidates_cover_unified_and_pd_splits() -> None:
    s = planner.Shape(1000, 200, 8192)
    cands = planner.candidates(parse(LLAMA3_8B), H100, 8, "bf16", s)
    labels = {c.label() for c in cands}
    assert "8x TP1 unified" in labels and "1x TP8 unified" in labels
    assert any(c.prefill and c.decode for c in cands)
    assert all(c.gpus <= 8 for c in cands)
    assert planner.pd_splits(8, 0.3, every=True) == list(range(1, 8))
    assert all(1 <= k < 8 for k in planner.pd_splits(8, 0.99))
    every = planner.candidates(parse(LLAMA3_8B), H100, 64, "bf16", s, every_split=True,
                               max_engines=16)
    slices = [planner.reduced(c, 16)[0] for c in every if c.prefill]
    assert len(slices) == len(set(slices)) >= 3 * 15 + 7  # TP1-4: a 16-slice; TP8: 8 engines


def test_reduced_slice_keeps_the_split_and_scales_goodput() -> None:
    c = planner.Candidate(Layout(), prefill=48, decode=16)
    sim, f = planner.reduced(c, 16)
    assert (sim.prefill, sim.decode) == (12, 4) and f == 4.0
    u, f = planner.reduced(planner.Candidate(Layout(), unified=8), 16)
    assert u.unified == 8 and f == 1.0


def test_search_finds_data_parallel_best_for_a_small_model() -> None:
    """Llama-3-8B on 2 x H100: two TP1 replicas serve more than one TP2 engine (TP
    halves each GPU's work but pays all-reduces and keeps the fixed step costs)."""
    m, reqs = parse(LLAMA3_8B), _reqs(1000)
    cfg = DispatchConfig.named(policy="fifo", router="least_loaded", pd="never")
    res = [planner.evaluate(c, reqs, m, H100, "bf16", cfg, refine=2, per_engine=(500, 500))
           for c in (planner.Candidate(Layout(tp=2), unified=1),
                     planner.Candidate(Layout(tp=1), unified=2))]
    best = planner.rank(res, "goodput")[0]
    assert best.candidate.layout.tp == 1 and best.candidate.unified == 2
    assert best.goodput > res[0].goodput > 0
    assert planner.rank(res, "cost")[0] is best


def test_latency_ranks_only_those_meeting_the_slos_first() -> None:
    def result(good: float, att: float, e2e: float) -> planner.Result:
        c = planner.Candidate(Layout(), unified=1)
        return planner.Result(c, good, False, [], 1, 0.5, 8, c, 1.0, 10, FleetSpec(),
                              {"attainment": att, "p99_e2el_ms": e2e})

    fast_failing, slow_ok, fast_ok = result(9, 0.5, 100), result(5, 1.0, 900), result(4, 1.0,
                                                                                         300)
    assert planner.rank([fast_failing, slow_ok, fast_ok], "latency") == [
        fast_ok, slow_ok, fast_failing]
    assert plan_cmd.OBJECTIVES == planner.OBJECTIVES


def test_a_fleet_can_mix_layouts_and_no_override_changes_nothing() -> None:
    m, reqs = parse(LLAMA3_8B), _reqs(200, 30.0)
    cfg = DispatchConfig.named(policy="fifo", router="round_robin", pd="never")
    plain = simulate(reqs, FleetSpec(workers=2), cfg, seed=1)
    same = simulate(reqs, FleetSpec(workers=2, worker_engines=(SimSettings(), SimSettings())),
                    cfg, seed=1)
    assert [r.first_token_ms for r in plain.records] == [r.first_token_ms for r in same.records]
    fast, slow = (sim_settings(m, H100, Layout(tp=8)), sim_settings(m, gpu("a10g"),
                                                                      Layout(tp=2)))
    mixed = simulate(reqs, FleetSpec(workers=2, worker_engines=(fast, slow),
                                     worker_capacities=(64, 16)), cfg, seed=1)
    by = {w: [r.ttft_ms for r in mixed.records if r.worker == w and r.ttft_ms] for w in
          ("u000", "u001")}
    assert by["u000"] and by["u001"]
    assert sum(by["u000"]) / len(by["u000"]) < sum(by["u001"]) / len(by["u001"])
    with pytest.raises(ValueError, match="per-worker"):
        simulate(reqs, FleetSpec(workers=2, worker_engines=(fast,)), cfg)


def test_plan_predict_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert cli.main(["plan", "predict", "--model", str(tmp_path), "--gpu", "h100-80gb",
                     "--tp", "2", "--batch", "8", "--prompt-tokens", "1024", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("prefill_ms", "decode_step_ms", "tokens_per_s", "fits", "kv_tokens"):
        assert key in out
    assert out["fits"] is True and out["tp"] == 2 and out["prefill_ms"] > 0
    assert cli.main(["plan", "predict", "--model", str(tmp_path), "--gpu", "nope"]) == 2
    assert "unknown GPU" in capsys.readouterr().err


def test_worker_commands_carry_the_layout() -> None:
    c = planner.Candidate(Layout(tp=4, pp=2), prefill=1, decode=2)
    r = planner.Result(c, 1.0, False, [], 1000, 0.5, 32, c, 1.0, 10, FleetSpec())
    cmds = plan_cmd.worker_commands("/models/x", r, "fp8", 4096)
    assert len(cmds) == 2 and "--role prefill" in cmds[0] and "--role decode" in cmds[1]
    for cmd in cmds:
        assert "--tensor-parallel-size 4" in cmd
        assert "pipeline_parallel_size=2" in cmd and "quantization=fp8" in cmd
