"""The planner's search: which parallel layouts fit a GPU budget, and how each serves.

`candidates` enumerates engine layouts (TP x PP, EP = TP for MoE) whose weights
fit with room for KV, then the fleets they make on the budget: unified (DP =
every engine the budget holds) or PD (every prefill:decode split of the
engines; the default keeps the splits near the work ratio the performance
model predicts, and a quarter, half and three quarters). PP is tried only
when no layout without it fits: within a node it adds a bubble and a hop and
saves nothing that TP does not.

`evaluate` replays the workload on the fleet simulator, with each engine
priced by `engine_model.sim_settings` and the live decision code choosing
(policy, router, PD decider as configured): a goodput sweep (DistServe's
goodput@90) and one run at a common reference rate for the latency columns.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cplane.fleetsim import metrics
from cplane.fleetsim.bench import sweep
from cplane.fleetsim.engine_model import sim_settings
from cplane.fleetsim.gpus import Gpu
from cplane.fleetsim.model_config import ModelConfig
from cplane.fleetsim.perf_model import Layout, check, decode_step_ms, memory, prefill_ms
from cplane.fleetsim.records import TraceRequest
from cplane.fleetsim.sim import FleetSpec, simulate
from cplane.fleetsim.workload import scale_rate
from cplane.orchestrator.dispatch import DispatchConfig
from cplane.schemas.settings import SimSettings

TP_CHOICES = (1, 2, 4, 8)
PP_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A fleet on the budget: engines of one layout, unified or split into PD pools."""

    layout: Layout
    unified: int = 0
    prefill: int = 0
    decode: int = 0

    @property
    def engines(self) -> int:
        return self.unified + self.prefill + self.decode

    @property
    def gpus(self) -> int:
        return self.engines * self.layout.gpus

    @property
    def mode(self) -> str:
        return "unified" if self.unified else f"PD {self.prefill}:{self.decode}"

    def label(self) -> str:
        return f"{self.engines}x {self.layout.label()} {self.mode}"


@dataclass(frozen=True, slots=True)
class Shape:
    """What the enumeration needs to know about the workload."""

    prompt_mean: float
    output_mean: float
    longest: int  # prompt + output of the longest request: the KV one engine must hold


def shape_of(reqs: Sequence[TraceRequest]) -> Shape:
    if not reqs:
        raise ValueError("the workload is empty")
    return Shape(statistics.fmean(r.prompt_tokens for r in reqs),
                 statistics.fmean(r.output_tokens for r in reqs),
                 max(r.prompt_tokens + r.output_tokens for r in reqs))


def layouts(m: ModelConfig, g: Gpu, budget: int, dtype: str, need_kv: int) -> list[Layout]:
    """Engine layouts that run this model on at most `budget` GPUs with KV for `need_kv`."""
    out = []
    for pp in PP_CHOICES:
        for tp in TP_CHOICES:
            ep = tp if m.is_moe and tp > 1 and m.experts % tp == 0 else 1
            lay = Layout(tp=tp, pp=pp, ep=ep)
            if lay.gpus > budget:
                continue
            try:
                check(m, g, lay, dtype)
            except ValueError:
                continue
            mem = memory(m, g, lay, dtype)
            if mem.fits and mem.kv_tokens >= need_kv:
                out.append(lay)
        if any(lay.pp == 1 for lay in out):
            break  # PP only where nothing fits without it
    return out


def pd_splits(engines: int, ideal_prefill_share: float, every: bool = False) -> list[int]:
    """Prefill engine counts to try (1 .. engines-1)."""
    if engines < 2:
        return []
    if every:
        return list(range(1, engines))
    ideal = round(engines * ideal_prefill_share)
    near = {ideal - 1, ideal, ideal + 1}
    near |= {round(engines * f) for f in (0.25, 0.5, 0.75)}
    return sorted(n for n in near if 1 <= n < engines)


def prefill_share(m: ModelConfig, g: Gpu, lay: Layout, dtype: str, s: Shape,
                  batch: int = 32) -> float:
    """The prefill side's share of the engine time a request costs (for PD splits)."""
    p = prefill_ms(m, g, lay, [round(s.prompt_mean)], dtype)
    ctx = round(s.prompt_mean + s.output_mean / 2)
    d = s.output_mean * decode_step_ms(m, g, lay, batch, ctx, dtype) / batch
    return p / (p + d) if p + d > 0 else 0.5


def candidates(m: ModelConfig, g: Gpu, budget: int, dtype: str, s: Shape, *,
               pd: bool = True, every_split: bool = False,
               max_engines: int = 0) -> list[Candidate]:
    """Every fleet the planner evaluates, unified ones first. With `max_engines`, PD
    splits whose simulated slices (`reduced`) coincide are evaluated once."""
    out: list[Candidate] = []
    lays = layouts(m, g, budget, dtype, s.longest)
    for lay in lays:
        out.append(Candidate(lay, unified=budget // lay.gpus))
    if pd:
        for lay in lays:
            n = budget // lay.gpus
            share = prefill_share(m, g, lay, dtype, s)
            seen = set()
            for k in pd_splits(n, share, every_split):
                c = Candidate(lay, prefill=k, decode=n - k)
                key = reduced(c, max_engines)[0] if max_engines else c
                if key not in seen:
                    seen.add(key)
                    out.append(c)
    return out


def slots(engine: SimSettings, s: Shape) -> int:
    """Requests one engine holds at once: its KV over a mean request, within vLLM's 256."""
    per = max(1.0, s.prompt_mean + s.output_mean)
    return max(8, min(engine.max_num_seqs, int(engine.kv_tokens / per)))


def fleet_for(c: Candidate, m: ModelConfig, g: Gpu, dtype: str, s: Shape,
              base: FleetSpec | None = None) -> FleetSpec:
    """The simulated fleet of a candidate (engines priced by the performance model)."""
    eng = sim_settings(m, g, c.layout, dtype)
    n = c.engines
    return replace(base or FleetSpec(), workers=c.unified, prefill_workers=c.prefill,
                   decode_workers=c.decode, capacity=slots(eng, s), engine=eng, model=m.name,
                   worker_parallelism=(c.layout.gpus,) * n)


def capacity_estimate(c: Candidate, m: ModelConfig, g: Gpu, dtype: str, s: Shape) -> float:
    """Requests/s the fleet could sustain by the performance model alone (the sweep's
    starting point, so that it needs few steps)."""
    lay = c.layout
    batch = 128  # continuous batching near capacity holds large batches
    p = prefill_ms(m, g, lay, [round(s.prompt_mean)], dtype) / 1e3
    ctx = round(s.prompt_mean + s.output_mean / 2)
    d = s.output_mean * decode_step_ms(m, g, lay, batch, ctx, dtype) / batch / 1e3
    if c.unified:
        return c.unified / (p + d)
    return min(c.prefill / p, c.decode / d) if p > 0 and d > 0 else 0.0


def reduced(c: Candidate, max_engines: int) -> tuple[Candidate, float]:
    """The slice of a large fleet that the simulator runs, and the factor that scales
    its goodput to the whole fleet. DP engines behind one router are replicas, so
    goodput grows with their number; a slice of at most `max_engines` keeps the
    simulated request count modest. A PD split keeps its ratio as near as rounding
    allows (at least one engine a side)."""
    if c.engines <= max_engines:
        return c, 1.0
    f = c.engines / max_engines
    if c.unified:
        sim = replace(c, unified=max_engines)
    else:
        p = max(1, round(c.prefill / f))
        sim = replace(c, prefill=p, decode=max(1, max_engines - p))
    return sim, c.engines / sim.engines


def requests_per_engine(c: Candidate, m: ModelConfig, g: Gpu, dtype: str, s: Shape,
                        lo: int = 200, hi: int = 600) -> int:
    """Requests per simulated engine for a sweep point to reach steady state: about
    fifteen times what one engine holds in flight near capacity (rate x latency),
    within [lo, hi]. Shorter runs overstate goodput (the empty fleet at the start
    serves its first requests well): 600 per worker is what the simulator's docs
    found enough, and Llama-3-8B's goodput on one H100 falls by a third from 300
    requests per engine to 600."""
    lay = c.layout
    rate = capacity_estimate(c, m, g, dtype, s) / max(1, c.engines)
    ctx = round(s.prompt_mean + s.output_mean / 2)
    e2e_s = (prefill_ms(m, g, lay, [round(s.prompt_mean)], dtype)
             + s.output_mean * decode_step_ms(m, g, lay, 128, ctx, dtype)) / 1e3
    return max(lo, min(hi, round(15 * rate * e2e_s)))


def offered_rate(reqs: Sequence[TraceRequest]) -> float:
    """Requests per second over the arrivals' span (1.0 when they all come at once)."""
    span = (reqs[-1].arrival_ms - reqs[0].arrival_ms) / 1e3 if len(reqs) > 1 else 0.0
    return len(reqs) / span if span > 0 else 1.0


@dataclass(slots=True)
class Result:
    """One candidate, evaluated."""

    candidate: Candidate
    goodput: float  # req/s at >= 90 % attainment (DistServe)
    goodput_lower_bound: bool
    sweep: list[tuple[float, float]]
    kv_tokens: int
    memory_headroom: float
    slots: int
    simulated: Candidate  # the slice the simulator ran (`reduced`)
    scale: float  # whole fleet / slice
    requests: int  # per sweep point
    fleet: FleetSpec  # the simulated slice's fleet, as swept
    at_reference: dict[str, Any] = field(default_factory=dict)  # summarize() at the ref rate

    def row(self, price_per_hour: float) -> dict[str, Any]:
        c, ref = self.candidate, self.at_reference
        return {
            "layout": c.layout.label(), "tp": c.layout.tp, "pp": c.layout.pp,
            "ep": c.layout.ep, "mode": c.mode, "engines": c.engines, "gpus": c.gpus,
            "unified": c.unified, "prefill": c.prefill, "decode": c.decode,
            "goodput": self.goodput, "goodput_lower_bound": self.goodput_lower_bound,
            "goodput_per_gpu": self.goodput / c.gpus,
            # requests per dollar = req/s * 3600 / ($/h of the GPUs used)
            "requests_per_dollar": self.goodput * 3600 / (c.gpus * price_per_hour),
            "ttft_p50_ms": ref.get("median_ttft_ms"), "ttft_p99_ms": ref.get("p99_ttft_ms"),
            "tpot_p50_ms": ref.get("median_tpot_ms"), "tpot_p99_ms": ref.get("p99_tpot_ms"),
            "e2el_p99_ms": ref.get("p99_e2el_ms"), "attainment_at_ref": ref.get("attainment"),
            "kv_tokens": self.kv_tokens, "memory_headroom": self.memory_headroom,
            "slots": self.slots, "simulated_engines": self.simulated.engines,
            "requests_per_point": self.requests, "sweep": self.sweep}


def evaluate(c: Candidate, reqs: Sequence[TraceRequest], m: ModelConfig, g: Gpu, dtype: str,
             cfg: DispatchConfig, *, seed: int = 0, refine: int = 3, max_engines: int = 16,
             per_engine: tuple[int, int] = (200, 600), base: FleetSpec | None = None
             ) -> Result:
    """Goodput of one candidate by a rate sweep on the simulator (`reqs` is a pool:
    the first requests-per-engine x simulated engines of it are replayed)."""
    s = shape_of(reqs)
    sim, scale = reduced(c, max_engines)
    n = requests_per_engine(sim, m, g, dtype, s, *per_engine) * sim.engines
    part = list(reqs[:n])
    fleet = fleet_for(sim, m, g, dtype, s, base)
    start = max(1e-3, 0.6 * capacity_estimate(sim, m, g, dtype, s))
    points = sweep(scale_rate(part, start / offered_rate(part)), fleet, cfg, seed=seed,
                   refine=refine, max_points=10)
    good = metrics.goodput(points)
    mem = memory(m, g, c.layout, dtype)
    return Result(c, good.rate * scale, good.lower_bound,
                  [(rate * scale, att) for rate, att in points], fleet.engine.kv_tokens,
                  mem.headroom, fleet.capacity, sim, scale, len(part), fleet)


def at_rate(r: Result, reqs: Sequence[TraceRequest], rate: float, cfg: DispatchConfig, *,
            seed: int = 0) -> None:
    """Latency figures of a candidate at a common fleet-wide request rate (fills
    `at_reference`; the slice, on the fleet it was swept on, gets its share of the
    rate). `reqs`: the pool `evaluate` had."""
    part = list(reqs[:r.requests])
    run = simulate(scale_rate(part, rate / r.scale / offered_rate(part)), r.fleet, cfg,
                   seed=seed)
    r.at_reference = metrics.summarize(run)


OBJECTIVES = ("goodput", "cost", "latency")


def rank(results: Sequence[Result], objective: str) -> list[Result]:
    """Best first. goodput: most requests/s on the budget; cost: most goodput per GPU
    used (per dollar: one GPU type); latency: lowest p99 end-to-end latency at the
    reference rate among those that meet the SLOs there (the rest after, by goodput)."""
    if objective == "goodput":
        return sorted(results, key=lambda r: (-r.goodput, r.candidate.gpus))
    if objective == "cost":
        return sorted(results, key=lambda r: (-r.goodput / r.candidate.gpus, -r.goodput))
    if objective == "latency":
        def key(r: Result) -> tuple[int, float]:
            att = r.at_reference.get("attainment") or 0.0
            e2e = r.at_reference.get("p99_e2el_ms")
            if att >= 0.9 and e2e is not None:
                return (0, float(e2e))
            return (1, -r.goodput)
        return sorted(results, key=key)
    raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")


__all__ = ["OBJECTIVES", "Candidate", "Result", "Shape", "at_rate", "candidates",
           "capacity_estimate", "evaluate", "fleet_for", "layouts", "pd_splits",
           "prefill_share", "rank", "reduced", "requests_per_engine", "shape_of", "slots"]
