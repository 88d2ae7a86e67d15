"""Observability: the control API (client/control.py), /metrics of orchestrators and
workers, the CLI, on a real nats-server with sim workers; the pure folding and
counting with plain asserts."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import urllib.request
from collections.abc import Iterable

import msgspec
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cplane.client.aggregate import (
    histogram_quantile,
    merge_histograms,
    merge_status,
    percentile,
    summarize,
)
from cplane.client.control import ControlPlane, NotFound
from cplane.client.sdk import Client, new_request_id
from cplane.schemas import trace
from cplane.schemas.control import RequestPhase, RequestStatus
from cplane.schemas.messages import (
    ErrorCode,
    Final,
    FinishReason,
    Priority,
    Request,
    Timings,
    Usage,
    WorkItem,
)
from cplane.schemas.settings import Settings, load_settings
from cplane.workers.metrics import GPU_FAMILIES
from cplane.workers.runs import RunState
from cplane.workers.stats import OTHER, Histogram, RateBuckets, WorkerStats, capped
from tests.natsfix import isolated_settings
from tests.stack import Running, stack, start_replicas, start_worker
from tests.waiting import until

# -- pure --------------------------------------------------------------------------------


def test_histogram_buckets_and_quantile() -> None:
    h = Histogram((0.1, 0.2, 0.5))
    for v in (0.05, 0.1, 0.15, 0.3, 0.9):
        h.observe(v)
    h.observe(0.15, 3)  # one chunk of three tokens
    d = h.data()
    assert d.counts == [2, 4, 1, 1] and d.count == 8
    assert d.sum == pytest.approx(0.05 + 0.1 + 0.15 * 4 + 0.3 + 0.9)
    assert histogram_quantile(d, 0.5) == pytest.approx(0.1 + 0.1 * (4 - 2) / 4)
    merged = merge_histograms([d, None, d])
    assert merged is not None and merged.count == 16 and merged.counts == [4, 8, 2, 2]


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile([], 50) == 0.0 and percentile([7.0], 99) == 7.0


def test_labels_are_capped() -> None:
    seen: set[str] = set()
    assert [capped(t, seen, 2) for t in ("a", "b", "c", "a")] == ["a", "b", OTHER, "a"]


def test_rates_cover_the_last_minute_only() -> None:
    r = RateBuckets(window_s=60)
    r.add(1000.2, 10, 5)
    r.add(1000.7, 10, 5)
    r.add(1100.0, 1, 2)
    w = r.window(1100.5)
    assert (w.requests, w.prompt_tokens, w.completion_tokens) == (1, 1, 2)


def _item(slo: str = "interactive", tenant: str = "t", **req: object) -> WorkItem:
    return WorkItem(request=Request(request_id=new_request_id(), prompt="x", tenant=tenant,
                                    **req),  # type: ignore[arg-type]
                    priority=Priority.HIGH, slo_class=slo)


def _final(item: WorkItem, ttft: float, tpot: float, tokens: int = 10,
           reason: FinishReason = FinishReason.LENGTH) -> Final:
    return Final(request_id=item.request.request_id, finish_reason=reason,
                 usage=Usage(prompt_tokens=3, completion_tokens=tokens, cost=0.5),
                 timings=Timings(queue_ms=1.0, ttft_ms=ttft, tpot_ms=tpot, e2e_ms=ttft + 50))


def test_worker_stats_count_outcomes_and_slo() -> None:
    settings = load_settings(env={})
    s = WorkerStats("w", settings)  # interactive: ttft 250 ms, tpot 100 ms
    ok, late, own = _item(), _item(), _item(ttft_target_ms=100.0)
    s.finished(ok, _final(ok, 100.0, 20.0))
    s.finished(late, _final(late, 300.0, 20.0))
    s.finished(own, _final(own, 150.0, 20.0))  # its own target (100 ms) is missed
    cancelled = _item()
    s.finished(cancelled, _final(cancelled, 0.0, 0.0, 0, FinishReason.CANCELLED))
    s.failed(_item(slo="no-such-class"), ErrorCode.ENGINE_ERROR)
    r = s.report(None, {"handoffs": 2})
    counts = {(o.outcome, o.slo_class): o.count for o in r.outcomes}
    assert counts == {("length", "interactive"): 3, ("cancelled", "interactive"): 1,
                      ("error", "standard"): 1}  # an unknown class counts as the default
    assert [(x.slo_class, x.finished, x.met, x.met_tokens) for x in r.slo] == [
        ("interactive", 3, 1, 10)]
    assert r.ttft is not None and r.ttft.count == 3
    assert r.ttft.sum == pytest.approx(0.55)
    assert r.prompt_tokens == 9 and r.completion_tokens == 30 and r.errors == {"engine_error": 1}
    assert r.cost_by_tenant == {"t": pytest.approx(1.5)} and r.events == {"handoffs": 2}
    summary = summarize([], [r])
    assert (summary.completed, summary.cancelled, summary.failed, summary.total) == (3, 1, 1, 5)
    assert summary.slo_violations == 2 and summary.slo_compliance == pytest.approx(1 / 3)
    assert summary.ttft.mean_ms == pytest.approx(550 / 3)
    assert summary.ttft.p50_ms == 150.0


def test_live_items_have_a_phase() -> None:
    s = WorkerStats("w", load_settings(env={}))
    item = _item()
    run = s.runs.add(item)
    rid = item.request.request_id
    s.runs.begin(run)
    assert s.request_status(rid) is None  # checking, not on the engine yet
    run.running = item
    s.runs.transition(run, RunState.RUNNING)
    s.begin(run, item)
    st = s.request_status(rid)
    assert st is not None and st.phase is RequestPhase.PREFILL
    s.tokens(run, 1)
    s.tokens(run, 4)
    st = s.request_status(rid)
    assert st is not None and st.phase is RequestPhase.DECODING and st.tokens == 5
    assert s.itl.count == 4  # four gaps after the first token
    s.runs.transition(run, RunState.STORING)
    assert s.request_status(rid) is not None  # until its terminal is stored
    s.runs.finish(run, stored=True)
    assert s.request_status(rid) is None and s.runs.held == 0


def test_merge_status_takes_the_most_advanced() -> None:
    orch = RequestStatus(request_id="r", phase=RequestPhase.DISPATCHED, source="orchestrator:o",
                         queued_ms=5.0, dispatched_ms=6.0, orchestrator_id="o")
    work = RequestStatus(request_id="r", phase=RequestPhase.DECODING, source="worker:w",
                         started_ms=7.0, worker_id="w")
    gone = RequestStatus(request_id="r", phase=RequestPhase.NOT_FOUND, source="orchestrator:p")
    m = merge_status("r", [gone, orch, work])
    assert m.phase is RequestPhase.DECODING and m.worker_id == "w"
    assert (m.queued_ms, m.dispatched_ms, m.orchestrator_id) == (5.0, 6.0, "o")
    assert merge_status("r", [gone]).phase is RequestPhase.NOT_FOUND
    assert merge_status("r", []).phase is RequestPhase.NOT_FOUND


# -- on a real nats-server ---------------------------------------------------------------


def _metered(url: str, **sections: dict[str, object]) -> Settings:
    settings = isolated_settings(url, **sections)
    return msgspec.structs.replace(settings, metrics=msgspec.structs.replace(
        settings.metrics, orchestrator_port=-1, worker_port=-1))


async def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name -> [(labels, value)] of every sample; read in a thread (the collector asks
    the event loop this test runs on)."""
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    text = await asyncio.to_thread(get)
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
           **match: Iterable[str]) -> float:
    return sum(v for labels, v in samples.get(name, [])
               if all(labels.get(k) in allowed for k, allowed in match.items()))


def _ports(run: Running) -> tuple[int, list[int]]:
    assert run.orchestrator is not None
    return (run.orchestrator.control.metrics_port,
            [w.control.metrics_port for w in run.workers])


async def _workload(settings: Settings, n: int) -> list[Final]:
    client = await Client.connect(settings.nats.url, settings)
    try:
        prios = list(Priority)
        reqs = [(Request(request_id=new_request_id(), prompt=f"count {i} " * (1 + i % 7),
                         max_tokens=4 + i % 9, ignore_eos=True, tenant=f"t{i % 3}"),
                 prios[i % 5], ("interactive", "standard", "batch")[i % 3])
                for i in range(n)]
        return list(await asyncio.gather(*(client.generate(r, priority=p, slo_class=c,
                                                           timeout=60)
                                           for r, p, c in reqs)))
    finally:
        await client.close()


async def test_metrics_agree_with_what_the_client_saw(nats_url: str) -> None:
    settings = _metered(nats_url)
    async with stack(settings, workers=2) as run:
        finals = await _workload(settings, 30)
        assert len(finals) == 30
        async with await ControlPlane.connect(nats_url, settings, quiet_s=0.15) as cp:
            async def all_counted() -> bool:
                return (await cp.get_metrics()).completed == 30

            await until(all_counted, 15, "30 completions counted")
            m = await cp.get_metrics()
        assert (m.total, m.completed, m.failed, m.cancelled, m.rejected) == (30, 30, 0, 0, 0)
        assert (m.accepted, m.dispatched, m.orchestrators, m.workers) == (30, 30, 1, 2)
        assert m.completion_tokens == sum(f.usage.completion_tokens for f in finals)
        assert m.prompt_tokens == sum(f.usage.prompt_tokens for f in finals)
        ttft = [f.timings.ttft_ms for f in finals]
        e2e = [f.timings.e2e_ms for f in finals]
        assert m.ttft.count == 30 and m.ttft.mean_ms == pytest.approx(statistics.fmean(ttft))
        assert m.e2e.mean_ms == pytest.approx(statistics.fmean(e2e))
        assert m.ttft.p50_ms == percentile(ttft, 50) and m.e2e.p99_ms == percentile(e2e, 99)
        assert m.ttft.p95_ms == percentile(ttft, 95) and m.e2e.p95_ms == percentile(e2e, 95)
        assert m.tpot.mean_ms == pytest.approx(statistics.fmean(
            f.timings.tpot_ms for f in finals if f.usage.completion_tokens > 1))
        assert m.itl.count == sum(f.usage.completion_tokens - 1 for f in finals)
        assert m.requests_per_s > 0 and m.completion_tokens_per_s > 0
        assert sum(s.finished for s in m.slo) == 30 and 0.0 <= m.slo_compliance <= 1.0
        assert (m.active, m.queued) == (0, 0)

        orch_port, worker_ports = _ports(run)
        assert orch_port and all(worker_ports)
        scraped = [await _scrape(p) for p in worker_ports]
        done = sum(_total(s, "cplane_requests_total", outcome=("stop", "length"))
                   for s in scraped)
        assert done == 30
        for name, field in (("cplane_time_to_first_token_seconds", "ttft_ms"),
                            ("cplane_e2e_request_latency_seconds", "e2e_ms"),
                            ("cplane_request_queue_time_seconds", "queue_ms")):
            assert sum(_total(s, f"{name}_count") for s in scraped) == 30, name
            assert sum(_total(s, f"{name}_sum") for s in scraped) * 1000 == pytest.approx(
                sum(getattr(f.timings, field) for f in finals)), name
        assert sum(_total(s, "cplane_inter_token_latency_seconds_count")
                   for s in scraped) == m.itl.count
        assert sum(_total(s, "cplane_generation_tokens_total") for s in scraped) == (
            m.completion_tokens)
        by_tenant = {t: sum(_total(s, "cplane_requests_total", tenant=(t,)) for s in scraped)
                     for t in ("t0", "t1", "t2")}
        assert by_tenant == {"t0": 10, "t1": 10, "t2": 10}
        orch = await _scrape(orch_port)
        assert _total(orch, "cplane_orchestrator_accepted_requests_total") == 30
        assert _total(orch, "cplane_routing_decisions_total") == 30
        assert _total(orch, "cplane_pd_decisions_total", decision=("unified",)) == 30
        assert _total(orch, "cplane_orchestrator_leader") == 1
        assert len(orch["cplane_queue_depth"]) == 10  # five priorities x pending/held
        # LLM_DONE's source copies every terminal the 30 requests stored in LLM_OUT

        async def copied() -> bool:
            now = await _scrape(orch_port)
            return (_total(now, "cplane_done_copy_lag_messages") == 0
                    and 0 <= _total(now, "cplane_done_copy_idle_seconds") < 5)

        await until(copied, 10, "LLM_DONE's copy of LLM_OUT caught up (the gauges)")


async def test_every_family_is_exported(nats_url: str) -> None:
    """One family per thing the issue names; a missing one fails by name."""
    settings = _metered(nats_url)
    async with stack(settings, workers=1) as run:
        await _workload(settings, 3)
        orch_port, (worker_port,) = _ports(run)
        names = {n.removesuffix("_bucket") for n in (await _scrape(worker_port))}
        names |= set(await _scrape(orch_port))
    for family in (
            "cplane_requests_total", "cplane_time_to_first_token_seconds",
            "cplane_request_time_per_output_token_seconds", "cplane_inter_token_latency_seconds",
            "cplane_e2e_request_latency_seconds", "cplane_request_queue_time_seconds",
            "cplane_slo_attainment_ratio", "cplane_slo_met_requests_total",
            "cplane_slo_goodput_tokens_total", "cplane_prompt_tokens_total",
            "cplane_generation_tokens_total", "cplane_pd_decisions_total",
            "cplane_routing_decisions_total", "cplane_worker_events_total",
            "cplane_dead_letters_total", "cplane_redeliveries_total", "cplane_shed_requests_total",
            "cplane_num_requests_running", "cplane_num_requests_waiting",
            "cplane_kv_cache_usage_perc", "cplane_prefix_cache_hit_rate", "cplane_worker_healthy",
            "cplane_worker_state", "cplane_worker_engine_errors_in_a_row", "cplane_cost_total",
            "cplane_queue_depth", "cplane_orchestrator_accepted_requests_total"):
        assert family in names, family


async def test_request_status_walks_through_its_phases(nats_url: str) -> None:
    """queued (no worker yet) -> dispatched (waiting in LLM_WORK behind a longer
    request) -> prefill/decoding -> completed, each answered by who holds it."""
    settings = isolated_settings(
        nats_url, orchestrator={"headroom": 1.0, "max_batch": 1},
        sim={"prefill_a_ms": 150.0, "decode_a_ms": 40.0})
    async with stack(settings, workers=0) as run:
        client = await Client.connect(nats_url, settings)
        cp = await ControlPlane.connect(nats_url, settings, quiet_s=0.1)
        try:
            first = Request(request_id=new_request_id(), prompt="long", max_tokens=30,
                            ignore_eos=True)
            second = Request(request_id=new_request_id(), prompt="watched", max_tokens=20,
                             ignore_eos=True)
            h1 = await client.submit(first, priority=Priority.HIGH)
            h2 = await client.submit(second, priority=Priority.LOW)
            seen: list[RequestPhase] = []

            async def phase_is(*phases: RequestPhase) -> bool:
                st = await cp.get_request_status(second.request_id)
                if not seen or seen[-1] is not st.phase:
                    seen.append(st.phase)
                return st.phase in phases

            await until(lambda: phase_is(RequestPhase.QUEUED), 10, "queued")
            queued = await cp.get_request_status(second.request_id)
            assert queued.queued_ms > 0 and queued.source.startswith("orchestrator:")
            await start_worker(settings, run, worker_id="w-slow", capacity=1)
            await until(lambda: phase_is(RequestPhase.DECODING, RequestPhase.COMPLETED), 20,
                        "decoding")
            await h1.result(30)
            final = await h2.result(30)
            await until(lambda: phase_is(RequestPhase.COMPLETED), 10, "completed")
            done = await cp.get_request_status(second.request_id)
        finally:
            await cp.close()
            await client.close()
    # Stored in LLM_REQ but not pulled yet, it has no holder: not_found for a moment.
    while seen and seen[0] is RequestPhase.NOT_FOUND:
        seen.pop(0)
    ranks = [p.rank for p in seen]
    assert ranks == sorted(ranks), seen  # never backwards
    assert seen[0] is RequestPhase.QUEUED and seen[-1] is RequestPhase.COMPLETED, seen
    assert RequestPhase.DISPATCHED in seen and RequestPhase.DECODING in seen, seen
    assert done.source == "LLM_DONE" and done.worker_id == "w-slow"
    assert done.tokens == final.usage.completion_tokens == 20
    assert done.queued_ms <= done.dispatched_ms <= done.first_token_ms <= done.finished_ms


async def test_unknown_request_and_worker_are_not_found(nats_url: str) -> None:
    settings = isolated_settings(nats_url)
    async with stack(settings, workers=1):
        async with await ControlPlane.connect(nats_url, settings, quiet_s=0.1) as cp:
            st = await cp.get_request_status("no-such-request")
            assert st.phase is RequestPhase.NOT_FOUND
            res = await cp.cancel_request("no-such-request")
            assert not res.found and not res.sent
            with pytest.raises(NotFound):
                await cp.get_instance_metrics("no-such-worker")
            w = await cp.get_instance_metrics("w0")
            assert w.worker_id == "w0" and w.state == "ready"
            (hb,) = await cp.get_instances()
            assert hb.worker_id == "w0"
        env = {**os.environ, "CPLANE__NATS__PREFIX": settings.nats.prefix}
        for args, code in ((["request", "no-such-request"], 1), (["status"], 0),
                           (["metrics"], 0), (["cancel", "no-such-request"], 1)):
            proc = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "cplane.cli", *args, "--nats-url",
                                 nats_url], env=env, capture_output=True, text=True, timeout=60)
            assert proc.returncode == code, (args, proc.stdout, proc.stderr)
            if args[0] in ("request", "cancel"):
                assert "not found" in (proc.stdout + proc.stderr).lower()
            if args[0] == "status":
                assert "w0" in proc.stdout and "leader" in proc.stdout.lower()


async def test_cancel_request_cancels(nats_url: str) -> None:
    settings = isolated_settings(nats_url, sim={"decode_a_ms": 30.0})
    async with stack(settings, workers=1):
        client = await Client.connect(nats_url, settings)
        try:
            async with await ControlPlane.connect(nats_url, settings, quiet_s=0.1) as cp:
                req = Request(request_id=new_request_id(), prompt="stop me", max_tokens=500,
                              ignore_eos=True)
                handle = await client.submit(req)

                async def decoding() -> bool:
                    st = await cp.get_request_status(req.request_id)
                    return st.phase is RequestPhase.DECODING

                await until(decoding, 15, "decoding")
                res = await cp.cancel_request(req.request_id)
                assert res.found and res.sent and res.phase is RequestPhase.DECODING
                final = await handle.result(30)
                assert final.finish_reason is FinishReason.CANCELLED
                assert final.usage.completion_tokens < 500

                async def cancelled() -> bool:
                    st = await cp.get_request_status(req.request_id)
                    return st.phase is RequestPhase.CANCELLED

                await until(cancelled, 10, "cancelled status")
                again = await cp.cancel_request(req.request_id)
                assert again.found and not again.sent
                assert (await cp.get_metrics()).cancelled == 1
        finally:
            await client.close()


async def test_two_replicas_answer_and_aggregate(nats_url: str) -> None:
    settings = isolated_settings(nats_url)
    conns = [await nats.connect(nats_url) for _ in range(2)]
    run = Running(orchestrator=None, workers=[])
    try:
        await start_worker(settings, run, worker_id="w0")
        orchs = await start_replicas(settings, run, conns)
        finals = await _workload(settings, 12)
        async with await ControlPlane.connect(nats_url, settings, quiet_s=0.15) as cp:
            status = await cp.get_status()
            assert {o.orchestrator_id for o in status.orchestrators} == {o.id for o in orchs}
            leader = next(o for o in orchs if o.leading)
            assert status.leader == leader.id and status.orchestrators[0].leading
            assert [hb.worker_id for hb in status.instances] == ["w0"]
            assert len(status.queue) == 5

            async def counted() -> bool:
                return (await cp.get_metrics()).completed == len(finals)

            await until(counted, 15, "completions counted")
            m = await cp.get_metrics()
            assert (m.orchestrators, m.leader, m.accepted, m.total) == (2, leader.id, 12, 12)
            st = await cp.get_request_status(finals[0].request_id, tenant="t0")
            assert st.phase is RequestPhase.COMPLETED
    finally:
        for stop in run.stops.values():
            stop.set()
        await asyncio.gather(*run.tasks.values(), return_exceptions=True)
        for w in run.workers:
            await w.engine.shutdown()  # type: ignore[attr-defined]
        for c in conns:
            await c.close()


def test_traceparent_format() -> None:
    tp = trace.new()
    parts = trace.parse(tp)
    assert parts is not None and len(parts[0]) == 32 and parts[2] == "01"
    kid = trace.child(tp)
    assert trace.trace_id(kid) == parts[0] and kid != tp
    assert trace.parse("00-" + "0" * 32 + "-" + "1" * 16 + "-01") is None
    assert trace.parse("garbage") is None and trace.trace_id(trace.child("garbage"))


async def test_traceparent_travels_to_the_worker_and_back(nats_url: str) -> None:
    """Client header -> orchestrator -> WorkItem -> worker span (OpenTelemetry) -> the
    terminal's header: one trace id end to end, the worker's span a child of ours."""
    from opentelemetry import trace as otel
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = otel.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        otel.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = isolated_settings(nats_url)
    async with stack(settings, workers=1):
        client = await Client.connect(nats_url, settings)
        try:
            sent = trace.new()
            handle = await client.submit(Request(request_id=new_request_id(), prompt="trace me",
                                                 max_tokens=3), traceparent=sent)
            await handle.result(30)
            auto = await client.submit(Request(request_id=new_request_id(), prompt="no trace",
                                               max_tokens=3))
            await auto.result(30)
        finally:
            await client.close()
    assert handle.traceparent == sent
    back = trace.parse(handle.worker_traceparent)
    assert back is not None and back[0] == trace.trace_id(sent)
    spans = [s for s in exporter.get_finished_spans()
             if s.attributes and s.attributes.get("request_id") == handle.request_id]
    assert len(spans) == 1 and spans[0].name == "cplane.worker.generate"
    ctx, parent = spans[0].get_span_context(), spans[0].parent
    assert parent is not None and f"{parent.span_id:016x}" == trace.parse(sent)[1]  # type: ignore[index]
    assert f"{ctx.span_id:016x}" == back[1]  # the terminal names the worker's span
    assert trace.parse(auto.traceparent) and (
        trace.trace_id(auto.worker_traceparent) == trace.trace_id(auto.traceparent))


def _dashboard() -> object:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboard.py"
    spec = importlib.util.spec_from_file_location("cplane_dashboard", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cplane_dashboard"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dashboard_is_committed() -> None:
    import json

    dash = _dashboard()
    committed = json.loads(dash.OUT.read_text())  # type: ignore[attr-defined]
    assert committed == json.loads(json.dumps(dash.build())), (  # type: ignore[attr-defined]
        "deploy/grafana/cplane.json is stale: run python deploy/grafana/dashboard.py")
    assert "panels" in committed and len(committed["panels"]) >= 20


async def test_dashboard_families_are_exported(nats_url: str) -> None:
    """Both ways: every family the services export is on the dashboard, and every
    family the dashboard reads is exported."""
    dash = _dashboard()
    settings = _metered(nats_url)
    async with stack(settings, workers=1) as run:
        await _workload(settings, 2)
        orch_port, (worker_port,) = _ports(run)
        exported: set[str] = set()
        for port in (orch_port, worker_port):
            text = await asyncio.to_thread(lambda p=port: urllib.request.urlopen(
                f"http://127.0.0.1:{p}/metrics", timeout=10).read().decode())
            exported |= {f.name + ("_total" if f.type == "counter" else "")
                         for f in text_string_to_metric_families(text)}
    shown = dash.families()  # type: ignore[attr-defined]
    assert exported - shown == set(), "not on the dashboard"
    # GPU gauges exist only where NVML reads a GPU (tests/unit/test_worker_families.py).
    assert shown - exported - GPU_FAMILIES == set(), "on the dashboard, not exported"
