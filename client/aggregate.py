"""Turning the replies of many orchestrators and workers into one answer. Pure.

`client/control.py` collects the replies; these functions fold them:

- counts add up over workers (each counts the terminals it stored) and over
  orchestrator replicas (each counts what it held, rejected, cancelled);
- latency means come from the histograms' sums and counts (every request
  since each worker started), percentiles from the workers' recent samples
  (the last `metrics.recent_samples` requests of each), inter-token
  percentiles from the histogram buckets (linear within a bucket);
- the queue is JetStream's, as the most recent replica saw it;
- a request's phase is the most advanced any answer gives;
- an instance is healthy when it is READY and its last heartbeat is younger
  than `orchestrator.worker_timeout_s` (`health`: `cplane workers`, the
  worker's own report and the instance view judge alike), and its view joins
  its heartbeat with its report (`instance_view`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import msgspec

from cplane.schemas.control import (
    HistogramData,
    InstanceView,
    OrchestratorReport,
    QueueDepth,
    RequestPhase,
    RequestStatus,
    WorkerReport,
)
from cplane.schemas.messages import Heartbeat, WorkerState

NORMAL_ENDS = ("stop", "length")  # finish reasons of a completed request
SHED_CODE = "overloaded"


class LatencySummary(msgspec.Struct, frozen=True, kw_only=True):
    """Milliseconds."""

    count: int = 0
    mean_ms: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0


class SloSummary(msgspec.Struct, frozen=True, kw_only=True):
    slo_class: str
    finished: int = 0
    met: int = 0
    violations: int = 0
    compliance: float = 1.0  # met / finished (1.0 with nothing finished)
    goodput_tokens: int = 0


class MetricsSummary(msgspec.Struct, frozen=True, kw_only=True):
    """`ControlPlane.get_metrics()`: the whole system since its processes started."""

    orchestrators: int = 0
    leader: str = ""
    workers: int = 0
    workers_healthy: int = 0
    total: int = 0  # requests that ended: completed + failed + cancelled + rejected
    completed: int = 0
    failed: int = 0  # ErrorReplies from workers
    cancelled: int = 0  # Final(cancelled), by workers and by orchestrators before dispatch
    rejected: int = 0  # ErrorReplies from orchestrators (bad input, shed, model absent)
    shed: int = 0
    accepted: int = 0
    dispatched: int = 0
    active: int = 0  # dispatched, no terminal yet (the leader's ledger)
    running: int = 0  # sequences the engines run now
    queued: int = 0  # requests in LLM_REQ (JetStream)
    queued_by_priority: dict[str, int] = {}
    ttft: LatencySummary = LatencySummary()
    tpot: LatencySummary = LatencySummary()
    itl: LatencySummary = LatencySummary()
    e2e: LatencySummary = LatencySummary()
    queue_time: LatencySummary = LatencySummary()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    window_s: float = 0.0  # rates over the workers' last minute (or uptime, if shorter)
    requests_per_s: float = 0.0
    prompt_tokens_per_s: float = 0.0
    completion_tokens_per_s: float = 0.0
    slo: list[SloSummary] = []
    slo_violations: int = 0
    slo_compliance: float = 1.0
    kv_usage_avg: float = 0.0
    kv_usage_max: float = 0.0
    cost: float = 0.0


class SystemStatus(msgspec.Struct, frozen=True, kw_only=True):
    """`ControlPlane.get_status()`: every replica, the live workers, the queue."""

    orchestrators: list[OrchestratorReport] = []
    leader: str = ""
    policy: str = ""
    instances: list[Heartbeat] = []
    queue: list[QueueDepth] = []


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`; 0.0 when empty."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def merge_histograms(hs: Iterable[HistogramData | None]) -> HistogramData | None:
    out: HistogramData | None = None
    for h in hs:
        if h is None:
            continue
        if out is None:
            out = h
        elif out.bounds == h.bounds:
            out = HistogramData(bounds=out.bounds,
                                counts=[a + b for a, b in zip(out.counts, h.counts,
                                                              strict=True)],
                                sum=out.sum + h.sum, count=out.count + h.count)
    return out


def histogram_quantile(h: HistogramData, q: float) -> float:
    """Prometheus' histogram_quantile (q in 0..1), linear within the bucket; seconds."""
    if h.count == 0:
        return 0.0
    rank = q * h.count
    cum = 0
    lower = 0.0
    for bound, n in zip(h.bounds, h.counts, strict=False):
        if cum + n >= rank and n > 0:
            return lower + (bound - lower) * (rank - cum) / n
        cum += n
        lower = bound
    return h.bounds[-1] if h.bounds else 0.0


def latency(h: HistogramData | None, samples: Sequence[float]) -> LatencySummary:
    """Mean from the histogram (seconds -> ms), percentiles from the samples (ms) or,
    without samples, from the buckets."""
    if h is None or h.count == 0:
        return LatencySummary()
    mean = h.sum / h.count * 1000
    if samples:
        p = [percentile(samples, x) for x in (50, 90, 95, 99)]
    else:
        p = [histogram_quantile(h, x) * 1000 for x in (0.5, 0.9, 0.95, 0.99)]
    return LatencySummary(count=h.count, mean_ms=mean, p50_ms=p[0], p90_ms=p[1], p95_ms=p[2],
                          p99_ms=p[3])


def _newest_queue(orchs: Sequence[OrchestratorReport]) -> list[QueueDepth]:
    with_queue = [o for o in orchs if o.queue]
    return max(with_queue, key=lambda o: o.ts_ms).queue if with_queue else []


def _slo(workers: Sequence[WorkerReport]) -> list[SloSummary]:
    by: dict[str, list[int]] = {}
    for w in workers:
        for s in w.slo:
            acc = by.setdefault(s.slo_class, [0, 0, 0])
            acc[0] += s.finished
            acc[1] += s.met
            acc[2] += s.met_tokens
    return [SloSummary(slo_class=k, finished=f, met=m, violations=f - m,
                       compliance=m / f if f else 1.0, goodput_tokens=t)
            for k, (f, m, t) in sorted(by.items())]


def summarize(orchs: Sequence[OrchestratorReport],
              workers: Sequence[WorkerReport]) -> MetricsSummary:
    completed = failed = cancelled = 0
    for w in workers:
        for o in w.outcomes:
            if o.outcome in NORMAL_ENDS:
                completed += o.count
            elif o.outcome == "error":
                failed += o.count
            elif o.outcome == "cancelled":
                cancelled += o.count
    cancelled += sum(o.counters.get("cancelled", 0) for o in orchs)
    rejected = sum(o.counters.get("rejected", 0) for o in orchs)
    queue = _newest_queue(orchs)
    leaders = [o for o in orchs if o.leading]
    slo = _slo(workers)
    finished = sum(s.finished for s in slo)
    met = sum(s.met for s in slo)
    window = max((w.window.window_s for w in workers), default=0.0)
    rate = [sum(getattr(w.window, f) / w.window.window_s for w in workers if w.window.window_s)
            for f in ("requests", "prompt_tokens", "completion_tokens")]

    def recent(key: str) -> list[float]:
        return [v for w in workers for v in w.recent.get(key, ())]

    return MetricsSummary(
        orchestrators=len(orchs), leader=leaders[0].orchestrator_id if leaders else "",
        workers=len(workers), workers_healthy=sum(w.state == "ready" for w in workers),
        total=completed + failed + cancelled + rejected, completed=completed, failed=failed,
        cancelled=cancelled, rejected=rejected,
        shed=sum(o.rejections.get(SHED_CODE, 0) for o in orchs),
        accepted=sum(o.counters.get("accepted", 0) for o in orchs),
        dispatched=sum(o.counters.get("dispatched", 0) for o in orchs),
        active=sum(o.in_flight for o in leaders),
        running=sum(w.running for w in workers),
        queued=sum(q.pending + q.held for q in queue),
        queued_by_priority={q.priority: q.pending + q.held for q in queue},
        ttft=latency(merge_histograms(w.ttft for w in workers), recent("ttft")),
        tpot=latency(merge_histograms(w.tpot for w in workers), recent("tpot")),
        itl=latency(merge_histograms(w.itl for w in workers), ()),
        e2e=latency(merge_histograms(w.e2e for w in workers), recent("e2e")),
        queue_time=latency(merge_histograms(w.queue for w in workers), recent("queue")),
        prompt_tokens=sum(w.prompt_tokens for w in workers),
        completion_tokens=sum(w.completion_tokens for w in workers),
        window_s=window, requests_per_s=rate[0], prompt_tokens_per_s=rate[1],
        completion_tokens_per_s=rate[2],
        slo=slo, slo_violations=finished - met,
        slo_compliance=met / finished if finished else 1.0,
        kv_usage_avg=(sum(w.kv_usage for w in workers) / len(workers)) if workers else 0.0,
        kv_usage_max=max((w.kv_usage for w in workers), default=0.0),
        cost=sum(sum(w.cost_by_tenant.values()) for w in workers))


def system_status(orchs: Sequence[OrchestratorReport]) -> SystemStatus:
    newest: dict[str, Heartbeat] = {}
    for o in orchs:
        for hb in o.instances:
            if hb.worker_id not in newest or hb.ts_ms > newest[hb.worker_id].ts_ms:
                newest[hb.worker_id] = hb
    leaders = [o for o in orchs if o.leading]
    lead = leaders[0] if leaders else (orchs[0] if orchs else None)
    return SystemStatus(
        orchestrators=sorted((msgspec.structs.replace(o, instances=[]) for o in orchs),
                             key=lambda o: (not o.leading, o.orchestrator_id)),
        leader=leaders[0].orchestrator_id if leaders else "",
        policy=lead.policy if lead else "",
        instances=[newest[k] for k in sorted(newest)], queue=_newest_queue(orchs))


def health(of: Heartbeat | WorkerReport, age_s: float, timeout_s: float) -> tuple[bool, str]:
    """(healthy, reason): READY with a heartbeat younger than `timeout_s` (`age_s`
    old when read; a worker judging its own report passes 0)."""
    if of.state != WorkerState.READY:
        return False, f"state {of.state}"
    if age_s > timeout_s:
        return False, f"no heartbeat for {age_s:.0f} s"
    return True, ""


def load_of(held: int, capacity: int) -> float:
    """Items held over the sequences it takes at once (0.0 without a capacity)."""
    return held / capacity if capacity > 0 else 0.0


def instance_view(hb: Heartbeat, report: WorkerReport | None = None, *, age_s: float = 0.0,
                  timeout_s: float = math.inf) -> InstanceView:
    """The instance behind `hb` (read `age_s` old): load, health and GPU from the
    heartbeat, end-to-end latency from its report (0.0 without one)."""
    return _view(hb, health(hb, age_s, timeout_s), report)


def report_view(r: WorkerReport) -> InstanceView:
    """The instance as its own report tells it (no replica has its heartbeat yet):
    it just answered, so only its state judges its health."""
    return _view(r, health(r, 0.0, math.inf), r)


def _view(src: Heartbeat | WorkerReport, verdict: tuple[bool, str],
          report: WorkerReport | None) -> InstanceView:
    # Latency as get_metrics folds it: the histogram's mean, the p95 of recent samples.
    e2e = (latency(report.e2e, report.recent.get("e2e", ())) if report is not None
           else LatencySummary())
    return InstanceView(
        instance_id=src.worker_id, role=str(src.role), models=list(src.models),
        engine=src.engine, state=str(src.state), healthy=verdict[0], health_reason=verdict[1],
        active_requests=src.running, queued=src.waiting, held=src.held_items,
        capacity=src.capacity, load=load_of(src.held_items, src.capacity),
        latency_avg_ms=e2e.mean_ms, latency_p95_ms=e2e.p95_ms, ttft_ms_avg=src.ttft_ms_avg,
        tpot_ms_avg=src.tpot_ms_avg, kv_usage=src.kv_usage, prefix_hit_rate=src.prefix_hit_rate,
        prompt_tokens_per_s=src.prompt_tokens_per_s, gen_tokens_per_s=src.gen_tokens_per_s,
        gpu_util=src.gpu_util, gpu_mem_used_bytes=src.gpu_mem_used_bytes,
        gpu_mem_total_bytes=src.gpu_mem_total_bytes, served=src.served, faults=src.faults,
        started_ms=src.started_ms, ts_ms=src.ts_ms)


def instance_views(heartbeats: Mapping[str, tuple[Heartbeat, float]],
                   reports: Iterable[WorkerReport], timeout_s: float) -> list[InstanceView]:
    """Every instance, by id: those with a heartbeat (worker id -> (heartbeat, its age
    in seconds)) joined with their reports, then those only a report knows."""
    by_id = {r.worker_id: r for r in reports}
    views = {wid: instance_view(hb, by_id.get(wid), age_s=age, timeout_s=timeout_s)
             for wid, (hb, age) in heartbeats.items()}
    for wid, r in by_id.items():
        views.setdefault(wid, report_view(r))
    return [views[k] for k in sorted(views)]


def merge_status(request_id: str, answers: Sequence[RequestStatus]) -> RequestStatus:
    """The most advanced answer (a worker's over an orchestrator's at the same phase),
    its unknown timestamps filled in from the others."""
    mine = [a for a in answers if a.request_id == request_id]
    if not mine:
        return RequestStatus(request_id=request_id, phase=RequestPhase.NOT_FOUND)
    best = max(mine, key=lambda a: (a.phase.rank, a.source.startswith("worker:")))
    fill: dict[str, object] = {}
    for f in ("queued_ms", "dispatched_ms", "started_ms", "first_token_ms", "finished_ms"):
        if not getattr(best, f):
            known = [getattr(a, f) for a in mine if getattr(a, f)]
            if known:
                fill[f] = min(known)
    for f in ("orchestrator_id", "worker_id", "priority", "slo_class"):
        if not getattr(best, f):
            known_s = [getattr(a, f) for a in mine if getattr(a, f)]
            if known_s:
                fill[f] = known_s[0]
    return msgspec.structs.replace(best, **fill) if fill else best


__all__ = ["LatencySummary", "MetricsSummary", "SloSummary", "SystemStatus", "health",
           "histogram_quantile", "instance_view", "instance_views", "latency", "load_of",
           "merge_histograms", "merge_status", "percentile", "report_view", "summarize",
           "system_status"]
