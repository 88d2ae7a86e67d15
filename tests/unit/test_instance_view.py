"""The instance view (client/aggregate.py): health and its reason, load, latency from
the report, GPU fields absent (None) or present, the join of heartbeats and reports,
and the worker's own report judged by the same functions."""

from __future__ import annotations

import math

import msgspec
import pytest

from cplane.client.aggregate import (
    health,
    instance_view,
    instance_views,
    latency,
    load_of,
    report_view,
)
from cplane.schemas.control import HistogramData, WorkerReport
from cplane.schemas.messages import (
    Final,
    FinishReason,
    Heartbeat,
    Priority,
    Request,
    Role,
    Timings,
    Usage,
    WorkerState,
    WorkItem,
)
from cplane.schemas.settings import load_settings
from cplane.workers.stats import WorkerStats

GIB = 1 << 30


def hb(worker_id: str = "w0", **kw: object) -> Heartbeat:
    base: dict[str, object] = dict(worker_id=worker_id, role=Role.DECODE, models=["m"],
                                   engine="vllm", capacity=8, held_items=6, running=4,
                                   waiting=2, kv_usage=0.5, prefix_hit_rate=0.25,
                                   ttft_ms_avg=120.0, tpot_ms_avg=15.0, served=40, faults=1,
                                   started_ms=1000.0, ts_ms=2000.0)
    return Heartbeat(**{**base, **kw})  # type: ignore[arg-type]


def report(worker_id: str = "w0", e2e_ms: list[float] | None = None,
           **kw: object) -> WorkerReport:
    samples = e2e_ms if e2e_ms is not None else [10.0 * i for i in range(1, 21)]
    h = HistogramData(bounds=[1.0], counts=[len(samples), 0], sum=sum(samples) / 1000,
                      count=len(samples))
    base: dict[str, object] = dict(worker_id=worker_id, role="decode", state="ready",
                                   engine="vllm", models=["m"], capacity=8, held_items=6,
                                   running=4, waiting=2, e2e=h, recent={"e2e": samples})
    return WorkerReport(**{**base, **kw})  # type: ignore[arg-type]


def test_health_needs_ready_and_a_fresh_heartbeat() -> None:
    assert health(hb(), 0.5, 3.5) == (True, "")
    assert health(hb(), 7.4, 3.5) == (False, "no heartbeat for 7 s")
    for state in (WorkerState.DRAINING, WorkerState.UNHEALTHY, WorkerState.STOPPED):
        assert health(hb(state=state), 0.0, 3.5) == (False, f"state {state.value}")
    assert health(report(state="draining"), 0.0, math.inf) == (False, "state draining")


def test_load_is_held_over_capacity() -> None:
    assert load_of(6, 8) == 0.75 and load_of(0, 8) == 0.0
    assert load_of(3, 0) == 0.0  # no capacity reported: no load to speak of


def test_a_view_from_a_heartbeat_alone() -> None:
    v = instance_view(hb(), age_s=0.4, timeout_s=3.5)
    assert (v.instance_id, v.role, v.models, v.engine, v.state) == (
        "w0", "decode", ["m"], "vllm", "ready")
    assert v.healthy and v.health_reason == ""
    assert (v.active_requests, v.queued, v.held, v.capacity, v.load) == (4, 2, 6, 8, 0.75)
    assert (v.ttft_ms_avg, v.tpot_ms_avg, v.kv_usage, v.prefix_hit_rate) == (
        120.0, 15.0, 0.5, 0.25)
    assert (v.served, v.faults, v.started_ms, v.ts_ms) == (40, 1, 1000.0, 2000.0)
    assert (v.latency_avg_ms, v.latency_p95_ms) == (0.0, 0.0)  # no report: not known
    assert v.gpu_util is None and v.gpu_mem_used_bytes is None and v.gpu_mem_total_bytes is None
    stale = instance_view(hb(), age_s=9.0, timeout_s=3.5)
    assert not stale.healthy and stale.health_reason == "no heartbeat for 9 s"


def test_latency_comes_from_the_report_as_get_metrics_folds_it() -> None:
    samples = [10.0 * i for i in range(1, 21)]  # 10 .. 200 ms
    v = instance_view(hb(), report(e2e_ms=samples))
    assert v.latency_avg_ms == pytest.approx(105.0)  # the histogram's sum / count
    assert v.latency_p95_ms == 190.0  # nearest rank: the 19th of 20
    summary = latency(report(e2e_ms=samples).e2e, samples)
    assert (v.latency_avg_ms, v.latency_p95_ms) == (summary.mean_ms, summary.p95_ms)


def test_gpu_fields_pass_through_and_zero_is_not_absent() -> None:
    v = instance_view(hb(gpu_util=0.0, gpu_mem_used_bytes=0, gpu_mem_total_bytes=80 * GIB))
    assert (v.gpu_util, v.gpu_mem_used_bytes, v.gpu_mem_total_bytes) == (0.0, 0, 80 * GIB)
    wire = msgspec.json.decode(msgspec.json.encode(instance_view(hb())))
    assert wire["gpu_util"] is None and wire["gpu_mem_total_bytes"] is None  # null, not 0


def test_heartbeats_and_reports_join_by_id() -> None:
    beats = {"w1": (hb("w1"), 0.2), "w0": (hb("w0", state=WorkerState.DRAINING), 0.1)}
    reports = [report("w0"), report("w2", state="unhealthy")]
    views = instance_views(beats, reports, timeout_s=3.5)
    assert [v.instance_id for v in views] == ["w0", "w1", "w2"]
    w0, w1, w2 = views
    assert w0.health_reason == "state draining" and w0.latency_p95_ms == 190.0
    assert w1.healthy and w1.latency_avg_ms == 0.0  # no report from it
    assert not w2.healthy and w2.health_reason == "state unhealthy"  # only its report
    assert w2 == report_view(reports[1])


def _item() -> WorkItem:
    return WorkItem(request=Request(request_id="r", prompt="x"), priority=Priority.NORMAL,
                    slo_class="standard")


def test_the_workers_own_report_carries_the_view() -> None:
    stats = WorkerStats("w0", load_settings(env={}))
    for e2e in (100.0, 200.0, 300.0):
        stats.finished(_item(), Final(request_id="r", finish_reason=FinishReason.LENGTH,
                                      usage=Usage(completion_tokens=4),
                                      timings=Timings(ttft_ms=10.0, tpot_ms=5.0, e2e_ms=e2e)))
    beat = hb(gpu_util=0.9, gpu_mem_used_bytes=70 * GIB, gpu_mem_total_bytes=80 * GIB)
    r = stats.report(beat, {})
    assert r.healthy and r.health_reason == "" and r.load == 0.75
    assert r.latency_avg_ms == pytest.approx(200.0) and r.latency_p95_ms == 300.0
    assert (r.ttft_ms_avg, r.tpot_ms_avg, r.served, r.faults) == (120.0, 15.0, 40, 1)
    assert (r.gpu_util, r.gpu_mem_used_bytes, r.gpu_mem_total_bytes) == (
        0.9, 70 * GIB, 80 * GIB)
    v = instance_view(beat, r)
    assert (v.latency_avg_ms, v.latency_p95_ms, v.load, v.healthy) == (
        r.latency_avg_ms, r.latency_p95_ms, r.load, r.healthy)
    unhealthy = stats.report(hb(state=WorkerState.UNHEALTHY), {})
    assert not unhealthy.healthy and unhealthy.health_reason == "state unhealthy"
    bare = stats.report(None, {})
    assert not bare.healthy and bare.gpu_util is None
    wire = msgspec.json.decode(msgspec.json.encode(stats.report(hb(), {})))
    assert not any(k.startswith("gpu_") for k in wire)  # no GPU: not on the wire
