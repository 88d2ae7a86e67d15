"""What a worker measures, as plain counters and bucket histograms. No I/O.

`workers/serve.py` tells one `WorkerStats` (in the ServeContext) when a run
reaches the engine, each time tokens come out, and what terminal it got;
`report()` turns that into a `WorkerReport` (schemas/control.py), which the
control subject answers with and workers/metrics.py exports to Prometheus.
What runs here now is the run ledger's (workers/runs.py): request statuses
read it.

Everything is bounded: histograms have fixed buckets, recent samples a fixed
length, label values (tenants, SLO classes) a cap beyond which they count as
"other".
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cplane.client.aggregate import health, latency, load_of
from cplane.schemas.control import (
    HistogramData,
    OutcomeCount,
    RateWindow,
    RequestPhase,
    RequestStatus,
    SloCount,
    WorkerReport,
)
from cplane.schemas.messages import ErrorCode, Final, FinishReason, Heartbeat, WorkItem
from cplane.schemas.settings import MetricsSettings, Settings
from cplane.workers.runs import Run, RunLedger

# vLLM's buckets (vllm/v1/metrics/loggers.py), with finer ones below for fast engines.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                  2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
                 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
OTHER = "other"  # label value of everything past a cap
RATE_WINDOW_S = 60  # rates (req/s, tokens/s) over the last minute
_BOUND = 4.0  # a request's own target stays within [class / 4, class * 4] (orchestrator/slo.py)


class Histogram:
    """Fixed buckets; `observe(v, n)` counts `v` n times (a chunk of n tokens)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n  # first bound >= value
        self.sum += value * n
        self.count += n

    def data(self) -> HistogramData:
        return HistogramData(bounds=list(self.bounds), counts=list(self.counts), sum=self.sum,
                             count=self.count)


class RateBuckets:
    """Requests and tokens finished per second over the last `RATE_WINDOW_S` (a ring)."""

    def __init__(self, window_s: int = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._ring: deque[list[int]] = deque()  # [second, requests, prompt, completion]
        self._since = time.time()

    def add(self, now_s: float, prompt: int, completion: int) -> None:
        sec = int(now_s)
        if not self._ring or self._ring[-1][0] != sec:
            self._ring.append([sec, 0, 0, 0])
            while self._ring[0][0] <= sec - self.window_s:
                self._ring.popleft()
        b = self._ring[-1]
        b[1] += 1
        b[2] += prompt
        b[3] += completion

    def window(self, now_s: float) -> RateWindow:
        cut = int(now_s) - self.window_s
        live = [b for b in self._ring if b[0] > cut]
        span = min(float(self.window_s), max(1.0, now_s - self._since))
        return RateWindow(window_s=span, requests=sum(b[1] for b in live),
                          prompt_tokens=sum(b[2] for b in live),
                          completion_tokens=sum(b[3] for b in live))


def capped(value: str, seen: set[str], cap: int) -> str:
    """`value` as a label: kept while fewer than `cap` distinct values were seen."""
    if value in seen:
        return value
    if len(seen) < cap:
        seen.add(value)
        return value
    return OTHER


@dataclass(slots=True)
class WorkerStats:
    worker_id: str
    settings: Settings
    runs: RunLedger = field(default_factory=RunLedger)  # what runs here now
    metrics: MetricsSettings = field(init=False)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS_S))
    tpot: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS_S))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS_S))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS_S))
    queue: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS_S))
    recent: dict[str, deque[float]] = field(default_factory=dict)
    outcomes: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    slo: dict[str, list[int]] = field(default_factory=dict)  # class -> [finished, met, tokens]
    cost_by_tenant: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rates: RateBuckets = field(default_factory=RateBuckets)
    started_ms: float = field(default_factory=lambda: time.time() * 1000)
    _tenants: set[str] = field(default_factory=set)
    _classes: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.metrics = self.settings.metrics
        n = self.metrics.recent_samples
        self.recent = {k: deque(maxlen=n) for k in ("ttft", "tpot", "e2e", "queue")}

    # -- one run's life here ------------------------------------------------------------
    def begin(self, run: Run, item: WorkItem) -> None:
        """`run` reaches the engine with `item` (its tokens so far count)."""
        run.started_ms = time.time() * 1000
        run.tokens = len(item.resume_token_ids)

    def tokens(self, run: Run, n: int) -> None:
        """`n` tokens came out of the engine now: inter-token gaps (vLLM's ITL)."""
        if n <= 0:
            return
        now = time.monotonic()
        if run.last_token_s:
            self.itl.observe((now - run.last_token_s) / n, n)
        elif not run.first_token_ms:
            run.first_token_ms = time.time() * 1000
        run.last_token_s = now
        run.tokens += n

    # -- terminals this worker stored ---------------------------------------------------
    def _labels(self, item: WorkItem) -> tuple[str, str, str]:
        req = item.request
        return (item.priority.value, self._slo_name(item.slo_class),
                capped(req.tenant or "", self._tenants, self.metrics.max_tenants))

    def _slo_name(self, asked: str) -> str:
        o = self.settings.orchestrator
        name = asked if asked in o.slo_classes else o.default_slo_class
        return capped(name, self._classes, self.metrics.max_slo_classes)

    def finished(self, item: WorkItem, final: Final) -> None:
        prio, slo, tenant = self._labels(item)
        key = (str(final.finish_reason), prio, slo, tenant)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        if final.finish_reason is FinishReason.CANCELLED:
            return
        t, u = final.timings, final.usage
        self.ttft.observe(t.ttft_ms / 1000)
        self.e2e.observe(t.e2e_ms / 1000)
        self.queue.observe(t.queue_ms / 1000)
        if u.completion_tokens > 1:
            self.tpot.observe(t.tpot_ms / 1000)
            self.recent["tpot"].append(t.tpot_ms)
        for k, v in (("ttft", t.ttft_ms), ("e2e", t.e2e_ms), ("queue", t.queue_ms)):
            self.recent[k].append(v)
        self.prompt_tokens += u.prompt_tokens
        self.completion_tokens += u.completion_tokens
        self.cost_by_tenant[tenant] = self.cost_by_tenant.get(tenant, 0.0) + u.cost
        self.rates.add(time.time(), u.prompt_tokens, u.completion_tokens)
        counts = self.slo.setdefault(slo, [0, 0, 0])
        counts[0] += 1
        if self._met(item, final):
            counts[1] += 1
            counts[2] += u.completion_tokens

    def _met(self, item: WorkItem, final: Final) -> bool:
        """TTFT and TPOT within target (the request's own within [1/4, 4] x its class's)."""
        o = self.settings.orchestrator
        c = o.slo_classes.get(item.slo_class) or o.slo_classes.get(o.default_slo_class)
        if c is None:
            return True
        req, t = item.request, final.timings
        ttft = clamp(req.ttft_target_ms, c.ttft_ms)
        tpot = clamp(req.tpot_target_ms, c.tpot_ms)
        deadline = req.slo_deadline_ms or c.deadline_ms
        return (t.ttft_ms <= ttft and (final.usage.completion_tokens <= 1 or t.tpot_ms <= tpot)
                and (not deadline or t.e2e_ms <= deadline))

    def failed(self, item: WorkItem, code: ErrorCode) -> None:
        prio, slo, tenant = self._labels(item)
        key = ("error", prio, slo, tenant)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        self.errors[str(code)] = self.errors.get(str(code), 0) + 1

    # -- reads ----------------------------------------------------------------------------
    def request_status(self, request_id: str) -> RequestStatus | None:
        """Where the request's run here stands: from its start on the engine until
        its outcome is stored (a query in between must never find neither this
        worker nor LLM_DONE). None when it does not run here."""
        run = self.runs.get(request_id)
        if run is None or not run.started_ms or run.running is None:
            return None
        item = run.running
        decoding = run.first_token_ms or item.resume_token_ids or item.ttft_ms is not None
        return RequestStatus(
            request_id=request_id,
            phase=RequestPhase.DECODING if decoding else RequestPhase.PREFILL,
            source=f"worker:{self.worker_id}", worker_id=self.worker_id,
            orchestrator_id=item.orchestrator_id, priority=item.priority.value,
            slo_class=item.slo_class, queued_ms=item.enqueued_ms,
            dispatched_ms=item.dispatched_ms, started_ms=run.started_ms,
            first_token_ms=run.first_token_ms, tokens=run.tokens)

    def report(self, hb: Heartbeat | None, events: Mapping[str, int],
               engine_errors: int = 0) -> WorkerReport:
        """Everything measured, with the load, health and GPUs `hb` tells (a fresh
        heartbeat: its age is 0, so its state alone judges its health), and the instance
        view's latency as get_metrics folds it (client/aggregate.py)."""
        now = time.time()
        e2e = self.e2e.data()
        ok, reason = health(hb, 0.0, math.inf) if hb else (False, "no heartbeat")
        lat = latency(e2e, list(self.recent["e2e"]))
        return WorkerReport(
            worker_id=self.worker_id,
            role=str(hb.role) if hb else "", state=str(hb.state) if hb else "",
            engine=hb.engine if hb else "", models=list(hb.models) if hb else [],
            capacity=hb.capacity if hb else 0, running=hb.running if hb else 0,
            waiting=hb.waiting if hb else 0, held_items=hb.held_items if hb else 0,
            kv_usage=hb.kv_usage if hb else 0.0,
            prefix_hit_rate=hb.prefix_hit_rate if hb else 0.0,
            prompt_tokens_per_s=hb.prompt_tokens_per_s if hb else 0.0,
            gen_tokens_per_s=hb.gen_tokens_per_s if hb else 0.0,
            engine_errors_in_a_row=engine_errors,
            outcomes=[OutcomeCount(outcome=o, priority=p, slo_class=s, tenant=t, count=n)
                      for (o, p, s, t), n in self.outcomes.items()],
            errors=dict(self.errors),
            slo=[SloCount(slo_class=k, finished=v[0], met=v[1], met_tokens=v[2])
                 for k, v in self.slo.items()],
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            cost_by_tenant=dict(self.cost_by_tenant), events=dict(events),
            ttft=self.ttft.data(), tpot=self.tpot.data(), itl=self.itl.data(),
            e2e=e2e, queue=self.queue.data(),
            recent={k: list(v) for k, v in self.recent.items()},
            window=self.rates.window(now), started_ms=self.started_ms, ts_ms=now * 1000,
            healthy=ok, health_reason=reason,
            load=load_of(hb.held_items, hb.capacity) if hb else 0.0,
            latency_avg_ms=lat.mean_ms, latency_p95_ms=lat.p95_ms,
            ttft_ms_avg=hb.ttft_ms_avg if hb else 0.0, tpot_ms_avg=hb.tpot_ms_avg if hb else 0.0,
            served=hb.served if hb else 0, faults=hb.faults if hb else 0,
            gpu_util=hb.gpu_util if hb else None,
            gpu_mem_used_bytes=hb.gpu_mem_used_bytes if hb else None,
            gpu_mem_total_bytes=hb.gpu_mem_total_bytes if hb else None)


def clamp(own: float | None, base: float) -> float:
    if own is None or own <= 0:
        return base
    return min(max(own, base / _BOUND), base * _BOUND)


__all__ = ["E2E_BUCKETS_S", "ITL_BUCKETS_S", "OTHER", "TTFT_BUCKETS_S", "Histogram",
           "RateBuckets", "WorkerStats", "capped", "clamp"]
