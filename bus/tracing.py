"""OpenTelemetry, when it is installed: spans as children of a request's traceparent.

Optional: without the `opentelemetry` packages every call here is a cheap
no-op and the traceparent still travels (schemas/trace.py). With them, spans
go wherever the process's TracerProvider sends them; `setup()` installs an
OTLP exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard
OpenTelemetry variable) and the exporter package is present.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from cplane.schemas import trace

log = logging.getLogger("cplane.tracing")
_configured = False

try:  # optional dependency
    from opentelemetry import propagate
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - exercised where OpenTelemetry is absent
    otel_trace = None  # type: ignore[assignment]
    propagate = None  # type: ignore[assignment]


class Span:
    """An open span (or nothing); `end()` once."""

    def __init__(self, span: Any = None) -> None:
        self._span = span

    def end(self) -> None:
        if self._span is not None:
            self._span.end()
            self._span = None


def available() -> bool:
    return otel_trace is not None


def setup(service_name: str) -> bool:
    """Export spans over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; True if it does."""
    global _configured
    if otel_trace is None or not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return False
    if _configured:  # one provider per process (tests run several services in one)
        return True
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is missing: %s",
                    exc)
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    otel_trace.set_tracer_provider(provider)
    _configured = True
    return True


def current() -> str | None:
    """The traceparent of the caller's active OpenTelemetry span, if any."""
    if propagate is None:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    value = carrier.get(trace.HEADER)
    return value if trace.parse(value) else None


def start(name: str, traceparent: str, attributes: Mapping[str, str | int] | None = None
          ) -> Span:
    """A span named `name`, child of `traceparent` (no-op without OpenTelemetry)."""
    if otel_trace is None or propagate is None or not trace.parse(traceparent):
        return Span()
    ctx = propagate.extract({trace.HEADER: traceparent})
    tracer = otel_trace.get_tracer("cplane")
    return Span(tracer.start_span(name, context=ctx, attributes=dict(attributes or {})))


def span_traceparent(span: Span, fallback: str) -> str:
    """The span's own traceparent (for the terminal's header), else a child of `fallback`."""
    s = span._span
    if s is not None:
        c = s.get_span_context()
        if c.is_valid:
            return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"
    return trace.child(fallback)


__all__ = ["Span", "available", "current", "setup", "span_traceparent", "start"]
