"""The Grafana dashboard of cplane, as data: `python deploy/grafana/dashboard.py` writes
deploy/grafana/cplane.json (import it in Grafana, data source: Prometheus).

Each panel lists its PromQL targets and, beside each, the same query in a
small form (`Q`) that bench/observability_demo.py evaluates on raw scrapes to
draw docs/observability-dashboard.png without a Prometheus or a Grafana.
Every metric family the services export appears in at least one panel
(tests/live/test_observability.py checks it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).with_name("cplane.json")
W = "[1m]"  # rate window of the panels


@dataclass(frozen=True)
class Q:
    """A query the demo renderer evaluates: `op` over metric `name`, summed by `by`.

    rate: per-second increase of a counter; gauge: its value (summed, or max over
    replicas); quantile: histogram_quantile(q) of a histogram's rate; ratio: rate
    of `name` over rate of `den`.
    """

    op: str
    name: str
    by: tuple[str, ...] = ()
    q: float = 0.0
    den: str = ""
    agg: str = "sum"
    match: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[tuple[str, str, Q], ...]  # (legend, PromQL, the same for the renderer)


def _rate(name: str, by: str = "") -> str:
    return f"sum by ({by}) (rate({name}{W}))" if by else f"sum(rate({name}{W}))"


def _quantiles(hist: str) -> tuple[tuple[str, str, Q], ...]:
    return tuple((f"p{int(q * 100)}",
                  f"histogram_quantile({q}, sum by (le) (rate({hist}_bucket{W})))",
                  Q("quantile", hist, q=q)) for q in (0.5, 0.9, 0.95, 0.99))


PANELS: tuple[Panel, ...] = (
    Panel("Requests finished by outcome", "reqps", (
        ("{{outcome}}", _rate("cplane_requests_total", "outcome"),
         Q("rate", "cplane_requests_total", ("outcome",))),)),
    Panel("Requests by priority", "reqps", (
        ("{{priority}}", _rate("cplane_requests_total", "priority"),
         Q("rate", "cplane_requests_total", ("priority",))),)),
    Panel("Requests by SLO class", "reqps", (
        ("{{slo_class}}", _rate("cplane_requests_total", "slo_class"),
         Q("rate", "cplane_requests_total", ("slo_class",))),)),
    Panel("Requests by tenant", "reqps", (
        ("{{tenant}}", _rate("cplane_requests_total", "tenant"),
         Q("rate", "cplane_requests_total", ("tenant",))),)),
    Panel("Queue depth (JetStream, LLM_REQ)", "short", (
        ("{{priority}} {{state}}", "max by (priority, state) (cplane_queue_depth)",
         Q("gauge", "cplane_queue_depth", ("priority", "state"), agg="max")),
        ("class {{slo_class}}", "max by (slo_class) (cplane_queue_messages)",
         Q("gauge", "cplane_queue_messages", ("slo_class",), agg="max")))),
    Panel("Time to first token", "s", _quantiles("cplane_time_to_first_token_seconds")),
    Panel("Time per output token", "s",
          _quantiles("cplane_request_time_per_output_token_seconds")),
    Panel("Inter-token latency", "s", _quantiles("cplane_inter_token_latency_seconds")),
    Panel("End-to-end latency", "s", _quantiles("cplane_e2e_request_latency_seconds")),
    Panel("Queue time", "s", _quantiles("cplane_request_queue_time_seconds")),
    Panel("SLO attainment by class", "percentunit", (
        ("{{slo_class}}", f"sum by (slo_class) (rate(cplane_slo_met_requests_total{W})) / "
         f"sum by (slo_class) (rate(cplane_slo_requests_total{W}))",
         Q("ratio", "cplane_slo_met_requests_total", ("slo_class",),
           den="cplane_slo_requests_total")),
        ("{{slo_class}} since start", "min by (slo_class) (cplane_slo_attainment_ratio)",
         Q("gauge", "cplane_slo_attainment_ratio", ("slo_class",), agg="min")))),
    Panel("Goodput by class (requests within SLO)", "reqps", (
        ("{{slo_class}}", _rate("cplane_slo_met_requests_total", "slo_class"),
         Q("rate", "cplane_slo_met_requests_total", ("slo_class",))),
        ("{{slo_class}} tokens/s", _rate("cplane_slo_goodput_tokens_total", "slo_class"),
         Q("rate", "cplane_slo_goodput_tokens_total", ("slo_class",))))),
    Panel("Tokens per second", "short", (
        ("prompt (in)", _rate("cplane_prompt_tokens_total"),
         Q("rate", "cplane_prompt_tokens_total")),
        ("generated (out)", _rate("cplane_generation_tokens_total"),
         Q("rate", "cplane_generation_tokens_total")))),
    Panel("PD decisions", "reqps", (
        ("{{decision}}", _rate("cplane_pd_decisions_total", "decision"),
         Q("rate", "cplane_pd_decisions_total", ("decision",))),)),
    Panel("Routing decisions", "reqps", (
        ("{{strategy}} {{role}} -> {{target}}",
         _rate("cplane_routing_decisions_total", "strategy, role, target"),
         Q("rate", "cplane_routing_decisions_total", ("strategy", "role", "target"))),)),
    Panel("Migrations, redeliveries, dead letters, shed", "short", (
        ("{{event}}", _rate("cplane_worker_events_total", "event"),
         Q("rate", "cplane_worker_events_total", ("event",))),
        ("redelivered", _rate("cplane_redeliveries_total"),
         Q("rate", "cplane_redeliveries_total")),
        ("dead letters", _rate("cplane_dead_letters_total"),
         Q("rate", "cplane_dead_letters_total")),
        ("shed", _rate("cplane_shed_requests_total"), Q("rate", "cplane_shed_requests_total")),
        ("rejected {{code}}", _rate("cplane_orchestrator_rejected_requests_total", "code"),
         Q("rate", "cplane_orchestrator_rejected_requests_total", ("code",))),
        ("worker errors {{code}}", _rate("cplane_request_errors_total", "code"),
         Q("rate", "cplane_request_errors_total", ("code",))))),
    Panel("Worker load: running / waiting", "short", (
        ("{{worker}} running", "sum by (worker) (cplane_num_requests_running)",
         Q("gauge", "cplane_num_requests_running", ("worker",))),
        ("{{worker}} waiting", "sum by (worker) (cplane_num_requests_waiting)",
         Q("gauge", "cplane_num_requests_waiting", ("worker",))),
        ("{{worker}} held", "sum by (worker) (cplane_worker_held_items)",
         Q("gauge", "cplane_worker_held_items", ("worker",))),
        ("{{worker}} capacity", "sum by (worker) (cplane_worker_capacity)",
         Q("gauge", "cplane_worker_capacity", ("worker",))))),
    Panel("KV cache usage and prefix hit rate", "percentunit", (
        ("{{worker}} KV", "max by (worker) (cplane_kv_cache_usage_perc)",
         Q("gauge", "cplane_kv_cache_usage_perc", ("worker",), agg="max")),
        ("{{worker}} prefix hits", "max by (worker) (cplane_prefix_cache_hit_rate)",
         Q("gauge", "cplane_prefix_cache_hit_rate", ("worker",), agg="max")))),
    Panel("GPU utilisation and memory used (NVML; in-process engines)", "percentunit", (
        ("{{worker}} busy", "max by (worker) (cplane_gpu_utilization)",
         Q("gauge", "cplane_gpu_utilization", ("worker",), agg="max")),
        ("{{worker}} memory", "max by (worker) (cplane_gpu_memory_used_bytes / "
         "cplane_gpu_memory_total_bytes)",
         Q("gauge", "cplane_gpu_memory_used_bytes", ("worker",), agg="max")))),
    Panel("Worker speed (tokens/s, engine)", "short", (
        ("{{worker}} gen", "sum by (worker) (cplane_worker_generation_tokens_per_second)",
         Q("gauge", "cplane_worker_generation_tokens_per_second", ("worker",))),
        ("{{worker}} prompt", "sum by (worker) (cplane_worker_prompt_tokens_per_second)",
         Q("gauge", "cplane_worker_prompt_tokens_per_second", ("worker",))))),
    Panel("Health and breaker", "short", (
        ("{{worker}} healthy", "max by (worker) (cplane_worker_healthy)",
         Q("gauge", "cplane_worker_healthy", ("worker",), agg="max")),
        ("{{worker}} engine errors in a row",
         "max by (worker) (cplane_worker_engine_errors_in_a_row)",
         Q("gauge", "cplane_worker_engine_errors_in_a_row", ("worker",), agg="max")),
        ("{{worker}} {{state}}", "max by (worker, state) (cplane_worker_state) > 0",
         Q("gauge", "cplane_worker_state", ("worker", "state"), agg="max",
           match=(("state", "ready"),))),
        ("{{role}} {{engine}} {{model}}", "count by (role, engine, model) (cplane_worker_info)",
         Q("gauge", "cplane_worker_info", ("role", "engine", "model"))))),
    Panel("Cost by tenant (per second)", "short", (
        ("{{tenant}}", _rate("cplane_cost_total", "tenant"),
         Q("rate", "cplane_cost_total", ("tenant",))),)),
    Panel("Orchestrators: held, in flight, leader, workers", "short", (
        ("{{orchestrator}} held", "sum by (orchestrator) (cplane_orchestrator_held_requests)",
         Q("gauge", "cplane_orchestrator_held_requests", ("orchestrator",))),
        ("{{orchestrator}} in flight", "sum by (orchestrator) "
         "(cplane_orchestrator_in_flight_requests)",
         Q("gauge", "cplane_orchestrator_in_flight_requests", ("orchestrator",))),
        ("{{orchestrator}} leader", "max by (orchestrator) (cplane_orchestrator_leader)",
         Q("gauge", "cplane_orchestrator_leader", ("orchestrator",), agg="max")),
        ("workers {{state}}", "max by (state) (cplane_orchestrator_workers)",
         Q("gauge", "cplane_orchestrator_workers", ("state",), agg="max")),
        ("policy {{policy}} / {{router}} / pd {{pd_mode}}",
         "max by (policy, router, pd_mode) (cplane_orchestrator_info)",
         Q("gauge", "cplane_orchestrator_info", ("policy", "router", "pd_mode"), agg="max")))),
    Panel("Orchestrator: accepted by priority, events", "reqps", (
        ("accepted {{priority}}",
         _rate("cplane_orchestrator_accepted_requests_total", "priority"),
         Q("rate", "cplane_orchestrator_accepted_requests_total", ("priority",))),
        ("{{event}}", _rate("cplane_orchestrator_events_total", "event"),
         Q("rate", "cplane_orchestrator_events_total", ("event",),
           match=(("event", "batches"),))))),
    Panel("LLM_DONE's copy of LLM_OUT: behind (terminals), out of contact (s)", "short", (
        ("terminals not copied", "max (cplane_done_copy_lag_messages)",
         Q("gauge", "cplane_done_copy_lag_messages", (), agg="max")),
        ("seconds since contact", "max (cplane_done_copy_idle_seconds)",
         Q("gauge", "cplane_done_copy_idle_seconds", (), agg="max")))),
)


def families() -> set[str]:
    """Every metric family the panels read (names as exported, without suffixes)."""
    out: set[str] = set()
    for p in PANELS:
        for _, _, q in p.targets:
            out.add(q.name)
            if q.den:
                out.add(q.den)
    return out


def build() -> dict[str, object]:
    """The dashboard JSON (Grafana schema 39), two panels a row."""
    panels: list[dict[str, object]] = []
    for i, p in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": p.title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}},
            "targets": [{"refId": chr(65 + j), "expr": expr, "legendFormat": legend}
                        for j, (legend, expr, _) in enumerate(p.targets)],
        })
    return {
        "title": "cplane", "uid": "cplane-overview", "schemaVersion": 39, "version": 1,
        "tags": ["cplane", "llm", "nats"], "timezone": "browser", "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource",
                                 "query": "prometheus", "label": "Prometheus"}]},
        "panels": panels,
    }


def main() -> int:
    OUT.write_text(json.dumps(build(), indent=2) + "\n", encoding="utf-8")
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
