"""The gateway's Prometheus metrics (the only gateway module importing prometheus_client).

Served at `/metrics` from a registry of its own, so two gateways in one
process (tests) never collide.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from cplane.client.quiet import QuietWatch

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)


class GatewayMetrics:
    """Counters and histograms of one gateway process."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cplane_gateway_requests", "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"], registry=r)
        self.open_streams = Gauge(
            "cplane_gateway_open_streams", "SSE streams open now", registry=r)
        self.in_flight = Gauge(
            "cplane_gateway_in_flight", "completion requests published and not yet answered",
            registry=r)
        self.latency = Histogram(
            "cplane_gateway_request_seconds",
            "HTTP request received -> last byte sent, by endpoint and stream",
            ["endpoint", "stream"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "cplane_gateway_ttft_seconds", "HTTP request received -> first token event sent",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.cancelled = Counter(
            "cplane_gateway_client_cancels",
            "requests cancelled in the engine because their client went away", registry=r)
        self.open_requests = Gauge(
            "cplane_gateway_open_requests",
            "HTTP requests admitted and not yet answered to the last byte (what "
            "max_streams caps)", registry=r)
        self.refused_at_door = Counter(
            "cplane_gateway_refused",
            "requests refused before their handler ran or while their body came in, by "
            "reason (invalid_api_key, too_large, request_timeout, rate_limited, "
            "too_many_streams, 404)", ["reason"], registry=r)
        self.refused = Counter(
            "cplane_gateway_overloaded",
            "429 answers: the request stream refused or the orchestrator shed", registry=r)

    def watch_quiet(self, quiet: QuietWatch) -> None:
        """Export the client's reads of the store for requests gone quiet."""
        self.registry.register(_QuietCollector(quiet))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _QuietCollector(Collector):
    def __init__(self, quiet: QuietWatch) -> None:
        self.quiet = quiet

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "cplane_gateway_quiet_lookups",
            "reads of the store by requests that made no progress for a while",
            value=self.quiet.looked_up)
        yield CounterMetricFamily(
            "cplane_gateway_outputs_recovered",
            "of those, reads that found output never seen live (a republish lost)",
            value=self.quiet.recovered)
