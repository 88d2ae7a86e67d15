"""`cplane bench policies`: every (policy, router) on the same work, side by side.

For each combination: one run of the whole workload at its own rate (the
table's latency, throughput and attainment figures, the TTFT CDF), and a rate
sweep on a slice of it for goodput (DistServe: the highest request rate at
which at least 90% of requests meet both their TTFT and TPOT targets): the
rate doubles until attainment falls below 90%, then bisection narrows the
crossing. Results go to DIR/results.json, DIR/goodput.png, DIR/ttft_cdf.png.

A trace without tenants, priorities or SLO classes gets them by the seeded
rule of `fleetsim.workload.assign_classes` (per request id, so a slice keeps
its requests' classes), with the mixes given on the command line.

The workload is a trace (`--trace`), a named family sized to the fleet
(`--family`, see fleetsim/families.py), or the plain synthetic stream.
`--load-per-worker` rescales any of them to an offered load per worker;
`--write-trace FILE` writes the workload as Mooncake JSONL instead of running.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import msgspec
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cplane.fleetsim import families, metrics, plots, report
from cplane.fleetsim.records import DEFAULT_SLOS, SloTarget, TraceRequest
from cplane.fleetsim.sim import FleetSpec, simulate
from cplane.fleetsim.synthetic import LengthDist, SyntheticSpec, generate
from cplane.fleetsim.workload import (
    assign_classes,
    load_trace,
    scale_rate,
    slice_requests,
    summary,
    write_mooncake,
)
from cplane.orchestrator import plugins
from cplane.orchestrator.dispatch import DispatchConfig

DEFAULT_LEVELS = "1=0.2,2=0.6,4=0.2"  # high / normal / background
DEFAULT_CLASSES = "interactive=0.3,standard=0.5,batch=0.2"
DEFAULT_TENANTS = "a=0.5,b=0.3,c=0.2"


def _mix(text: str, key: Callable[[str], Any] = str) -> dict[Any, float]:
    """`a=1,b=2` -> {a: 1.0, b: 2.0}; a clear error for anything else."""
    out: dict[Any, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        try:
            out[key(name.strip())] = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"bad mix entry {part!r} (want NAME=WEIGHT)") from None
    if not out or any(w < 0 for w in out.values()) or sum(out.values()) <= 0:
        raise ValueError(f"bad mix {text!r}: weights must be >= 0 and not all zero")
    return out


def _names(kind: str, text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        plugins.spec(kind, n)  # unknown names fail here, naming the choices
    return names


def _prices(text: str) -> tuple[tuple[float, float], ...]:
    """`1:2,3:6` -> ((1, 2), (3, 6)): per 1000 input:output tokens, cycled over workers."""
    out = []
    for part in filter(None, (x.strip() for x in text.split(","))):
        a, _, b = part.partition(":")
        try:
            out.append((float(a), float(b)))
        except ValueError:
            raise ValueError(f"bad price {part!r} (want IN:OUT per 1000 tokens)") from None
    return tuple(out)


def _params_for(policy: str, given: Sequence[str] | None, kind: str = "policy"
                ) -> dict[str, Any]:
    """`KEY=VALUE` parameters, each given to the plugins that take it (JSON values)."""
    out: dict[str, Any] = {}
    for kv in given or ():
        key, sep, raw = kv.partition("=")
        if not sep:
            raise ValueError(f"bad --{kind}-param {kv!r} (want KEY=VALUE)")
        if plugins.spec(kind, policy).accepts(key):
            try:
                out[key] = orjson.loads(raw)
            except orjson.JSONDecodeError:
                out[key] = raw
    return out


def _fleet_size(args: argparse.Namespace) -> int:
    return int(args.workers + args.prefill_workers + args.decode_workers)


def shaped(args: argparse.Namespace) -> list[TraceRequest]:
    """The workload's requests, sliced and at their rate, before classes are assigned."""
    n = _fleet_size(args)
    if args.family:
        reqs = families.family_workload(args.family, n, requests=args.requests, seed=args.seed,
                                        tokens_per_worker_s=args.load_per_worker)
    elif args.trace:
        reqs = load_trace(args.trace)
    else:
        reqs = generate(SyntheticSpec(rate_per_s=args.synthetic_rate, count=args.requests or 2000,
                                      prompt=LengthDist(1000, 1.0, 8192),
                                      output=LengthDist(200, 0.8, 2048),
                                      prefix_groups=args.prefix_groups,
                                      prefix_tokens=args.prefix_tokens,
                                      prefix_share=args.prefix_share if args.prefix_groups else 0),
                        seed=args.seed)
    reqs = slice_requests(reqs, start=args.start, count=args.requests)
    if args.load_per_worker and not args.family:
        reqs = families.at_load(reqs, n, args.load_per_worker)
    if args.rate_scale != 1.0:
        reqs = scale_rate(reqs, args.rate_scale)
    return reqs


def workload(args: argparse.Namespace) -> list[TraceRequest]:
    reqs = assign_classes(shaped(args), seed=args.seed, tenants=_mix(args.tenants),
                          levels=_mix(args.levels, int), slo_classes=_mix(args.slo_classes))
    return with_batch_job(reqs, args.batch_requests, args.batch_at_s * 1000)


def with_batch_job(reqs: list[TraceRequest], n: int, at_ms: float) -> list[TraceRequest]:
    """A batch job of `n` lines submitted at once at `at_ms` on top of the trace
    (shapes cycled from it; background band, `batch` class: `cplane batch submit`'s
    defaults), tenant `batch`."""
    if n <= 0 or not reqs:
        return reqs
    job = [replace(reqs[i % len(reqs)], request_id=f"batch-{i}", arrival_ms=at_ms, level=4,
                   slo_class="batch", tenant="batch", session="", block_hashes=())
           for i in range(n)]
    return sorted([*reqs, *job], key=lambda r: r.arrival_ms)


def _rate(reqs: Sequence[TraceRequest]) -> float:
    span = (reqs[-1].arrival_ms - reqs[0].arrival_ms) / 1000 if len(reqs) > 1 else 0.0
    return len(reqs) / span if span > 0 else float(len(reqs))


def sweep(reqs: Sequence[TraceRequest], fleet: FleetSpec, cfg: DispatchConfig, *, seed: int,
          refine: int, max_points: int = 14, threshold: float = 0.9,
          slos: Mapping[str, SloTarget] = DEFAULT_SLOS) -> list[tuple[float, float]]:
    """(request rate, attainment) points: doubling (or halving, when the trace's own
    rate fails) to the crossing, then bisection. `slos`: the targets per class."""
    base = _rate(reqs)
    points: dict[float, float] = {}

    def at(factor: float) -> float:
        run = simulate(scale_rate(reqs, factor), fleet, cfg, seed=seed)
        att = metrics.summarize(run, slos)["attainment"] or 0.0
        points[base * factor] = att
        return att

    crossing(at, refine=refine, max_points=max_points, threshold=threshold)
    return sorted(points.items())


def crossing(at: Callable[[float], float], *, refine: int, max_points: int = 14,
             threshold: float = 0.9) -> None:
    """The sweep's search over rate factors: `at(factor)` runs one point (factor 1 =
    the workload's own rate) and returns its attainment. Doubles while it passes (or
    halves until it does), then bisects `refine` times; at most `max_points` calls,
    each at a new factor (so a caller may run one simulation for several SLOs)."""
    calls = 0

    def run(factor: float) -> float:
        nonlocal calls
        calls += 1
        return at(factor)

    lo, hi = 0.0, 1.0
    if run(hi) >= threshold:  # up: double while it passes
        lo, hi = hi, hi * 2
        while calls < max_points and run(hi) >= threshold:
            lo, hi = hi, hi * 2
    else:  # down: the trace's own rate is already too much; halve until it passes
        lo, passed = hi, False
        while not passed and calls < max_points // 2:
            lo, hi = lo / 2, lo
            passed = run(lo) >= threshold
        if not passed:
            lo = 0.0
    for _ in range(refine if lo > 0 else 0):
        mid = (lo + hi) / 2
        if run(mid) >= threshold:
            lo = mid
        else:
            hi = mid


def run_all(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    policies = _names("policy", args.policies)
    routers = _names("router", args.routers)
    reqs = workload(args)
    if not reqs:
        raise ValueError("the workload is empty")
    fleet = FleetSpec(workers=args.workers, prefill_workers=args.prefill_workers,
                      decode_workers=args.decode_workers, capacity=args.capacity,
                      prices=_prices(args.prices), shed=not args.no_shed,
                      kv_events_ms=args.kv_events_ms)
    # A sweep point must run long enough for queues to reach steady state: a
    # fleet absorbs ~capacity * (1 + headroom) requests before anything waits,
    # so a short slice overstates goodput. ~10 fleets' worth of requests.
    n_sweep = args.sweep_requests if args.sweep_requests is not None else max(
        2000, 600 * (args.workers + args.decode_workers))
    swept = slice_requests(reqs, count=n_sweep) if n_sweep > 0 else []
    refine = 6 if args.sweep else 3
    combos = [(p, r) for p in policies for r in routers]
    results: list[dict[str, Any]] = []
    cdfs: dict[str, list[float]] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("simulating", total=len(combos))
        for policy, router in combos:
            label = f"{policy} x {router}"
            bar.update(task, description=f"{label}: trace")
            cfg = DispatchConfig.named(
                policy=policy, router=router, pd=args.pd,
                policy_params=_params_for(policy, args.policy_param),
                router_params=_params_for(router, args.router_param, "router"))
            run = simulate(reqs, fleet, cfg, seed=args.seed)
            summ = metrics.summarize(run, DEFAULT_SLOS)
            bar.update(task, description=f"{label}: goodput sweep")
            t0 = time.perf_counter()
            points = sweep(swept, fleet, cfg, seed=args.seed, refine=refine) if swept else []
            good = metrics.goodput(points) if points else None
            results.append({"policy": policy, "router": router, "summary": summ,
                            "goodput": good, "goodput_sweep": points,
                            "sweep_wall_s": time.perf_counter() - t0,
                            "speed": {"wall_s": run.wall_s, "events": run.events,
                                      "events_per_s": summ["events_per_s"]}})
            cdfs[label] = [t for rec in run.records if (t := rec.ttft_ms) is not None]
            curves[label] = points
            bar.advance(task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eng = fleet.engine
    per_worker = eng.prefix_cache_tokens // max(1, eng.prefix_block_tokens)
    n_cached = fleet.workers + fleet.prefill_workers
    payload = {
        # What one cache of the whole fleet's size would hit: the ceiling for routing.
        "prefix_bound": (metrics.shared_cache_bound(reqs, per_worker * n_cached)
                         if any(r.block_hashes for r in reqs) else None),
        "command": "cplane bench " + " ".join(sys.argv[2:] if args.argv is None else args.argv),
        "trace": (f"family {args.family}" if args.family else
                  str(args.trace) if args.trace else "synthetic"),
        "workload": summary(reqs), "sweep_requests": len(swept),
        "fleet": msgspec.to_builtins(fleet),
        "slos": {k: asdict(v) for k, v in DEFAULT_SLOS.items()},
        "mix": {"levels": args.levels, "slo_classes": args.slo_classes, "tenants": args.tenants},
        "results": results,
    }
    report.write_json(out / "results.json", payload)
    if swept:
        plots.plot_goodput(curves, out / "goodput.png")
    plots.plot_ttft_cdf(cdfs, out / "ttft_cdf.png")
    return payload


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=None,
                   help="Azure CSV or Mooncake JSONL (default: a synthetic workload)")
    p.add_argument("--family", default=None, choices=sorted(families.FAMILIES),
                   help="a named synthetic family sized to the fleet (fleetsim/families.py; "
                        "default length: %d requests per worker)" % families.REQUESTS_PER_WORKER)
    p.add_argument("--load-per-worker", type=float, default=None, metavar="TOKENS_S",
                   help="rescale arrivals to offer this many prompt+output tokens per worker "
                        "per second (%g = the Mooncake trace on 8 workers; default: a family's "
                        "own load, a trace's own rate)" % families.LOAD_TOKENS_PER_WORKER_S)
    p.add_argument("--write-trace", default=None, metavar="FILE",
                   help="write the workload as Mooncake JSONL (usable as --trace) and exit")
    p.add_argument("--workers", type=int, default=8, help="unified workers")
    p.add_argument("--prefill-workers", type=int, default=0)
    p.add_argument("--decode-workers", type=int, default=0)
    p.add_argument("--capacity", type=int, default=64, help="slots per worker")
    p.add_argument("--policies", default="fifo,priority")
    p.add_argument("--routers", default="round_robin,random,least_loaded")
    p.add_argument("--pd", default="auto", help="PD decider (with prefill/decode workers)")
    p.add_argument("--policy-param", action="append", metavar="KEY=VALUE",
                   help="a parameter for every policy that takes it (e.g. fair=true)")
    p.add_argument("--router-param", action="append", metavar="KEY=VALUE",
                   help="a parameter for every router that takes it (e.g. slack=0.03)")
    p.add_argument("--kv-events-ms", type=float, default=0.0,
                   help="workers forward their KV-cache events this often (precise prefix "
                        "routing; 0 = routers know only what they sent)")
    p.add_argument("--prices", default="", help="IN:OUT per 1000 tokens, cycled over workers")
    p.add_argument("--no-shed", action="store_true", help="sheddable classes run late instead")
    p.add_argument("--requests", type=int, default=None, help="first N requests of the trace")
    p.add_argument("--start", type=int, default=0, help="skip this many requests first")
    p.add_argument("--rate-scale", type=float, default=1.0, help="2 = twice the trace's rate")
    p.add_argument("--sweep", action="store_true", help="a finer goodput sweep")
    p.add_argument("--sweep-requests", type=int, default=None,
                   help="requests in the goodput sweep's slice (default: 600 per worker, "
                        "at least 2000; 0 = no sweep)")
    p.add_argument("--levels", default=DEFAULT_LEVELS, help="priority mix, level=weight")
    p.add_argument("--slo-classes", default=DEFAULT_CLASSES, help="SLO class mix")
    p.add_argument("--tenants", default=DEFAULT_TENANTS, help="tenant mix")
    p.add_argument("--synthetic-rate", type=float, default=20.0)
    p.add_argument("--prefix-groups", type=int, default=0,
                   help="synthetic: groups sharing a long system prompt (prefix-heavy)")
    p.add_argument("--prefix-tokens", type=int, default=4096, help="synthetic: its length")
    p.add_argument("--prefix-share", type=float, default=0.9,
                   help="synthetic: share of requests that start with a group's prompt")
    p.add_argument("--batch-requests", type=int, default=0,
                   help="a batch job of this many lines submitted at once on top")
    p.add_argument("--batch-at-s", type=float, default=0.0, help="when it is submitted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="folder for results.json and the plots (required unless --write-trace)")


def main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    console = Console()
    if not console.is_terminal:  # logs and CI: room for the whole table
        console = Console(width=170)
    if args.workers < 0 or args.workers + args.prefill_workers == 0:
        raise ValueError("the fleet needs at least one unified or prefill worker")
    if (args.prefill_workers > 0) != (args.decode_workers > 0):
        raise ValueError("PD needs both --prefill-workers and --decode-workers")
    if args.family and args.trace:
        raise ValueError("give --trace or --family, not both")
    if args.write_trace:
        n = write_mooncake(shaped(args), args.write_trace)
        console.print(f"wrote {n} requests to {args.write_trace}")
        return 0
    if not args.out:
        raise ValueError("--out is required (a folder for results.json and the plots)")
    args.argv = list(argv) if argv is not None else None
    payload = run_all(args, console)
    console.print(report.table(payload["results"], title=_title(payload)))
    speeds = [r["speed"] for r in payload["results"]]
    ev = sum(s["events"] for s in speeds)
    wall = sum(s["wall_s"] for s in speeds)
    if payload["prefix_bound"] is not None:
        console.print(f"prefix cache: one shared cache of the fleet's size would hit "
                      f"{payload['prefix_bound']:.1%} of blocks")
    console.print(f"{len(speeds)} trace runs: {ev:,} events in {wall:.1f} s "
                  f"({ev / wall if wall else 0:,.0f} events/s); results in {args.out}")
    return 0


def _title(payload: Mapping[str, Any]) -> str:
    w = payload["workload"]
    f = payload["fleet"]
    return (f"{payload['trace']}: {w['count']} requests at {w['rate_per_s']:.2f} req/s, "
            f"{f['workers']} workers (+{f['prefill_workers']}P/{f['decode_workers']}D)")


__all__ = ["add_arguments", "crossing", "main", "run_all", "shaped", "sweep", "workload"]
