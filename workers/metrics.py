"""A worker's Prometheus `/metrics`: the one worker module that imports prometheus_client.

It exports a `WorkerReport` (workers/stats.py builds it from plain counters
and bucket histograms); nothing here counts. Names follow vLLM's where they
mean the same (`vllm:time_to_first_token_seconds` -> `cplane_time_to_first_token_seconds`).
Every scrape builds a fresh report on the worker's event loop (the HTTP
server runs in its own thread and never touches live state itself).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from cplane.bus.prom import NotReady, serve_metrics
from cplane.schemas.control import HistogramData, WorkerReport

WORKER_STATES = ("ready", "draining", "unhealthy", "stopped")
# Exported only by a worker that reads a GPU through NVML (absent elsewhere, never 0).
GPU_FAMILIES = frozenset({"cplane_gpu_utilization", "cplane_gpu_memory_used_bytes",
                          "cplane_gpu_memory_total_bytes"})

HISTOGRAMS = (  # (report field, metric name, documentation)
    ("ttft", "cplane_time_to_first_token_seconds",
     "Time to first token: stored in LLM_REQ -> first token published."),
    ("itl", "cplane_inter_token_latency_seconds",
     "Gaps between tokens as the engine produced them (per token)."),
    ("tpot", "cplane_request_time_per_output_token_seconds",
     "Per request: (last - first token) / (completion tokens - 1)."),
    ("e2e", "cplane_e2e_request_latency_seconds",
     "End to end: stored in LLM_REQ -> Final published."),
    ("queue", "cplane_request_queue_time_seconds",
     "Queue time: stored in LLM_REQ -> dispatched by the orchestrator."),
)


def histogram(name: str, doc: str, labels: list[str], values: list[str],
              h: HistogramData | None) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=labels)
    if h is not None:
        cum, buckets = 0, []
        for bound, n in zip(h.bounds, h.counts, strict=False):
            cum += n
            buckets.append((repr(float(bound)), float(cum)))
        buckets.append(("+Inf", float(h.count)))
        fam.add_metric(values, buckets, h.sum)
    return fam


def _gauge(name: str, doc: str, value: float, wid: str) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["worker"])
    g.add_metric([wid], value)
    return g


def families(r: WorkerReport) -> Iterator[Metric]:
    """Every metric family of one worker's report."""
    wid, model = r.worker_id, ",".join(r.models)
    for field, name, doc in HISTOGRAMS:
        yield histogram(name, doc, ["worker", "model"], [wid, model], getattr(r, field))
    req = CounterMetricFamily("cplane_requests", "Requests that ended on this worker, by "
                              "outcome (finish reason or error), priority, SLO class, tenant.",
                              labels=["worker", "outcome", "priority", "slo_class", "tenant"])
    for o in r.outcomes:
        req.add_metric([wid, o.outcome, o.priority, o.slo_class, o.tenant], o.count)
    yield req
    err = CounterMetricFamily("cplane_request_errors", "ErrorReplies this worker published.",
                              labels=["worker", "code"])
    for code, n in sorted(r.errors.items()):
        err.add_metric([wid, code], n)
    yield err
    for name, doc, v in (
            ("cplane_prompt_tokens", "Prompt tokens of requests finished here.",
             r.prompt_tokens),
            ("cplane_generation_tokens", "Completion tokens of requests finished here.",
             r.completion_tokens)):
        c = CounterMetricFamily(name, doc, labels=["worker"])
        c.add_metric([wid], v)
        yield c
    yield from _slo(r)
    cost = CounterMetricFamily("cplane_cost", "What requests cost at this worker's prices "
                               "(Final.usage.cost), by tenant.", labels=["worker", "tenant"])
    for tenant, spent in sorted(r.cost_by_tenant.items()):
        cost.add_metric([wid, tenant], spent)
    yield cost
    ev = CounterMetricFamily("cplane_worker_events", "Hand-offs (PD), hand-backs and "
                             "migrations, dead letters, engine faults, skipped redeliveries.",
                             labels=["worker", "event"])
    for name, n in sorted(r.events.items()):
        ev.add_metric([wid, name], n)
    yield ev
    yield from _load(r)


def _slo(r: WorkerReport) -> Iterator[Metric]:
    wid = r.worker_id
    fin = CounterMetricFamily("cplane_slo_requests", "Requests finished (stop/length), by SLO "
                              "class.", labels=["worker", "slo_class"])
    met = CounterMetricFamily("cplane_slo_met_requests", "Of those, within TTFT and TPOT "
                              "target (goodput, requests).", labels=["worker", "slo_class"])
    tok = CounterMetricFamily("cplane_slo_goodput_tokens", "Completion tokens of requests "
                              "within target (goodput, tokens).", labels=["worker", "slo_class"])
    att = GaugeMetricFamily("cplane_slo_attainment_ratio", "Met / finished since start, by "
                            "SLO class.", labels=["worker", "slo_class"])
    for s in r.slo:
        fin.add_metric([wid, s.slo_class], s.finished)
        met.add_metric([wid, s.slo_class], s.met)
        tok.add_metric([wid, s.slo_class], s.met_tokens)
        att.add_metric([wid, s.slo_class], s.met / s.finished if s.finished else 1.0)
    yield from (fin, met, tok, att)


def _load(r: WorkerReport) -> Iterator[Metric]:
    wid = r.worker_id
    yield _gauge("cplane_num_requests_running", "Sequences the engine runs now.",
                 r.running, wid)
    yield _gauge("cplane_num_requests_waiting", "Sequences waiting in the engine.",
                 r.waiting, wid)
    yield _gauge("cplane_kv_cache_usage_perc", "KV cache usage, 0..1.", r.kv_usage, wid)
    yield _gauge("cplane_prefix_cache_hit_rate", "Prefix cache hit rate, 0..1.",
                 r.prefix_hit_rate, wid)
    yield _gauge("cplane_worker_held_items", "Work items pulled, outcome not yet stored.",
                 r.held_items, wid)
    yield _gauge("cplane_worker_capacity", "Sequences it takes at once.", r.capacity, wid)
    yield _gauge("cplane_worker_prompt_tokens_per_second", "Prefill speed, recent.",
                 r.prompt_tokens_per_s, wid)
    yield _gauge("cplane_worker_generation_tokens_per_second", "Decode speed, recent.",
                 r.gen_tokens_per_s, wid)
    yield _gauge("cplane_worker_engine_errors_in_a_row", "The breaker: engine_error_limit "
                 "of these make the worker unhealthy.", r.engine_errors_in_a_row, wid)
    yield _gauge("cplane_worker_healthy", "1 when ready to take work.",
                 1.0 if r.state == "ready" else 0.0, wid)
    # Only where NVML sees a GPU: an absent GPU is no series, never a 0.
    if r.gpu_util is not None:
        yield _gauge("cplane_gpu_utilization", "GPU busy fraction (NVML), mean over the "
                     "worker's visible GPUs.", r.gpu_util, wid)
    if r.gpu_mem_used_bytes is not None and r.gpu_mem_total_bytes is not None:
        yield _gauge("cplane_gpu_memory_used_bytes", "GPU memory in use (NVML), summed over "
                     "the worker's visible GPUs.", r.gpu_mem_used_bytes, wid)
        yield _gauge("cplane_gpu_memory_total_bytes", "GPU memory (NVML), summed over the "
                     "worker's visible GPUs.", r.gpu_mem_total_bytes, wid)
    st = GaugeMetricFamily("cplane_worker_state", "1 for the state the worker is in.",
                           labels=["worker", "state"])
    for s in WORKER_STATES:
        st.add_metric([wid, s], 1.0 if r.state == s else 0.0)
    yield st
    info = GaugeMetricFamily("cplane_worker_info", "Role, engine and models of the worker.",
                             labels=["worker", "role", "engine", "model"])
    info.add_metric([wid, r.role, r.engine, ",".join(r.models)], 1.0)
    yield info


def fleet_families(reports: list[WorkerReport]) -> Iterator[Metric]:
    """The families of several workers in one process (a worker fronting many remote
    instances): each family once, with every worker's samples (all carry `worker`)."""
    merged: dict[str, Metric] = {}
    for r in reports:
        for fam in families(r):
            have = merged.get(fam.name)
            if have is None:
                merged[fam.name] = fam
            else:
                have.samples.extend(fam.samples)
    yield from merged.values()


def start_metrics_server(host: str, port: int,
                         snapshot: Callable[[], Awaitable[WorkerReport]],
                         not_ready: NotReady | None = None) -> WSGIServer:
    """Serve `/metrics`, `/healthz` and `/readyz` (`not_ready` says why not) on
    `host:port` (-1: any free port) in a daemon thread (bus/prom.py)."""
    return serve_metrics(host, port, snapshot, families, not_ready)


__all__ = ["GPU_FAMILIES", "HISTOGRAMS", "families", "fleet_families", "histogram",
           "start_metrics_server"]
