"""An orchestrator replica's side of the control subjects, and its `/metrics` server.

Every replica answers (core request/reply, no queue group: the asker
aggregates the replicas' answers, client/control.py):

- `<prefix>.admin.status` / `.metrics`: an `OrchestratorReport`: leadership,
  policy, router, counters, its ledger, and the queue depth per priority and
  SLO class read from JetStream at that moment (consumer num_pending /
  num_ack_pending, stream subject counts);
- `<prefix>.admin.instances`: the workers it hears heartbeats from;
- `<prefix>.admin.request`: a request's phase: from its ledger when it holds
  the request, else from the terminal stored in LLM_OUT / LLM_DONE (with the
  timeline the Final's timings give), else `not_found`.

Nothing here runs on the dispatch path: each answer costs a few JetStream
API calls at the moment it is asked for, and the only state kept is the
latest heartbeat per live worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus import tracing
from bus.replay import stored_terminal
from orchestrator.ledger import RequestState
from orchestrator.metrics import start_metrics_server
from schemas.codec import encode, heartbeat_decoder
from schemas.control import (
    INSTANCES_VERB,
    METRICS_VERB,
    REQUEST_VERB,
    STATUS_VERB,
    InstancesReply,
    OrchestratorReport,
    QueueDepth,
    RequestPhase,
    RequestQuery,
    RequestStatus,
    request_query_decoder,
)
from schemas.messages import PRIORITIES, ErrorReply, Final, FinishReason, Heartbeat, WorkerState
from schemas.subjects import consumer_for_priority

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from orchestrator.service import Orchestrator

log = logging.getLogger("cplane.orchestrator")
JS_TIMEOUT_S = 2.0


def terminal_status(request_id: str, term: Final | ErrorReply) -> RequestStatus:
    """A finished request's status, its timeline rebuilt from the Final's timings."""
    if isinstance(term, ErrorReply):
        return RequestStatus(request_id=request_id, phase=RequestPhase.FAILED,
                             source="LLM_DONE", finished_ms=term.ts_ms,
                             error_code=str(term.code), message=term.message)
    t = term.timings
    queued = term.ts_ms - t.e2e_ms if term.ts_ms and t.e2e_ms else 0.0
    cancelled = term.finish_reason is FinishReason.CANCELLED
    return RequestStatus(
        request_id=request_id,
        phase=RequestPhase.CANCELLED if cancelled else RequestPhase.COMPLETED,
        source="LLM_DONE", worker_id=term.workers[-1] if term.workers else "",
        queued_ms=queued,
        dispatched_ms=queued + t.queue_ms if queued and t.queue_ms else 0.0,
        first_token_ms=queued + t.ttft_ms if queued and t.ttft_ms else 0.0,
        finished_ms=term.ts_ms, tokens=term.usage.completion_tokens,
        finish_reason=str(term.finish_reason))


class OrchestratorControl:
    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.started_ms = time.time() * 1000
        self._subs: list[Subscription] = []
        self._server: WSGIServer | None = None
        self._instances: dict[str, tuple[Heartbeat, float]] = {}  # id -> (hb, monotonic)
        self._pruned = 0.0
        self.metrics_port = 0  # where /metrics listens (0 = not served)

    async def start(self) -> None:
        o = self.orch
        nc = o._nc
        assert nc is not None
        s = o.subjects
        self._subs = [
            await nc.subscribe(s.admin(STATUS_VERB), cb=self._on_status),
            await nc.subscribe(s.admin(METRICS_VERB), cb=self._on_metrics),
            await nc.subscribe(s.admin(INSTANCES_VERB), cb=self._on_instances),
            await nc.subscribe(s.admin(REQUEST_VERB), cb=self._on_request),
            await nc.subscribe(s.heartbeats_all, cb=self._on_heartbeat),
        ]
        m = o.settings.metrics
        if m.orchestrator_port:
            self._server = start_metrics_server(m.host, m.orchestrator_port, self.report)
            self.metrics_port = self._server.server_port
            log.info("orchestrator %s: metrics on http://%s:%d/metrics", o.id, m.host,
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

    # -- what it knows ------------------------------------------------------------
    def instances(self) -> list[Heartbeat]:
        """Workers heard within worker_timeout_s, by id."""
        limit = self.orch.settings.orchestrator.worker_timeout_s
        now = time.monotonic()
        for wid in [w for w, (_, seen) in self._instances.items() if now - seen > limit]:
            del self._instances[wid]
        return [hb for _, (hb, _) in sorted(self._instances.items())]

    async def queue_depth(self) -> list[QueueDepth]:
        """LLM_REQ per priority, as JetStream reports it now ([] when it does not answer)."""
        o = self.orch
        js, stream = o._js, o.settings.streams.req.name
        try:
            async with asyncio.timeout(JS_TIMEOUT_S):
                infos = await asyncio.gather(
                    *(js.consumer_info(stream, consumer_for_priority(p)) for p in PRIORITIES),
                    return_exceptions=True)
                sinfo = await js.stream_info(stream, subjects_filter=o.subjects.requests_all)
        except Exception as exc:  # the broker is away: say nothing rather than guess
            log.debug("queue depth unavailable: %r", exc)
            return []
        by_prio: dict[str, dict[str, int]] = {p.value: {} for p in PRIORITIES}
        for subject, n in (sinfo.state.subjects or {}).items():
            prio, slo = o.subjects.parse_request(subject)
            if prio in by_prio:
                by_prio[prio][slo] = n
        out = []
        for p, info in zip(PRIORITIES, infos, strict=True):
            pending = held = 0
            if not isinstance(info, BaseException):
                pending, held = info.num_pending or 0, info.num_ack_pending or 0
            out.append(QueueDepth(priority=p.value, pending=pending, held=held,
                                  by_class=by_prio[p.value]))
        return out

    async def report(self, with_instances: bool = False) -> OrchestratorReport:
        o = self.orch
        st = o.stats
        instances = self.instances()
        return OrchestratorReport(
            orchestrator_id=o.id, leading=o.leading, policy=o.policy_name,
            router=o.settings.orchestrator.router, pd_mode=o.settings.orchestrator.pd_mode,
            counters={k: v for k, v in asdict(st).items() if isinstance(v, int)},
            rejections={str(k): v for k, v in st.rejections.items()},
            accepted=dict(st.accepted_by), routed=dict(st.routed),
            held={p.value: o.ledger.held_count(i) for i, p in enumerate(PRIORITIES)},
            in_flight=sum(o.ledger.in_flight_by_pool().values()),
            queue=await self.queue_depth(),
            workers_known=len(instances),
            workers_ready=sum(hb.state is WorkerState.READY for hb in instances),
            instances=instances if with_instances else [],
            started_ms=self.started_ms, ts_ms=time.time() * 1000)

    async def request_status(self, query: RequestQuery) -> RequestStatus:
        o = self.orch
        rid = query.request_id
        entry = o.ledger.get(rid)
        if entry is not None and entry.state is not RequestState.FINISHING:
            item = entry.item
            dispatched = entry.state is not None and entry.state >= RequestState.DISPATCHING
            # The worker may have stored the terminal and forgotten the request before
            # its fin reaches this ledger: the stored answer wins, never "dispatched".
            if dispatched:
                term = await stored_terminal(o._js, o.settings, query.group, rid)
                if term is not None:
                    return terminal_status(rid, term)
            return RequestStatus(
                request_id=rid,
                phase=RequestPhase.DISPATCHED if dispatched else RequestPhase.QUEUED,
                source=f"orchestrator:{o.id}", orchestrator_id=o.id,
                worker_id=entry.target, priority=item.priority.value,
                slo_class=item.slo_class, queued_ms=entry.arrival_ms,
                dispatched_ms=entry.dispatched_ms)
        term = await stored_terminal(o._js, o.settings, query.group, rid)
        if term is not None:
            return terminal_status(rid, term)
        return RequestStatus(request_id=rid, phase=RequestPhase.NOT_FOUND,
                             source=f"orchestrator:{o.id}", orchestrator_id=o.id)

    # -- subscriptions --------------------------------------------------------------
    async def _reply(self, msg: Msg, data: bytes) -> None:
        if msg.reply and self.orch._nc is not None:
            with contextlib.suppress(Exception):
                await self.orch._nc.publish(msg.reply, data)

    async def _on_status(self, msg: Msg) -> None:
        await self._reply(msg, encode(await self.report(with_instances=True)))

    async def _on_metrics(self, msg: Msg) -> None:
        await self._reply(msg, encode(await self.report()))

    async def _on_instances(self, msg: Msg) -> None:
        await self._reply(msg, encode(InstancesReply(
            orchestrator_id=self.orch.id, instances=self.instances(),
            ts_ms=time.time() * 1000)))

    async def _on_request(self, msg: Msg) -> None:
        try:
            query = request_query_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._reply(msg, encode(RequestStatus(
                request_id="", phase=RequestPhase.NOT_FOUND, source=f"orchestrator:"
                f"{self.orch.id}", message=f"bad request query: {exc}")))
            return
        try:
            status = await self.request_status(query)
        except Exception as exc:  # the lookup failed: say so, the asker may retry
            status = RequestStatus(request_id=query.request_id, phase=RequestPhase.NOT_FOUND,
                                   source=f"orchestrator:{self.orch.id}",
                                   message=f"lookup failed: {exc!r}")
        await self._reply(msg, encode(status))

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = heartbeat_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if hb.state is WorkerState.STOPPED:
            self._instances.pop(hb.worker_id, None)
        else:
            self._instances[hb.worker_id] = (hb, time.monotonic())
        if time.monotonic() - self._pruned > 1.0:  # the dead go even if nobody asks
            self._pruned = time.monotonic()
            self.instances()


async def start_control(orch: Orchestrator) -> OrchestratorControl:
    tracing.setup("cplane-orchestrator")  # OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set
    control = OrchestratorControl(orch)
    await control.start()
    return control


__all__ = ["OrchestratorControl", "start_control", "terminal_status"]
