"""Unified against prefill/decode disaggregation (PD) at equal GPU count, on the simulator.

    .venv/bin/python bench/pd_compare.py \\
        --trace ../shared/traces/mooncake_conversation_trace.jsonl --gpus 8 --links node,50 \\
        --slo loose=10000/100 --slo tight=3000/35 --json pd-mooncake.json

For one model (`--model`: a Hugging Face folder, or a built-in Llama-3.1
`llama3-8b` / `llama3-70b` config written to a temporary folder, as
`cplane plan --model` reads it) on one GPU of the catalogue, every fleet of
`--gpus` GPUs with engines of one layout: all unified, and the PD splits
p:d (all of them up to 8 engines, else the planner's choice near the work
ratio). Engines are priced by the performance model (fleetsim/engine_model.py);
the KV hand-off of PD costs `1 ms + prompt x KV bytes per token / link`
(each GPU of an engine sends its shard over its own link) for each `--links`
entry: `node` = the GPU's intra-node link, one direction (NVLink), or a
number in GB/s per GPU (50 = one 400 Gb/s NIC, between nodes). Every link
figure is taken at 0.7 of nominal (the all-reduce bus efficiency fitted in
perf_model). Every candidate is simulated at the first link; the best PD
split per SLO setting again at the others.

Measured per candidate: goodput@90 per SLO setting (the rate sweep of
`cplane bench policies`, one simulation per rate judged under every SLO
setting), and TTFT / TPOT p50 and p99 at one reference rate common to all
candidates (`--ref-fraction` of the unified fleet's goodput under the first
SLO setting, or `--ref-rate`). Every request is judged against the same
targets (one class), nothing is shed, and the decision code is the live one
(`--policy fifo --router least_loaded`, the planner's defaults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from cplane.fleetsim import metrics
from cplane.fleetsim.bench import crossing
from cplane.fleetsim.gpus import Gpu, gpu
from cplane.fleetsim.model_config import ModelConfig, load
from cplane.fleetsim.perf_model import Layout, kv_bytes_per_token, kv_ms_per_token
from cplane.fleetsim.planner import (
    Candidate,
    capacity_estimate,
    fleet_for,
    offered_rate,
    pd_splits,
    prefill_share,
    requests_per_engine,
    shape_of,
)
from cplane.fleetsim.records import RequestRecord, SloTarget, TraceRequest
from cplane.fleetsim.sim import FleetSpec, simulate
from cplane.fleetsim.synthetic import LengthDist, SyntheticSpec, generate
from cplane.fleetsim.workload import load_trace, scale_rate, slice_requests
from cplane.orchestrator.dispatch import DispatchConfig

# Llama-3.1 configs (the 128k-context release: Mooncake's prompts pass 8k).
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
         "num_key_value_heads": 8, "max_position_embeddings": 131072,
         "torch_dtype": "bfloat16", "rope_theta": 500000.0}
BUILTIN: dict[str, dict[str, Any]] = {
    "llama3-8b": {**LLAMA, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_attention_heads": 32, "num_hidden_layers": 32},
    "llama3-70b": {**LLAMA, "hidden_size": 8192, "intermediate_size": 28672,
                   "num_attention_heads": 64, "num_hidden_layers": 80},
}
DEFAULT_SLOS = ("loose=2000/100", "tight=250/25")  # Azure-sized; docs/pd.md sizes Mooncake's
CLASS = "standard"  # every request's class: one set of targets per judgement


# -- pure helpers (tests/unit/test_pd_compare.py) -----------------------------------
def parse_slo(text: str) -> tuple[str, SloTarget]:
    """`tight=300/40` -> ("tight", TTFT 300 ms, TPOT 40 ms); ValueError otherwise."""
    name, sep, rest = text.partition("=")
    ttft, slash, tpot = rest.partition("/")
    try:
        target = SloTarget(ttft_ms=float(ttft), tpot_ms=float(tpot))
    except ValueError:
        target = None
    if not sep or not slash or not name.strip() or target is None or min(
            target.ttft_ms, target.tpot_ms) <= 0:
        raise ValueError(f"bad --slo {text!r} (want NAME=TTFT_MS/TPOT_MS, e.g. tight=300/40)")
    return name.strip(), target


def link_gb_s(g: Gpu, name: str) -> float:
    """Nominal bandwidth per GPU, one direction: `node` = the GPU's intra-node link
    (the catalogue quotes both directions together), else a number in GB/s."""
    if name == "node":
        return g.link_gb_s / 2
    try:
        v = float(name)
    except ValueError:
        raise ValueError(f"bad link {name!r} (want node or GB/s, e.g. 50)") from None
    if v <= 0:
        raise ValueError(f"bad link {name!r}: must be > 0")
    return v


def attainment(records: Sequence[RequestRecord], target: SloTarget) -> float:
    """Share of all requests that met both targets (DistServe; rejected = not good)."""
    if not records:
        return 0.0
    return sum(metrics.is_good(r, target) for r in records) / len(records)


def one_class(reqs: Sequence[TraceRequest]) -> list[TraceRequest]:
    """Every request in one class, one tenant and one priority: the comparison judges
    each against the same targets, and no policy reorders them."""
    return [replace(r, slo_class=CLASS, tenant="default", level=2) for r in reqs]


def fleets(engines: int, share: float, every: bool) -> list[Candidate]:
    """Unified first, then PD splits (prefill engines ascending); layout filled later."""
    out = [Candidate(Layout(), unified=engines)]
    out += [Candidate(Layout(), prefill=k, decode=engines - k)
            for k in pd_splits(engines, share, every)]
    return out


def change(new: float | None, old: float | None) -> float | None:
    """new / old - 1 (None when either is missing or old is 0)."""
    if new is None or old is None or old == 0:
        return None
    return new / old - 1


def best_pd(rows: Sequence[Mapping[str, Any]], slo: str) -> Mapping[str, Any] | None:
    """The PD row with the most goodput under `slo` (fewer prefill engines on a tie)."""
    pds = [r for r in rows if r["mode"] != "unified"]
    return max(pds, key=lambda r: (r["goodput"][slo], -r["prefill"])) if pds else None


def verdict(rows: Sequence[Mapping[str, Any]], slo: str) -> dict[str, Any]:
    """The best PD row against the unified row at one link, for one SLO setting:
    goodput change, and p99 TTFT / TPOT change at the reference rate."""
    uni = next((r for r in rows if r["mode"] == "unified"), None)
    best = best_pd(rows, slo)
    if uni is None or best is None:
        return {}
    return {"slo": slo, "best_pd": best["mode"], "unified_goodput": uni["goodput"][slo],
            "pd_goodput": best["goodput"][slo],
            "goodput_change": change(best["goodput"][slo], uni["goodput"][slo]),
            "ttft_p99_change": change(best["ref"]["p99_ttft_ms"], uni["ref"]["p99_ttft_ms"]),
            "tpot_p99_change": change(best["ref"]["p99_tpot_ms"], uni["ref"]["p99_tpot_ms"])}


# -- evaluation ---------------------------------------------------------------------
@dataclass
class Setup:
    """What every candidate of one comparison shares."""

    model: ModelConfig
    gpu: Gpu
    layout: Layout
    dtype: str
    cfg: DispatchConfig
    slos: dict[str, SloTarget]
    per_engine: tuple[int, int]
    refine: int
    seed: int
    fused: bool = False  # FleetSpec.fused_steps: a mixed step is one forward pass


def _fleet(c: Candidate, pool: Sequence[TraceRequest], st: Setup, link: float) -> FleetSpec:
    base = FleetSpec(shed=False, fused_steps=st.fused)
    f = fleet_for(c, st.model, st.gpu, st.dtype, shape_of(pool), base)
    b = kv_ms_per_token(st.model, st.layout, link)
    return replace(f, engine=msgspec.structs.replace(f.engine, kv_transfer_b_ms=b))


def evaluate(c: Candidate, pool: Sequence[TraceRequest], st: Setup, link: float
             ) -> dict[str, Any]:
    """Goodput per SLO setting from one rate sweep (each simulation judged under every
    setting), as the planner sizes it: requests per engine for steady state, rates
    from 0.6 x the performance model's capacity estimate."""
    s = shape_of(pool)
    n = requests_per_engine(c, st.model, st.gpu, st.dtype, s, *st.per_engine) * c.engines
    part = list(pool[:n])
    start = max(1e-3, 0.6 * capacity_estimate(c, st.model, st.gpu, st.dtype, s))
    part = scale_rate(part, start / offered_rate(part))
    base = offered_rate(part)
    fleet = _fleet(c, pool, st, link)
    runs: dict[float, dict[str, float]] = {}
    t0 = time.perf_counter()

    def at(factor: float, name: str) -> float:
        if factor not in runs:
            run = simulate(scale_rate(part, factor), fleet, st.cfg, seed=st.seed)
            runs[factor] = {k: attainment(run.records, t) for k, t in st.slos.items()}
        return runs[factor][name]

    good: dict[str, float] = {}
    lower: dict[str, bool] = {}
    for name in st.slos:
        crossing(partial(at, name=name), refine=st.refine, max_points=10)
        pts = sorted((base * f, a[name]) for f, a in runs.items())
        g = metrics.goodput(pts)
        good[name], lower[name] = g.rate, g.lower_bound
    return {"mode": c.mode,
            "engines": c.engines, "gpus": c.gpus, "prefill": c.prefill, "decode": c.decode,
            "link_gb_s": link, "goodput": good, "goodput_lower_bound": lower,
            "sweep": {name: sorted((base * f, a[name]) for f, a in runs.items())
                      for name in st.slos},
            "requests_per_point": len(part), "slots": fleet.capacity,
            "kv_ms_per_token": fleet.engine.kv_transfer_b_ms,
            "sweep_runs": len(runs), "sweep_wall_s": time.perf_counter() - t0}


def at_reference(row: dict[str, Any], c: Candidate, pool: Sequence[TraceRequest], st: Setup,
                 rate: float) -> None:
    """Latency at a common fleet-wide rate (fills row["ref"])."""
    part = list(pool[:row["requests_per_point"]])
    fleet = _fleet(c, pool, st, row["link_gb_s"])
    run = simulate(scale_rate(part, rate / offered_rate(part)), fleet, st.cfg, seed=st.seed)
    summ = metrics.summarize(run, {CLASS: next(iter(st.slos.values()))})
    row["ref"] = {k: summ.get(k) for k in (
        "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "p99_e2el_ms",
        "request_throughput", "prefix_hit_rate")}
    row["ref"]["rate"] = rate
    row["ref"]["attainment"] = {k: attainment(run.records, t) for k, t in st.slos.items()}


def compare(pool: Sequence[TraceRequest], st: Setup, n_gpus: int, links: Sequence[float],
            every: bool, ref_fraction: float, ref_rate: float | None,
            console: Console) -> dict[str, Any]:
    """Every candidate at the first link, the best PD splits again at the others."""
    lay = st.layout
    engines = n_gpus // lay.gpus
    if engines < 2:
        raise ValueError(f"{n_gpus} GPUs hold {engines} engine(s) of {lay.label()}: PD needs 2")
    share = prefill_share(st.model, st.gpu, lay, st.dtype, shape_of(pool))
    cands = [replace(c, layout=lay) for c in fleets(engines, share, every)]
    rows: list[dict[str, Any]] = []
    by_mode: dict[str, Candidate] = {}
    for c in cands:
        row = evaluate(c, pool, st, links[0])
        by_mode[row["mode"]] = c
        rows.append(row)
        console.log(f"{n_gpus} GPUs {row['mode']:>9} link {links[0]:g} GB/s: goodput "
                    + ", ".join(f"{k} {v:.2f}" for k, v in row["goodput"].items())
                    + f" req/s ({row['sweep_runs']} runs, {row['sweep_wall_s']:.0f} s)")
    first = next(iter(st.slos))
    rate = ref_rate if ref_rate else ref_fraction * rows[0]["goodput"][first]
    rate = rate if rate > 0 else 0.5 * max(r["goodput"][first] for r in rows)
    best = {r["mode"] for k in st.slos if (r := best_pd(rows, k)) is not None}
    for link in links[1:]:
        for mode in sorted(best):
            row = evaluate(by_mode[mode], pool, st, link)
            rows.append(row)
            console.log(f"{n_gpus} GPUs {mode:>9} link {link:g} GB/s: goodput "
                        + ", ".join(f"{k} {v:.2f}" for k, v in row["goodput"].items()))
    for row in rows:
        at_reference(row, by_mode[row["mode"]], pool, st, rate)
    verdicts = {f"{link:g}": [verdict([r for r in rows if r["link_gb_s"] == link
                                       or r["mode"] == "unified"], k) for k in st.slos]
                for link in links}
    return {"gpus": n_gpus, "engines": engines, "prefill_share": share, "ref_rate": rate,
            "rows": rows, "verdicts": verdicts}


# -- output -------------------------------------------------------------------------
def _f(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.0%}"


def table(block: Mapping[str, Any], slos: Sequence[str], title: str) -> Table:
    t = Table(title=title)
    for h in ("fleet", "link GB/s", *(f"goodput {k} req/s" for k in slos),
              "TTFT p50/p99 ms", "TPOT p50/p99 ms", *(f"att. {k}" for k in slos)):
        t.add_column(h, justify="left" if h == "fleet" else "right")
    for r in block["rows"]:
        ref = r["ref"]
        t.add_row(r["mode"], _f(r["link_gb_s"], "g"),
                  *(_f(r["goodput"][k], ".2f") + ("+" if r["goodput_lower_bound"][k] else "")
                    for k in slos),
                  f"{_f(ref['median_ttft_ms'])} / {_f(ref['p99_ttft_ms'])}",
                  f"{_f(ref['median_tpot_ms'], '.1f')} / {_f(ref['p99_tpot_ms'], '.1f')}",
                  *(f"{ref['attainment'][k]:.0%}" for k in slos))
    return t


def markdown(block: Mapping[str, Any], slos: Sequence[str]) -> str:
    """The table as docs/pd.md prints it."""
    head = ["fleet", "link GB/s", *(f"goodput {k}" for k in slos), "TTFT p50 / p99 ms",
            "TPOT p50 / p99 ms", *(f"attain. {k}" for k in slos)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in block["rows"]:
        ref = r["ref"]
        cells = [r["mode"], _f(r["link_gb_s"], "g"),
                 *(_f(r["goodput"][k], ".2f") + ("+" if r["goodput_lower_bound"][k] else "")
                   for k in slos),
                 f"{_f(ref['median_ttft_ms'])} / {_f(ref['p99_ttft_ms'])}",
                 f"{_f(ref['median_tpot_ms'], '.1f')} / {_f(ref['p99_tpot_ms'], '.1f')}",
                 *(f"{ref['attainment'][k]:.0%}" for k in slos)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------
def model_from(name: str, tmp: Path) -> ModelConfig:
    """A folder with config.json, or a built-in config written to `tmp` first."""
    if name in BUILTIN:
        d = tmp / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(BUILTIN[name]))
        return load(d)
    return load(name)


def workload(args: argparse.Namespace) -> list[TraceRequest]:
    if args.trace:
        reqs = load_trace(args.trace)
    else:
        reqs = generate(SyntheticSpec(rate_per_s=20.0, count=args.requests or 6000,
                                      prompt=LengthDist(1000, 1.0, 8192),
                                      output=LengthDist(200, 0.8, 2048)), seed=args.seed)
    return one_class(slice_requests(reqs, start=args.start, count=args.requests))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=None, help="Azure CSV or Mooncake JSONL "
                    "(default: a synthetic stream, ~1000-token prompts)")
    ap.add_argument("--model", default="llama3-8b",
                    help=f"a config.json folder, or one of {sorted(BUILTIN)}")
    ap.add_argument("--gpu", default="h100-80gb", help="a GPU of fleetsim/gpus.py")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of every engine")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--gpus", default="8", help="GPU counts, comma-separated (e.g. 8,16)")
    ap.add_argument("--links", default="node,50",
                    help="KV links: node (intra-node, one direction) or GB/s per GPU")
    ap.add_argument("--slo", action="append", metavar="NAME=TTFT_MS/TPOT_MS",
                    help=f"an SLO setting (repeat; default {' '.join(DEFAULT_SLOS)})")
    ap.add_argument("--every-split", action="store_true",
                    help="every p:d split (default: every one up to 8 engines, else the "
                         "planner's splits near the work ratio)")
    ap.add_argument("--requests", type=int, default=None, help="first N requests of the trace")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--per-engine", default="200:600", metavar="LO:HI",
                    help="requests per simulated engine per sweep point (planner's rule)")
    ap.add_argument("--refine", type=int, default=3, help="bisection steps of each sweep")
    ap.add_argument("--ref-fraction", type=float, default=0.75,
                    help="reference rate = this x the unified fleet's goodput (first SLO)")
    ap.add_argument("--ref-rate", type=float, default=None, help="a fixed reference rate")
    ap.add_argument("--quick", action="store_true",
                    help="100-300 requests per engine, 2 bisection steps, planner's splits")
    ap.add_argument("--fused", action="store_true",
                    help="a unified step that prefills and decodes is one forward pass "
                         "(vLLM V1; default: a prefill pass then a decode pass)")
    ap.add_argument("--policy", default="fifo")
    ap.add_argument("--router", default="least_loaded")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="FILE")
    ap.add_argument("--markdown", action="store_true", help="also print markdown tables")
    args = ap.parse_args(argv)
    console = Console() if Console().is_terminal else Console(width=170)
    slos = dict(parse_slo(s) for s in (args.slo or DEFAULT_SLOS))
    lo, _, hi = args.per_engine.partition(":")
    per_engine = (100, 300) if args.quick else (int(lo), int(hi or lo))
    g = gpu(args.gpu)
    links = [link_gb_s(g, x.strip()) for x in args.links.split(",") if x.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        m = model_from(args.model, Path(tmp))
    st = Setup(m, g, Layout(tp=args.tp), args.dtype,
               DispatchConfig.named(policy=args.policy, router=args.router, pd="auto"),
               slos, per_engine, 2 if args.quick else args.refine, args.seed, args.fused)
    pool = workload(args)
    if not pool:
        raise SystemExit("the workload is empty")
    shape = shape_of(pool)
    console.log(f"{len(pool)} requests, prompt mean {shape.prompt_mean:.0f}, output mean "
                f"{shape.output_mean:.0f}; {m.name} {st.layout.label()} on {g.name}; KV "
                f"{kv_bytes_per_token(m, st.layout) / 1024:.0f} KiB/token per GPU")
    t0 = time.perf_counter()
    blocks = []
    for n in (int(x) for x in args.gpus.split(",")):
        every = args.every_split or (n // st.layout.gpus <= 8 and not args.quick)
        block = compare(pool, st, n, links, every, args.ref_fraction, args.ref_rate, console)
        blocks.append(block)
        title = (f"{args.trace or 'synthetic'}: {n}x {g.name}, {m.name} {st.layout.label()}; "
                 f"latency at {block['ref_rate']:.2f} req/s")
        console.print(table(block, list(slos), title))
        for link, vs in block["verdicts"].items():
            for v in vs:
                if v:
                    console.print(
                        f"link {link} GB/s, {v['slo']}: best {v['best_pd']} goodput "
                        f"{v['pd_goodput']:.2f} vs unified {v['unified_goodput']:.2f} "
                        f"({_pct(v['goodput_change'])}); at the reference rate p99 TTFT "
                        f"{_pct(v['ttft_p99_change'])}, p99 TPOT {_pct(v['tpot_p99_change'])}")
        if args.markdown:
            console.print(markdown(block, list(slos)), markup=False, highlight=False)
    wall = time.perf_counter() - t0
    console.log(f"done in {wall:.0f} s")
    if args.json:
        payload = {"command": "python bench/pd_compare.py " + " ".join(
                       sys.argv[1:] if argv is None else argv),
                   "trace": args.trace or "synthetic", "requests": len(pool),
                   "prompt_mean": shape.prompt_mean, "output_mean": shape.output_mean,
                   "prompt_p50": statistics.median(r.prompt_tokens for r in pool),
                   "model": m.name, "gpu": g.name, "layout": st.layout.label(),
                   "engine": msgspec.to_builtins(_fleet(Candidate(st.layout, unified=1), pool,
                                                        st, links[0]).engine),
                   "slos": {k: {"ttft_ms": t.ttft_ms, "tpot_ms": t.tpot_ms}
                            for k, t in slos.items()},
                   "per_engine": per_engine, "fused_steps": args.fused, "wall_s": wall,
                   "blocks": blocks}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
