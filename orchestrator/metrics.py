"""The orchestrator's Prometheus `/metrics`: its one module that imports prometheus_client.

It exports an `OrchestratorReport` (orchestrator/control.py builds it from the
plain `OrchestratorStats`, the ledger and JetStream's consumer state); nothing
here counts. Every scrape builds a fresh report on the orchestrator's event
loop, so the queue depth is JetStream's at scrape time, never a guess.
Request outcomes and latency histograms are the workers' (workers/metrics.py):
the orchestrator does not decode Finals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cplane.bus.prom import NotReady, serve_metrics
from cplane.schemas.control import OrchestratorReport

SHED_CODE = "overloaded"


def _counter(name: str, doc: str, labels: list[str],
             rows: list[tuple[list[str], float]]) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=labels)
    for values, v in rows:
        c.add_metric(values, v)
    return c


def _gauge(name: str, doc: str, labels: list[str],
           rows: list[tuple[list[str], float]]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for values, v in rows:
        g.add_metric(values, v)
    return g


def families(r: OrchestratorReport) -> Iterator[Metric]:
    """Every metric family of one orchestrator replica's report."""
    oid = r.orchestrator_id
    c = r.counters
    yield _counter("cplane_orchestrator_events", "What this replica did: accepted, "
                   "dispatched, batches, rejected, duplicates, cancelled, pd, dead_letters, "
                   "redeliveries_settled, reconciled, publish retries and failures.",
                   ["orchestrator", "event"], [([oid, k], v) for k, v in sorted(c.items())])
    yield _counter("cplane_orchestrator_accepted_requests", "Requests held for dispatch, by "
                   "priority and SLO class (the subject's).",
                   ["orchestrator", "priority", "slo_class"],
                   [([oid, *k.split("/", 1)], v) for k, v in sorted(r.accepted.items())])
    yield _counter("cplane_orchestrator_rejected_requests", "ErrorReplies the orchestrator "
                   "published, by code.", ["orchestrator", "code"],
                   [([oid, k], v) for k, v in sorted(r.rejections.items())])
    yield _counter("cplane_shed_requests", "Requests of sheddable classes refused at once "
                   "(ErrorReply overloaded).", ["orchestrator"],
                   [([oid], r.rejections.get(SHED_CODE, 0))])
    yield _counter("cplane_dead_letters", "Request messages delivered max_deliveries times "
                   "(ErrorReply dead_letter).", ["orchestrator"],
                   [([oid], c.get("dead_letters", 0))])
    yield _counter("cplane_redeliveries", "Redelivered request messages found finished or "
                   "running (not dispatched again).", ["orchestrator"],
                   [([oid], c.get("redeliveries_settled", 0))])
    yield _counter("cplane_routing_decisions", "Requests routed, by router strategy, role "
                   "and target kind (one worker or a pool subject).",
                   ["orchestrator", "strategy", "role", "target"],
                   [([oid, r.router, *k.split("/", 1)], v) for k, v in sorted(r.routed.items())])
    pd = c.get("pd", 0)
    yield _counter("cplane_pd_decisions", "Dispatched requests by PD decision.",
                   ["orchestrator", "decision"],
                   [([oid, "disaggregated"], pd),
                    ([oid, "unified"], max(0, c.get("dispatched", 0) - pd))])
    yield _gauge("cplane_queue_depth", "Requests in LLM_REQ per priority (JetStream consumer "
                 "state): pending = not delivered yet, held = held by an orchestrator.",
                 ["priority", "state"],
                 [row for q in r.queue for row in (([q.priority, "pending"], q.pending),
                                                   ([q.priority, "held"], q.held))])
    yield _gauge("cplane_queue_messages", "Messages in LLM_REQ per priority and SLO class "
                 "(stream subject counts).", ["priority", "slo_class"],
                 [([q.priority, k], v) for q in r.queue for k, v in sorted(q.by_class.items())])
    yield _gauge("cplane_orchestrator_held_requests", "This replica's ledger: requests held, "
                 "per priority.", ["orchestrator", "priority"],
                 [([oid, k], v) for k, v in r.held.items()])
    yield _gauge("cplane_orchestrator_in_flight_requests", "Dispatched, terminal not seen "
                 "yet.", ["orchestrator"], [([oid], r.in_flight)])
    if r.done_copy_lag is not None and r.done_copy_idle_s is not None:
        yield _gauge("cplane_done_copy_lag_messages", "Terminals stored in LLM_OUT that "
                     "LLM_DONE's source has not copied yet.", [], [([], r.done_copy_lag)])
        yield _gauge("cplane_done_copy_idle_seconds", "Seconds since LLM_DONE's source last "
                     "heard from LLM_OUT; alert well below LLM_OUT's max_age.", [],
                     [([], r.done_copy_idle_s)])
    yield _gauge("cplane_orchestrator_leader", "1 on the replica that dispatches.",
                 ["orchestrator"], [([oid], 1.0 if r.leading else 0.0)])
    yield _gauge("cplane_orchestrator_info", "Policy, router and PD mode in force.",
                 ["orchestrator", "policy", "router", "pd_mode"],
                 [([oid, r.policy, r.router, r.pd_mode], 1.0)])
    yield _gauge("cplane_orchestrator_workers", "Workers this replica hears heartbeats from "
                 "(known) and those ready for work.", ["orchestrator", "state"],
                 [([oid, "known"], r.workers_known), ([oid, "ready"], r.workers_ready)])


def start_metrics_server(host: str, port: int,
                         snapshot: Callable[[], Awaitable[OrchestratorReport]],
                         not_ready: NotReady | None = None) -> WSGIServer:
    """Serve `/metrics`, `/healthz` and `/readyz` (`not_ready` says why not) on
    `host:port` (-1: any free port) in a daemon thread (bus/prom.py)."""
    return serve_metrics(host, port, snapshot, families, not_ready)


__all__ = ["families", "start_metrics_server"]
