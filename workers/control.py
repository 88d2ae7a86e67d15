"""A worker's side of the control subjects, and its `/metrics` server.

Answers (core request/reply, every worker, no queue group):
- `<prefix>.admin.metrics` and `<prefix>.admin.instance.<worker_id>`: a
  `WorkerReport` (load and health from a fresh heartbeat, counters and
  histograms from workers/stats.py);
- `<prefix>.admin.request`: the `RequestStatus` of a request running here
  (prefill or decoding, with its timeline); silent when it does not run here,
  so the asker hears only from whoever holds it.

Started by the worker runtime once its ServeContext exists; all reads happen
on the worker's event loop.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus import tracing
from schemas.codec import encode
from schemas.control import (
    INSTANCE_VERB,
    METRICS_VERB,
    REQUEST_VERB,
    WorkerReport,
    request_query_decoder,
)
from workers.metrics import start_metrics_server

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from workers.runtime import Worker

log = logging.getLogger("cplane.worker")


class WorkerControl:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._subs: list[Subscription] = []
        self._server: WSGIServer | None = None
        self.metrics_port = 0  # where /metrics listens (0 = not served)

    async def start(self) -> None:
        w = self.worker
        assert w.ctx is not None
        nc, subjects = w.ctx.nc, w.subjects
        self._subs = [
            await nc.subscribe(subjects.admin(METRICS_VERB), cb=self._on_report),
            await nc.subscribe(subjects.admin(f"{INSTANCE_VERB}.{w.worker_id}"),
                               cb=self._on_report),
            await nc.subscribe(subjects.admin(REQUEST_VERB), cb=self._on_request),
        ]
        m = w.settings.metrics
        if m.worker_port:
            self._server = start_metrics_server(m.host, m.worker_port, self.report)
            self.metrics_port = self._server.server_port
            log.info("worker %s: metrics on http://%s:%d/metrics", w.worker_id, m.host,
                     self.metrics_port)

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    async def report(self) -> WorkerReport:
        w = self.worker
        assert w.ctx is not None
        # The runtime's own breaker count (engine errors in a row).
        return w.ctx.metrics.report(w.heartbeat(), w.ctx.stats, w._engine_errors)

    async def _on_report(self, msg: Msg) -> None:
        ctx = self.worker.ctx
        if msg.reply and ctx is not None:
            with contextlib.suppress(Exception):
                await ctx.nc.publish(msg.reply, encode(await self.report()))

    async def _on_request(self, msg: Msg) -> None:
        ctx = self.worker.ctx
        if not msg.reply or ctx is None:
            return
        try:
            query = request_query_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # the orchestrators answer a bad query
        status = ctx.metrics.request_status(query.request_id)
        if status is not None:
            with contextlib.suppress(Exception):
                await ctx.nc.publish(msg.reply, encode(status))


async def start_control(worker: Worker) -> WorkerControl:
    tracing.setup("cplane-worker")  # OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set
    control = WorkerControl(worker)
    await control.start()
    return control


__all__ = ["WorkerControl", "start_control"]
