"""A worker's side of the control subjects, and its `/metrics` server.

Answers (core request/reply, every worker, no queue group):
- `<prefix>.admin.metrics` and `<prefix>.admin.instance.<worker_id>`: a
  `WorkerReport` (load and health from a fresh heartbeat, counters and
  histograms from workers/stats.py);
- `<prefix>.admin.request`: the `RequestStatus` of a request running here
  (prefill or decoding, with its timeline); silent when it does not run here,
  so the asker hears only from whoever holds it.

Started by the worker runtime once its connection and stats exist, with two
reads it offers (`report`, `request_status`); both run on the worker's event
loop. The subscriptions and the metrics server are bus/control.py's
`ControlEndpoint`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS

from cplane.bus import tracing
from cplane.bus.control import ControlEndpoint
from cplane.bus.prom import NotReady
from cplane.schemas.codec import encode
from cplane.schemas.control import (
    INSTANCE_VERB,
    METRICS_VERB,
    REQUEST_VERB,
    RequestStatus,
    WorkerReport,
    request_query_decoder,
)
from cplane.schemas.settings import Settings
from cplane.workers.metrics import start_metrics_server

ReportFn = Callable[[], WorkerReport]
RequestStatusFn = Callable[[str], RequestStatus | None]


class WorkerControl:
    """Answers the control subjects for one worker, from the reads it is given."""

    def __init__(self, nc: NATS, settings: Settings, worker_id: str, *,
                 report: ReportFn, request_status: RequestStatusFn,
                 not_ready: NotReady | None = None) -> None:
        self._report = report
        self._request_status = request_status
        a = settings.subjects.admin
        m = settings.metrics
        serve = (functools.partial(start_metrics_server, m.host, m.worker_port, self.report,
                                   not_ready)
                 if m.worker_port else None)
        self.endpoint = ControlEndpoint(
            nc, {a(METRICS_VERB): self._on_report,
                 a(f"{INSTANCE_VERB}.{worker_id}"): self._on_report,
                 a(REQUEST_VERB): self._on_request},
            serve, name=f"worker {worker_id}")

    @property
    def metrics_port(self) -> int:
        """Where /metrics listens (0 = not served)."""
        return self.endpoint.metrics_port

    async def start(self) -> None:
        await self.endpoint.start()

    async def stop(self) -> None:
        await self.endpoint.stop()

    async def report(self) -> WorkerReport:
        return self._report()

    async def _on_report(self, data: bytes) -> bytes:
        return encode(self._report())

    async def _on_request(self, data: bytes) -> bytes | None:
        try:
            query = request_query_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None  # the orchestrators answer a bad query
        status = self._request_status(query.request_id)
        return encode(status) if status is not None else None


async def start_control(nc: NATS, settings: Settings, worker_id: str, *,
                        report: ReportFn, request_status: RequestStatusFn,
                        not_ready: NotReady | None = None) -> WorkerControl:
    """Answer the control subjects and serve /metrics, /healthz and /readyz (`not_ready`
    says why not) until `stop()`."""
    tracing.setup("cplane-worker")  # OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set
    control = WorkerControl(nc, settings, worker_id, report=report,
                            request_status=request_status, not_ready=not_ready)
    await control.start()
    return control


__all__ = ["WorkerControl", "start_control"]
