"""Metrics of one simulated run, the shared-cache upper bound, and goodput.

Names follow vLLM's ``vllm bench serve`` result JSON (``mean_ttft_ms``,
``p99_itl_ms``, ``request_throughput``...) so simulated and measured runs can be
compared key for key. Pure Python: no numpy, so the simulator core stays light.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cplane.fleetsim.records import (
    DEFAULT_SLOS,
    LEVEL_NAMES,
    RequestRecord,
    RunResult,
    SloTarget,
    TraceRequest,
)

PERCENTILES: tuple[tuple[str, float], ...] = (("median", 50.0), ("p90", 90.0), ("p99", 99.0))


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation, as numpy's default.

    Rank ``p/100 * (n-1)`` between the two nearest sorted values; None when empty.
    """
    if not values:
        return None
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def weighted_percentile(samples: Iterable[tuple[float, float]], p: float) -> float | None:
    """The p-th percentile (0..100) of (value, weight) samples, by nearest rank.

    The smallest value v whose cumulative weight (of all samples <= v) reaches
    ``p/100`` of the total weight; p=0 gives the minimum. A weight-w sample counts
    as w copies, so with integer weights this is the nearest-rank percentile of
    the expanded list (no interpolation: a run-length-encoded ITL list stays exact
    without expanding it). Zero/negative weights are ignored; None when empty.
    """
    xs = sorted((v, w) for v, w in samples if w > 0)
    if not xs:
        return None
    total = sum(w for _, w in xs)
    cum = 0.0
    for v, w in xs:
        cum += w
        # Compare cum*100 >= p*total rather than cum >= p/100*total: exact for the
        # integer counts we get, where 0.29*100 style rounding would shift a rank.
        if cum * 100.0 >= p * total:
            return v
    return xs[-1][0]


def weighted_mean(samples: Iterable[tuple[float, float]]) -> float | None:
    """Mean of (value, weight) samples; None when the total weight is 0."""
    num = den = 0.0
    for v, w in samples:
        if w > 0:
            num += v * w
            den += w
    return num / den if den > 0 else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _dist(name: str, values: Sequence[float]) -> dict[str, float | None]:
    """mean_/median_/p90_/p99_<name> of plain samples."""
    out: dict[str, float | None] = {f"mean_{name}": _mean(values)}
    for label, p in PERCENTILES:
        out[f"{label}_{name}"] = percentile(values, p)
    return out


def is_completed(rec: RequestRecord) -> bool:
    """Ran to its end: finished and not rejected."""
    return rec.finished_ms is not None and not rec.rejected


def is_good(rec: RequestRecord, slo: SloTarget) -> bool:
    """DistServe's test: TTFT <= target and TPOT <= target.

    A request with fewer than two output tokens has no TPOT and is judged on TTFT
    alone; a rejected or unfinished one is never good.
    """
    if not is_completed(rec):
        return False
    ttft = rec.ttft_ms
    if ttft is None or ttft > slo.ttft_ms:
        return False
    tpot = rec.tpot_ms
    return tpot is None or tpot <= slo.tpot_ms


def jain_index(xs: Sequence[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 = equal, 1/n = one takes all.

    None when empty or every x is 0 (0/0: nobody got anything to compare).
    """
    sq = sum(x * x for x in xs)
    if not xs or sq <= 0:
        return None
    return sum(xs) ** 2 / (len(xs) * sq)


def tenant_service_shares(records: Sequence[RequestRecord]) -> dict[str, float]:
    """Per tenant: service received / service demanded, in tokens (0..1).

    Demand = sum over ALL the tenant's requests of prompt_tokens + output_tokens
    as asked for in the trace. Service = output tokens actually produced
    (``rec.output_tokens``) + prompt_tokens of each request whose prefill completed
    (it has a first token and was not rejected). Tenants with zero demand are left
    out. In a drained run where everything finishes every share is 1.0, so the
    index only moves with rejections and unfinished requests.
    """
    demand: dict[str, float] = defaultdict(float)
    served: dict[str, float] = defaultdict(float)
    for rec in records:
        t = rec.req.tenant
        demand[t] += rec.req.prompt_tokens + rec.req.output_tokens
        prefilled = rec.first_token_ms is not None and not rec.rejected
        served[t] += rec.output_tokens + (rec.req.prompt_tokens if prefilled else 0)
    return {t: served[t] / d for t, d in demand.items() if d > 0}


def maxmin_shares(records: Sequence[RequestRecord],
                  weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per tenant: work served while requests arrived / its weighted max-min fair share.

    Over the arrival window (first to last arrival), a tenant's demand is the
    work (prompt + output tokens) of its requests that arrived, its service the
    work of its requests dispatched; the fleet's capacity is taken as the
    total served. The max-min fair split of that capacity (water-filling by
    weight: nobody gets more than it asked, the rest is shared by weight) is
    the ideal; 1.0 = exactly the fair share. Jain's index over these ratios is
    `jain_fairness_maxmin`. A run that kept up with demand has every ratio
    near 1 whatever the policy; it separates policies under overload."""
    if not records:
        return {}
    t0 = min(r.req.arrival_ms for r in records)
    t1 = max(r.req.arrival_ms for r in records)
    w = weights or {}
    demand: dict[str, float] = {}
    served: dict[str, float] = {}
    for r in records:
        work = float(r.req.prompt_tokens + r.req.output_tokens)
        demand[r.req.tenant] = demand.get(r.req.tenant, 0.0) + work
        sent = r.dispatched_ms
        if sent is not None and t0 <= sent <= t1:
            served[r.req.tenant] = served.get(r.req.tenant, 0.0) + work
    capacity = sum(served.values())
    alloc = dict.fromkeys(demand, 0.0)
    left = dict(demand)
    while capacity > 1e-9 and left:
        total_w = sum(w.get(t, 1.0) for t in left)
        share = {t: capacity * w.get(t, 1.0) / total_w for t in left}
        done = [t for t in left if left[t] <= share[t]]
        if not done:
            for t in left:
                alloc[t] += share[t]
            break
        for t in done:
            alloc[t] += left[t]
            capacity -= left.pop(t)
    return {t: served.get(t, 0.0) / a for t, a in alloc.items() if a > 0}


def load_imbalance_ratios(samples: Sequence[tuple[float, tuple[int, ...]]]) -> list[float]:
    """max/mean outstanding per load sample; samples with an idle fleet are skipped."""
    ratios = []
    for _, loads in samples:
        if not loads:
            continue
        mean = sum(loads) / len(loads)
        if mean > 0:
            ratios.append(max(loads) / mean)
    return ratios


def _level_name(level: int) -> str:
    return LEVEL_NAMES[level] if 0 <= level < len(LEVEL_NAMES) else f"level{level}"


def _attainment(
    records: Sequence[RequestRecord], slos: Mapping[str, SloTarget]
) -> tuple[float | None, dict[str, float]]:
    """Overall and per-class fraction of requests that met their class's SLO."""
    missing = sorted({r.req.slo_class for r in records} - set(slos))
    if missing:
        # Fail loudly: silently skipping a class would inflate goodput.
        raise ValueError(f"no SLO target for class(es) {missing}; known: {sorted(slos)}")
    good: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    for rec in records:
        cls = rec.req.slo_class
        count[cls] += 1
        good[cls] += is_good(rec, slos[cls])
    by_class = {c: good[c] / n for c, n in sorted(count.items())}
    overall = sum(good.values()) / len(records) if records else None
    return overall, by_class


def _latencies(done: Sequence[RequestRecord]) -> dict[str, Any]:
    """TTFT/TPOT/ITL/E2EL distributions over completed requests (as vLLM does)."""
    ttft = [v for r in done if (v := r.ttft_ms) is not None]
    tpot = [v for r in done if (v := r.tpot_ms) is not None]
    e2el = [v for r in done if (v := r.e2e_ms) is not None]
    itl = [(gap, float(n)) for r in done for gap, n in r.itl_ms]
    out: dict[str, Any] = {}
    out.update(_dist("ttft_ms", ttft))
    out.update(_dist("tpot_ms", tpot))
    out["mean_itl_ms"] = weighted_mean(itl)
    for label, p in PERCENTILES:
        out[f"{label}_itl_ms"] = weighted_percentile(itl, p)
    out.update(_dist("e2el_ms", e2el))
    return out


def _ttft_by_priority(done: Sequence[RequestRecord]) -> dict[str, dict[str, Any]]:
    by_level: dict[int, list[float]] = defaultdict(list)
    for rec in done:
        if (v := rec.ttft_ms) is not None:
            by_level[rec.req.level].append(v)
    return {
        _level_name(lvl): {
            "count": len(vs),
            "p50": percentile(vs, 50.0),
            "p90": percentile(vs, 90.0),
            "p99": percentile(vs, 99.0),
        }
        for lvl, vs in sorted(by_level.items())
    }


def summarize(run: RunResult, slos: Mapping[str, SloTarget] = DEFAULT_SLOS) -> dict[str, Any]:
    """Everything worth reporting about one run, JSON-safe (None, never NaN).

    Latency distributions, throughputs and priority TTFTs count completed
    requests only (as vLLM does); attainment and fairness count every request,
    so a rejection or an unfinished request costs attainment.
    """
    records = run.records
    done = [r for r in records if is_completed(r)]
    duration_s = run.duration_ms / 1000.0

    def rate(x: float) -> float | None:
        return x / duration_s if duration_s > 0 else None

    in_tok = sum(r.req.prompt_tokens for r in done)
    out_tok = sum(r.output_tokens for r in done)

    out: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(done),
        "failed": sum(1 for r in records if r.rejected),
        "unfinished": sum(1 for r in records if not r.rejected and r.finished_ms is None),
        "workers": run.workers,
        "duration_s": duration_s,
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "request_throughput": rate(len(done)),
        "output_throughput": rate(out_tok),
        "total_token_throughput": rate(in_tok + out_tok),
    }
    out.update(_latencies(done))

    overall, by_class = _attainment(records, slos)
    out["attainment"] = overall
    out["attainment_by_class"] = by_class
    out["ttft_by_priority"] = _ttft_by_priority(done)

    # Queue time of everything that got dispatched, finished or not.
    queue = [v for r in records if (v := r.queue_ms) is not None]
    out["mean_queue_ms"] = _mean(queue)
    out["p99_queue_ms"] = percentile(queue, 99.0)

    q = run.prefix_query_tokens
    out["prefix_hit_rate"] = run.prefix_hit_tokens / q if q > 0 else 0.0
    # Work placed per worker over the whole run (prompt + output tokens): the
    # imbalance a router causes, apart from how busy the fleet was at a moment.
    placed: dict[str, float] = {}
    for r in done:
        placed[r.worker] = placed.get(r.worker, 0.0) + r.req.prompt_tokens + r.output_tokens
    mean_placed = sum(placed.values()) / run.workers if run.workers else 0.0
    out["work_max_mean"] = max(placed.values()) / mean_placed if mean_placed > 0 else None
    ratios = load_imbalance_ratios(run.load_samples)
    out["mean_load_imbalance"] = _mean(ratios)
    out["p99_load_imbalance"] = percentile(ratios, 99.0)

    shares = tenant_service_shares(records)
    out["tenants"] = len(shares)
    out["jain_fairness"] = jain_index(list(shares.values()))
    # Service shares are all 1 once a run drains; how well each tenant's SLOs
    # were met is what a policy changes, so fairness is also taken over that.
    good: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        g = good[r.req.tenant]
        g[0] += is_good(r, slos[r.req.slo_class])
        g[1] += 1
    by_tenant = {t: n / total for t, (n, total) in sorted(good.items())}
    out["attainment_by_tenant"] = by_tenant
    out["jain_fairness_attainment"] = jain_index(list(by_tenant.values()))
    fair = maxmin_shares(records)
    out["maxmin_shares"] = fair
    out["jain_fairness_maxmin"] = jain_index(list(fair.values())) if len(fair) > 1 else None
    cost = sum(r.cost for r in done)
    out["total_cost"] = cost
    out["cost_per_1k_tokens"] = cost / (in_tok + out_tok) * 1000 if in_tok + out_tok else None

    out["events"] = run.events
    out["events_per_s"] = run.events / run.wall_s if run.wall_s > 0 else None
    return out


def shared_cache_bound(reqs: Sequence[TraceRequest], total_blocks: int) -> float:
    """Block hit fraction of ONE LRU cache of ``total_blocks`` blocks (<= 0: unlimited).

    The upper bound for prefix-cache routing: a fleet whose caches add up to the
    same size can do no better than one shared cache. Requests replay in arrival
    order (stable for ties); a request hits its LEADING blocks that are cached,
    stopping at the first miss (a KV prefix is only reusable up to there), then
    all its blocks are inserted/touched in order, evicting least-recent ones.
    Returns hits / blocks queried (0.0 when no request has blocks).
    """
    cache: OrderedDict[int, None] = OrderedDict()
    limit = total_blocks if total_blocks > 0 else None
    hits = queried = 0
    for req in sorted(reqs, key=lambda r: r.arrival_ms):
        blocks = req.block_hashes
        queried += len(blocks)
        for h in blocks:
            if h not in cache:
                break
            hits += 1
        for h in blocks:
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
                if limit is not None and len(cache) > limit:
                    cache.popitem(last=False)
    return hits / queried if queried else 0.0


@dataclass(frozen=True, slots=True)
class Goodput:
    """Goodput of a rate sweep (req/s).

    ``lower_bound`` is True when no swept rate failed: the true goodput is at
    least ``rate``, and the sweep should go higher to pin it down.
    """

    rate: float
    lower_bound: bool


def goodput(points: Sequence[tuple[float, float]], threshold: float = 0.9) -> Goodput:
    """DistServe's goodput from (rate_req_per_s, attainment) points of a sweep.

    Sorted by rate: 0 if the lowest rate already fails; the highest rate (as a
    lower bound) if none fails; else linear interpolation of the threshold
    crossing between the last passing rate and the first failing one. Points past
    the first failure are ignored even if they pass again (noise, not capacity).
    """
    if not points:
        raise ValueError("goodput needs at least one (rate, attainment) point")
    pts = sorted(points, key=lambda p: p[0])
    for i, (rate, att) in enumerate(pts):
        if att >= threshold:
            continue
        if i == 0:
            return Goodput(0.0, False)
        r0, a0 = pts[i - 1]
        # a0 >= threshold > att, so the denominator is positive.
        return Goodput(r0 + (a0 - threshold) / (a0 - att) * (rate - r0), False)
    return Goodput(pts[-1][0], True)
