"""An orchestrator replica's side of the control subjects, and its `/metrics` server.

Every replica answers (core request/reply, no queue group: the asker
aggregates the replicas' answers, client/control.py):

- `<prefix>.admin.status` / `.metrics`: an `OrchestratorReport`: leadership,
  policy, router, counters, its ledger, and the queue depth per priority and
  SLO class read from JetStream at that moment (consumer num_pending /
  num_ack_pending, stream subject counts);
- `<prefix>.admin.instances`: the workers its registry hears heartbeats from;
- `<prefix>.admin.request`: a request's phase: from its ledger when it holds
  the request, else from the terminal stored in LLM_OUT / LLM_DONE (with the
  timeline the Final's timings give), else `not_found`;
- `<prefix>.admin.breakers`: the leader only, each worker's circuit breaker
  (`cplane workers` shows them).

Nothing here runs on the dispatch path and nothing is kept: each answer reads
the replica (through `ReplicaState`, read-only), its worker registry, or
JetStream at the moment it is asked for. The subscriptions and the metrics
server are bus/control.py's `ControlEndpoint`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import asdict
from typing import Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from cplane.bus import tracing
from cplane.bus.control import ADMIN_GUARD, Answer, ControlEndpoint
from cplane.bus.replay import stored_terminal
from cplane.bus.stream_config import copy_behind
from cplane.orchestrator.dispatch import DispatchConfig
from cplane.orchestrator.fleet import Registry
from cplane.orchestrator.health_admin import breaker_infos
from cplane.orchestrator.ledger import Ledger, RequestState
from cplane.orchestrator.metrics import start_metrics_server
from cplane.orchestrator.stats import OrchestratorStats
from cplane.schemas.admin import BREAKERS_VERB
from cplane.schemas.codec import encode
from cplane.schemas.control import (
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
from cplane.schemas.messages import (
    PRIORITIES,
    ErrorReply,
    Final,
    FinishReason,
    Heartbeat,
    WorkerState,
)
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import consumer_for_priority, tenant_of

log = logging.getLogger("cplane.orchestrator")
JS_TIMEOUT_S = 2.0


class ReplicaState(Protocol):
    """What the control subjects read of a replica, never change (the
    Orchestrator is one; read at the moment a question arrives)."""

    @property
    def id(self) -> str: ...

    @property
    def leading(self) -> bool: ...

    @property
    def policy_name(self) -> str: ...

    @property
    def stats(self) -> OrchestratorStats: ...

    @property
    def ledger(self) -> Ledger: ...

    @property
    def cfg(self) -> DispatchConfig: ...


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
    """Answers the control subjects for one replica, from what it is given."""

    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings,
                 registry: Registry, replica: ReplicaState) -> None:
        self.js = js
        self.settings = settings
        self.registry = registry
        self.replica = replica
        self.started_ms = time.time() * 1000
        a = settings.subjects.admin
        answers: dict[str, Answer] = {
            a(STATUS_VERB): self._on_status, a(METRICS_VERB): self._on_metrics,
            a(INSTANCES_VERB): self._on_instances, a(REQUEST_VERB): self._on_request,
            a(BREAKERS_VERB): self._on_breakers}
        m = settings.metrics
        serve = (functools.partial(start_metrics_server, m.host, m.orchestrator_port,
                                   self.report, self.not_ready)
                 if m.orchestrator_port else None)
        self.endpoint = ControlEndpoint(nc, answers, serve, name=f"orchestrator {replica.id}")
        self._nc = nc

    @property
    def metrics_port(self) -> int:
        """Where /metrics listens (0 = not served)."""
        return self.endpoint.metrics_port

    async def start(self) -> None:
        await self.endpoint.start()

    async def not_ready(self) -> str | None:
        """`/readyz`: why this replica is not ready, None when it is. The server only
        exists from after provisioning (the replica starts it once every stream,
        consumer and store is in place), so what is left is the connection: ready
        while connected to NATS, leader or standby alike (a standby takes over
        within lease_ttl_s, so it counts for the PodDisruptionBudget)."""
        return None if self._nc.is_connected else "not connected to NATS"

    async def stop(self) -> None:
        await self.endpoint.stop()

    # -- what it knows ------------------------------------------------------------
    def instances(self) -> list[Heartbeat]:
        """Workers heard within worker_timeout_s, by id (the registry's clock: wall ms)."""
        return self.registry.heartbeats(time.time() * 1000)

    async def done_copy(self) -> tuple[int | None, float | None]:
        """How far LLM_DONE's source is behind LLM_OUT, as JetStream reports it now; logs
        a warning once it has been out of contact for half of LLM_OUT's max_age."""
        try:
            async with asyncio.timeout(JS_TIMEOUT_S):
                info = await self.js.stream_info(self.settings.streams.done.name)
        except Exception as exc:  # the broker is away: say nothing rather than guess
            log.debug("LLM_DONE's source state unavailable: %r", exc)
            return None, None
        behind = copy_behind(info)
        if behind is None:
            return None, None
        lag, idle_s = behind
        max_age_s = self.settings.streams.out.max_age_s
        if max_age_s and idle_s > max_age_s / 2:
            log.warning("LLM_DONE has not heard from LLM_OUT for %.0f s (%d behind): terminals "
                        "older than %.0f s that it has not copied are lost", idle_s, lag,
                        max_age_s)
        return lag, idle_s

    async def queue_depth(self) -> list[QueueDepth]:
        """LLM_REQ per priority, as JetStream reports it now ([] when it does not answer)."""
        js, stream, subjects = self.js, self.settings.streams.req.name, self.settings.subjects
        try:
            async with asyncio.timeout(JS_TIMEOUT_S):
                infos = await asyncio.gather(
                    *(js.consumer_info(stream, consumer_for_priority(p)) for p in PRIORITIES),
                    return_exceptions=True)
                sinfo = await js.stream_info(stream, subjects_filter=subjects.requests_all)
        except Exception as exc:  # the broker is away: say nothing rather than guess
            log.debug("queue depth unavailable: %r", exc)
            return []
        by_prio: dict[str, dict[str, int]] = {p.value: {} for p in PRIORITIES}
        for subject, n in (sinfo.state.subjects or {}).items():
            prio, slo = subjects.parse_request(subject)
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
        r, o = self.replica, self.settings.orchestrator
        st, ledger = r.stats, r.ledger
        instances = self.instances()
        copy_lag, copy_idle_s = await self.done_copy()
        return OrchestratorReport(
            orchestrator_id=r.id, leading=r.leading, policy=r.policy_name,
            router=r.cfg.router_in_use.name, pd_mode=o.pd_mode,
            counters={**{k: v for k, v in asdict(st).items() if isinstance(v, int)},
                      "admin_refused": ADMIN_GUARD.refused},
            rejections={str(k): v for k, v in st.rejections.items()},
            accepted=dict(st.accepted_by), routed=dict(st.routed),
            held={p.value: ledger.held_count(i) for i, p in enumerate(PRIORITIES)},
            in_flight=sum(ledger.in_flight_by_pool().values()),
            queue=await self.queue_depth(),
            workers_known=len(instances),
            workers_ready=sum(hb.state is WorkerState.READY for hb in instances),
            done_copy_lag=copy_lag, done_copy_idle_s=copy_idle_s,
            instances=instances if with_instances else [],
            started_ms=self.started_ms, ts_ms=time.time() * 1000)

    async def request_status(self, query: RequestQuery) -> RequestStatus:
        rid, oid = query.request_id, self.replica.id
        entry = self.replica.ledger.get(rid)
        if entry is not None and tenant_of(entry.item.request.group) != tenant_of(query.group):
            entry = None  # the same id in another tenant's scope: not this request
        if entry is not None and entry.state is not RequestState.FINISHING:
            item = entry.item
            dispatched = entry.state is not None and entry.state >= RequestState.DISPATCHING
            # The worker may have stored the terminal and forgotten the request before
            # its fin reaches this ledger: the stored answer wins, never "dispatched".
            if dispatched:
                term = await stored_terminal(self.js, self.settings, query.group, rid)
                if term is not None:
                    return terminal_status(rid, term)
            return RequestStatus(
                request_id=rid,
                phase=RequestPhase.DISPATCHED if dispatched else RequestPhase.QUEUED,
                source=f"orchestrator:{oid}", orchestrator_id=oid,
                worker_id=entry.target, priority=item.priority.value,
                slo_class=item.slo_class, queued_ms=entry.arrival_ms,
                dispatched_ms=entry.dispatched_ms)
        term = await stored_terminal(self.js, self.settings, query.group, rid)
        if term is not None:
            return terminal_status(rid, term)
        return RequestStatus(request_id=rid, phase=RequestPhase.NOT_FOUND,
                             source=f"orchestrator:{oid}", orchestrator_id=oid)

    # -- answers ------------------------------------------------------------------
    async def _on_status(self, data: bytes) -> bytes:
        return encode(await self.report(with_instances=True))

    async def _on_metrics(self, data: bytes) -> bytes:
        return encode(await self.report())

    async def _on_instances(self, data: bytes) -> bytes:
        return encode(InstancesReply(orchestrator_id=self.replica.id,
                                     instances=self.instances(), ts_ms=time.time() * 1000))

    async def _on_request(self, data: bytes) -> bytes:
        source = f"orchestrator:{self.replica.id}"
        try:
            query = request_query_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return encode(RequestStatus(request_id="", phase=RequestPhase.NOT_FOUND,
                                        source=source, message=f"bad request query: {exc}"))
        try:
            status = await self.request_status(query)
        except Exception as exc:  # the lookup failed: say so, the asker may retry
            status = RequestStatus(request_id=query.request_id, phase=RequestPhase.NOT_FOUND,
                                   source=source, message=f"lookup failed: {exc!r}")
        return encode(status)

    async def _on_breakers(self, data: bytes) -> bytes | None:
        if not self.replica.leading or self.registry.breakers is None:
            return None  # the leader's breakers are the ones that route
        return encode(breaker_infos(self.registry.breakers))


async def start_control(nc: NATS, js: JetStreamContext, settings: Settings, registry: Registry,
                        replica: ReplicaState) -> OrchestratorControl:
    """Answer the control subjects and serve /metrics until `stop()`; called once the
    replica's connection, JetStream context and registry exist."""
    tracing.setup("cplane-orchestrator")  # OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set
    control = OrchestratorControl(nc, js, settings, registry, replica)
    await control.start()
    return control


__all__ = ["OrchestratorControl", "ReplicaState", "start_control", "terminal_status"]
