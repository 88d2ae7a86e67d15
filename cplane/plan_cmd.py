"""`cplane plan`: choose a parallel layout for a model on a GPU budget.

    cplane plan predict --model DIR --gpu h100-80gb --tp 2 --batch 8 --prompt-tokens 1024
    cplane plan --model DIR --gpus 16xh100-80gb --synthetic --objective goodput --out DIR

`predict` prices one layout with the performance model (fleetsim/perf_model.py).
The search (fleetsim/planner.py) evaluates every layout that fits on the fleet
simulator, ranks them, draws the frontier and prints the winner's worker
commands and replica counts. docs/planner.md explains both.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from cplane.fleetsim import families
from cplane.fleetsim.gpus import CATALOGUE, Gpu, gpu, parse_budget
from cplane.fleetsim.model_config import ModelConfig, load
from cplane.fleetsim.perf_model import DTYPES, Layout, predict
from cplane.fleetsim.records import TraceRequest

if TYPE_CHECKING:  # the search's modules load the decision core: only when searching
    from cplane.fleetsim import planner
    from cplane.orchestrator.dispatch import DispatchConfig

OBJECTIVES = ("goodput", "cost", "latency")  # = fleetsim.planner.OBJECTIVES (a test holds it)


def add_parser(sp: Any) -> None:
    """Register `plan` (the search) and `plan predict` on the CLI's subparsers."""
    p = sp.add_parser("plan", help="choose a parallel layout for a model on a GPU budget "
                      "(performance model + fleet simulator)")
    p.add_argument("--model", help="a Hugging Face model folder (its config.json)")
    p.add_argument("--gpus", help="the budget: COUNTxNAME, e.g. 16xh100-80gb (GPUs: "
                   + ", ".join(sorted(CATALOGUE)) + ")")
    p.add_argument("--price", type=float, default=None, help="USD per GPU-hour (default: "
                   "the catalogue's list price)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", help="Azure CSV or Mooncake JSONL to replay")
    src.add_argument("--synthetic", action="store_true", help="a synthetic workload (default)")
    p.add_argument("--family", choices=sorted(families.FAMILIES), default=None,
                   help="with --synthetic: a named family (fleetsim/families.py)")
    p.add_argument("--slo-class", default=None,
                   help="SLO class, or a mix NAME=WEIGHT,... (default: interactive 0.3, "
                        "standard 0.5, batch 0.2)")
    p.add_argument("--objective", choices=OBJECTIVES, default="goodput")
    p.add_argument("--policy", default="fifo")
    p.add_argument("--router", default="least_loaded")
    p.add_argument("--pd", default="auto", help="PD decider for the PD candidates")
    p.add_argument("--no-pd", action="store_true", help="unified fleets only")
    p.add_argument("--every-split", action="store_true",
                   help="every prefill:decode split (default: near the work ratio and 1/4, "
                        "1/2, 3/4)")
    p.add_argument("--requests", type=int, default=None,
                   help="size of the request pool runs draw from (default: enough for 600 "
                        "per simulated engine; a run takes 200-600 per engine)")
    p.add_argument("--rate", type=float, default=None, help="reference rate (req/s) of the "
                   "latency columns (default: 0.8 x the median goodput)")
    p.add_argument("--quick", action="store_true", help="fewer requests and sweep steps")
    p.add_argument("--top", type=int, default=15, help="table rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for plan.json, frontier.png, "
                   "commands.sh")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(fn=run_search, plan_cmd=None)
    pp = p.add_subparsers(dest="plan_cmd")
    q = pp.add_parser("predict", help="the performance model for one layout")
    q.add_argument("--model", required=True, help="a Hugging Face model folder or config.json")
    q.add_argument("--gpu", required=True, help="one of " + ", ".join(sorted(CATALOGUE)))
    q.add_argument("--tp", type=int, default=1)
    q.add_argument("--pp", type=int, default=1)
    q.add_argument("--ep", type=int, default=1)
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--prompt-tokens", type=int, default=1024)
    q.add_argument("--context-tokens", type=int, default=None,
                   help="decode context per sequence (default: the prompt)")
    q.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    q.add_argument("--json", action="store_true", help="print one JSON line")
    q.set_defaults(fn=run_predict)


# -- predict ------------------------------------------------------------------------
def run_predict(args: argparse.Namespace) -> int:
    m, g = load(args.model), gpu(args.gpu)
    pr = predict(m, g, Layout(tp=args.tp, pp=args.pp, ep=args.ep), batch=args.batch,
                 prompt_tokens=args.prompt_tokens, context_tokens=args.context_tokens,
                 dtype=args.dtype)
    if args.json:
        print(json.dumps(pr.to_json()))
        return 0
    t = Table(title=f"{m.name} on {pr.layout} x {g.name} ({args.dtype})")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    rows = (("parameters (B), active", f"{pr.params_b:.2f}, {pr.active_params_b:.2f}"),
            ("weights per GPU (GB)", f"{pr.weights_gb:.1f}"),
            ("KV cache per GPU (GB)", f"{pr.kv_gb:.1f}"),
            ("KV capacity (tokens)", f"{pr.kv_tokens:,}"),
            ("fits", "yes" if pr.fits else "NO"),
            (f"prefill {pr.batch} x {pr.prompt_tokens} tokens (ms)", f"{pr.prefill_ms:.1f}"),
            (f"decode step, batch {pr.batch} at {pr.context_tokens} (ms)",
             f"{pr.decode_step_ms:.2f}"),
            ("decode tokens/s per GPU", f"{pr.tokens_per_s:,.0f}"),
            ("prefill tokens/s per GPU", f"{pr.prefill_tokens_per_s:,.0f}"))
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
    return 0


# -- search -------------------------------------------------------------------------
def _workload(args: argparse.Namespace, n: int, budget: int) -> list[TraceRequest]:
    from cplane.fleetsim import bench
    from cplane.fleetsim.synthetic import LengthDist, SyntheticSpec, generate
    from cplane.fleetsim.workload import assign_classes, load_trace, slice_requests

    if args.trace:
        reqs = slice_requests(load_trace(args.trace), count=n)
    elif args.family:
        reqs = families.family_workload(args.family, budget, requests=n, seed=args.seed)
    else:
        reqs = generate(SyntheticSpec(rate_per_s=20.0, count=n, prompt=LengthDist(1000, 1.0, 8192),
                                      output=LengthDist(200, 0.8, 2048)), seed=args.seed)
    return assign_classes(reqs, seed=args.seed, tenants=bench._mix(bench.DEFAULT_TENANTS),
                          levels=bench._mix(bench.DEFAULT_LEVELS, int),
                          slo_classes=bench._mix(args.slo_class or bench.DEFAULT_CLASSES))


def _limits(args: argparse.Namespace) -> tuple[int, tuple[int, int]]:
    """Simulated engines at most, and requests per simulated engine (min, max)."""
    return (8, (150, 300)) if args.quick else (16, (200, 600))


def run_search(args: argparse.Namespace) -> int:
    from cplane.fleetsim import planner
    from cplane.orchestrator.dispatch import DispatchConfig

    if not (args.model and args.gpus):
        raise ValueError("plan needs --model and --gpus (or: plan predict ...)")
    m = load(args.model)
    budget, g = parse_budget(args.gpus)
    if args.price is not None:
        g = gpu(g.name, args.price)
    console = Console(stderr=args.json)
    if not console.is_terminal:
        console = Console(width=170, stderr=args.json)
    probe = _workload(args, 400, budget)  # lengths for the enumeration
    shape = planner.shape_of(probe)
    max_engines, per_engine = _limits(args)
    cands = planner.candidates(m, g, budget, args.dtype, shape, pd=not args.no_pd,
                               every_split=args.every_split, max_engines=max_engines)
    if not cands:
        raise ValueError(f"no layout of {m.name} ({m.params() / 1e9:.1f}B, {args.dtype}) fits "
                         f"{budget} x {g.name} with KV for a {shape.longest}-token request")
    pool = args.requests or max_engines * per_engine[1]
    reqs = _workload(args, pool, budget)
    cfg = DispatchConfig.named(policy=args.policy, router=args.router, pd=args.pd)
    t0 = time.perf_counter()
    results = _evaluate_all(cands, reqs, m, g, args, cfg, console)
    ranked = planner.rank(results, args.objective)
    payload = _payload(args, m, g, budget, reqs, ranked, time.perf_counter() - t0)
    if args.out:
        _write(Path(args.out), payload, ranked, g)
    if args.json:
        print(json.dumps(payload))
        return 0
    console.print(_table(payload, args.top))
    for line in payload["winner"]["explain"]:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0


def _evaluate_all(cands: list[planner.Candidate], reqs: list[TraceRequest], m: ModelConfig,
                  g: Gpu, args: argparse.Namespace, cfg: DispatchConfig,
                  console: Console) -> list[planner.Result]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from cplane.fleetsim import planner

    max_engines, per_engine = _limits(args)
    refine = 2 if args.quick else 3
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn())
    results = []
    with Progress(*cols, console=console, transient=False) as bar:
        task = bar.add_task("goodput sweeps", total=2 * len(cands))
        for c in cands:
            bar.update(task, description=f"sweep {c.label()}")
            results.append(planner.evaluate(
                c, reqs, m, g, args.dtype, cfg, seed=args.seed, refine=refine,
                max_engines=max_engines, per_engine=per_engine))
            bar.advance(task)
        goods = sorted(r.goodput for r in results if r.goodput > 0)
        args.rate = args.rate or (0.8 * goods[len(goods) // 2] if goods else 1.0)
        for r in results:
            bar.update(task, description=f"at {args.rate:.2f} req/s: {r.candidate.label()}")
            planner.at_rate(r, reqs, args.rate, cfg, seed=args.seed)
            bar.advance(task)
    return results


def worker_commands(m_dir: str, r: planner.Result, dtype: str, max_len: int) -> list[str]:
    """`cplane worker` lines for a candidate, one per role, with its replica count."""
    c, lay = r.candidate, r.candidate.layout
    roles = [("unified", c.unified)] if c.unified else [("prefill", c.prefill),
                                                          ("decode", c.decode)]
    out = []
    for role, n in roles:
        cmd = (f"cplane worker --engine vllm --role {role} --model {m_dir} "
               f"--tensor-parallel-size {lay.tp} --dtype bfloat16 "
               f"--gpu-memory-utilization 0.9 --max-model-len {max_len} --capacity {r.slots}")
        if lay.pp > 1:
            cmd += f" --engine-arg pipeline_parallel_size={lay.pp}"
        if lay.ep > 1:
            cmd += " --engine-arg enable_expert_parallel=true"
        if dtype == "fp8":
            cmd += " --engine-arg quantization=fp8"
        if role != "unified":
            cmd += " --kv-connector NixlConnector"
        out.append(f"# {n} x {role} ({lay.gpus} GPU each)\n{cmd}")
    return out


def _payload(args: argparse.Namespace, m: ModelConfig, g: Gpu, budget: int,
             reqs: list[TraceRequest], ranked: list[planner.Result], wall: float
             ) -> dict[str, Any]:
    best = ranked[0]
    c = best.candidate
    max_len = max(1024, min(m.max_context, best.kv_tokens))
    cmds = worker_commands(args.model, best, args.dtype, max_len)
    roles = [("unified", c.unified)] if c.unified else [("prefill", c.prefill),
                                                          ("decode", c.decode)]
    k8s = [f"worker-{role}: {n} replicas, nvidia.com/gpu: {c.layout.gpus} per pod "
           f"(deploy/k8s/worker-{role}.yaml; KEDA minReplicaCount: {n})" for role, n in roles]
    head = (f"winner ({args.objective}): {c.label()} on {c.gpus} of {budget} x {g.name}: "
            f"goodput@90 {best.goodput:.2f} req/s")
    return {
        "model": m.name, "gpu": g.name, "budget": budget, "dtype": args.dtype,
        "objective": args.objective, "price_per_hour": g.price_per_hour,
        "policy": args.policy, "router": args.router, "requests": len(reqs),
        "reference_rate": args.rate, "wall_s": wall,
        "results": [r.row(g.price_per_hour) for r in ranked],
        "winner": {"label": c.label(), "commands": cmds, "kubernetes": k8s,
                   "explain": [head, "", "worker commands:", *cmds, "", "Kubernetes:", *k8s,
                               *([f"({budget - c.gpus} GPUs left unused)"]
                                 if budget > c.gpus else [])]}}


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _table(payload: dict[str, Any], top: int) -> Table:
    t = Table(title=f"{payload['model']} on {payload['budget']} x {payload['gpu']} "
              f"({payload['dtype']}), ranked by {payload['objective']}; latency at "
              f"{payload['reference_rate']:.2f} req/s; pool of {payload['requests']} requests, "
              f"{payload['wall_s']:.0f} s")
    for col in ("#", "layout", "mode", "GPUs", "goodput@90 req/s", "per GPU", "req per $",
                "TTFT p50/p99 ms", "TPOT p50/p99 ms", "attain@ref", "KV headroom"):
        t.add_column(col, justify="left" if col in ("layout", "mode") else "right")
    for i, r in enumerate(payload["results"][:top], 1):
        t.add_row(str(i), r["layout"], r["mode"], str(r["gpus"]),
                  _f(r["goodput"], "{:.2f}") + ("+" if r["goodput_lower_bound"] else ""),
                  _f(r["goodput_per_gpu"], "{:.3f}"), _f(r["requests_per_dollar"], "{:,.0f}"),
                  f"{_f(r['ttft_p50_ms'])} / {_f(r['ttft_p99_ms'])}",
                  f"{_f(r['tpot_p50_ms'])} / {_f(r['tpot_p99_ms'])}",
                  _f(r["attainment_at_ref"], "{:.0%}"), _f(r["memory_headroom"], "{:.0%}"))
    return t


def _write(out: Path, payload: dict[str, Any], ranked: list[planner.Result], g: Gpu) -> None:
    from cplane.fleetsim.plan_plot import plot_frontier

    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(payload, indent=1))
    w = payload["winner"]
    text = ["#!/bin/sh", f"# {w['label']}: one line per role, run once per replica",
            *w["commands"], "", "# Kubernetes:", *(f"#   {k}" for k in w["kubernetes"])]
    (out / "commands.sh").write_text("\n".join(text) + "\n")
    plot_frontier(payload["results"], out / "frontier.png", title=payload["winner"]["label"])


__all__ = ["add_parser", "run_predict", "run_search", "worker_commands"]
