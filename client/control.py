"""The control plane from Python: status, metrics, instances, request status, cancel, policy.

    async with await ControlPlane.connect("nats://127.0.0.1:4222") as cp:
        m = await cp.get_metrics()             # MetricsSummary: totals, latencies, SLOs, rates
        s = await cp.get_status()              # SystemStatus: replicas, leader, workers, queue
        ws = await cp.get_instances()          # [Heartbeat] of every live worker
        vs = await cp.get_instance_views()     # [InstanceView]: load, health, latency, GPU
        w = await cp.get_instance_metrics("w0")          # WorkerReport (NotFound if none)
        r = await cp.get_request_status(request_id)      # RequestStatus (phase not_found...)
        c = await cp.cancel_request(request_id)          # CancelResult
        a = await cp.update_policy("fifo")               # AdminReply (client/admin.py)
        r = await cp.update_router("least_loaded")       # AdminReply; r.router: in force

Each call publishes one core request on `<prefix>.admin.<verb>` with its own
inbox and collects every answer (orchestrator replicas, workers) until none
has come for `quiet_s`, at most `timeout_s` for the first and `max_s` in all;
the answers are folded by client/aggregate.py. No answer at all is
`NoOrchestrator` (nothing runs, or NATS says no one listens).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cplane.bus.credentials import cannot_reach, connect_options, server_list
from cplane.client.admin import Admin, NoOrchestrator
from cplane.client.aggregate import (
    MetricsSummary,
    SystemStatus,
    instance_views,
    merge_status,
    summarize,
    system_status,
)
from cplane.client.instances import list_instances, register_instance, unregister_instance
from cplane.schemas.admin import AdminReply
from cplane.schemas.codec import encode
from cplane.schemas.control import (
    INSTANCE_VERB,
    INSTANCES_VERB,
    METRICS_VERB,
    REQUEST_VERB,
    STATUS_VERB,
    InstanceView,
    OrchestratorReport,
    RequestPhase,
    RequestQuery,
    RequestStatus,
    WorkerReport,
    instances_decoder,
    report_decoder,
    request_status_decoder,
    worker_report_decoder,
)
from cplane.schemas.instances import InstanceSpec
from cplane.schemas.messages import Heartbeat
from cplane.schemas.settings import Settings, load_settings
from cplane.schemas.subjects import INTERACTIVE_GROUP, scoped, valid_token

_NO_RESPONDERS = "503"


class NotFound(LookupError):
    """No such worker (get_instance_metrics) or request."""


class CancelResult(msgspec.Struct, kw_only=True):
    request_id: str
    found: bool  # some orchestrator, worker or LLM_DONE knew it
    sent: bool  # the cancel is stored (LLM_CANCEL): every part honours it
    phase: RequestPhase  # before the cancel
    message: str = ""


class ControlPlane:
    def __init__(self, nc: NATS, settings: Settings, *, timeout_s: float = 2.0,
                 quiet_s: float = 0.25, max_s: float = 10.0) -> None:
        self.nc = nc
        self.settings = settings
        self.subjects = settings.subjects
        self.timeout_s = timeout_s
        self.quiet_s = quiet_s
        self.max_s = max_s
        self._own_nc = False

    @classmethod
    async def connect(cls, url: str | None = None, settings: Settings | None = None, *,
                      connect_timeout_s: float = 5.0, **kw: float) -> ControlPlane:
        """Connect (no reconnect loop: a control call is short); ConnectionError if unreachable."""
        settings = settings or load_settings()
        url = url or settings.nats.url
        options = connect_options(msgspec.structs.replace(settings.nats, url=url))

        async def quiet(exc: Exception) -> None:  # nats-py would log each failed attempt
            return None

        try:
            async with asyncio.timeout(connect_timeout_s):
                nc = await nats.connect(server_list(url), allow_reconnect=False, connect_timeout=2,
                                        error_cb=quiet, **options)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise cannot_reach(url, exc) from None
        cp = cls(nc, settings, **kw)
        cp._own_nc = True
        return cp

    async def close(self) -> None:
        if self._own_nc:
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def __aenter__(self) -> ControlPlane:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- one scatter/gather ------------------------------------------------------------
    async def gather(self, subject: str, body: bytes = b"") -> list[bytes]:
        """Every answer to one request on `subject`, until `quiet_s` passes without one."""
        replies: list[bytes] = []
        arrived = asyncio.Event()
        nobody = asyncio.Event()
        last = [time.monotonic()]

        async def on_reply(msg: Msg) -> None:
            if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS and not msg.data:
                nobody.set()
                arrived.set()
                return
            replies.append(msg.data)
            last[0] = time.monotonic()
            arrived.set()

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=on_reply)
        try:
            await self.nc.publish(subject, body, reply=inbox)
            await self.nc.flush()
            start = time.monotonic()
            while not nobody.is_set():
                now = time.monotonic()
                end = (min(last[0] + self.quiet_s, start + self.max_s) if replies
                       else start + self.timeout_s)
                if now >= end:
                    break
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), end - now)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return replies

    async def _reports(self, verb: str) -> tuple[list[OrchestratorReport], list[WorkerReport]]:
        orchs: list[OrchestratorReport] = []
        workers: dict[str, WorkerReport] = {}
        for data in await self.gather(self.subjects.admin(verb)):
            try:
                r = report_decoder.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # a newer or broken peer: the others still count
            if isinstance(r, OrchestratorReport):
                orchs.append(r)
            else:
                workers[r.worker_id] = r
        if not orchs and not workers:
            raise NoOrchestrator(f"no orchestrator or worker answered on "
                                 f"{self.subjects.admin(verb)} within {self.timeout_s:g} s")
        return orchs, [workers[k] for k in sorted(workers)]

    # -- the specification's calls -----------------------------------------------------
    async def get_metrics(self) -> MetricsSummary:
        """Totals, active and queued, latency means and percentiles, TTFT/TPOT/ITL,
        tokens/s and req/s, SLO violations and compliance, KV utilisation."""
        return summarize(*await self._reports(METRICS_VERB))

    async def get_reports(self) -> tuple[list[OrchestratorReport], list[WorkerReport]]:
        """The raw replies behind get_metrics(), one per replica and worker."""
        return await self._reports(METRICS_VERB)

    async def get_status(self) -> SystemStatus:
        """Every orchestrator replica (leader first), the live workers, the queue."""
        orchs, _ = await self._reports(STATUS_VERB)
        if not orchs:
            raise NoOrchestrator("no orchestrator answered")
        return system_status(orchs)

    async def get_instances(self) -> list[Heartbeat]:
        """The latest heartbeat of every live worker, as the replicas heard them."""
        beats = await self._heartbeats()
        if beats is None:
            raise NoOrchestrator("no orchestrator answered")
        return [beats[k][0] for k in sorted(beats)]

    async def _heartbeats(self) -> dict[str, tuple[Heartbeat, float]] | None:
        """Worker id -> (the newest heartbeat any replica holds, its age in seconds when
        that replica answered: reply time less heartbeat time, two hosts' wall clocks);
        None when no replica answered."""
        newest: dict[str, tuple[Heartbeat, float]] = {}
        replies = await self.gather(self.subjects.admin(INSTANCES_VERB))
        if not replies:
            return None
        for data in replies:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                reply = instances_decoder.decode(data)
                for hb in reply.instances:
                    if hb.worker_id not in newest or hb.ts_ms > newest[hb.worker_id][0].ts_ms:
                        newest[hb.worker_id] = (hb, max(0.0, reply.ts_ms - hb.ts_ms) / 1000)
        return newest

    async def get_instance_views(self) -> list[InstanceView]:
        """Every serving instance as the specification's `get_instances()` shows one
        (`InstanceView`: load, queue, health and its reason, latency avg/p95, TTFT/TPOT
        averages, KV, GPU), by id: the heartbeats the replicas hold (healthy = ready
        and heard within `orchestrator.worker_timeout_s`) joined with each worker's own
        report (latency); a worker no replica lists yet is judged by its report.
        Raises NoOrchestrator when neither a replica nor a worker answers."""
        beats, (_, reports) = await asyncio.gather(self._heartbeats(),
                                                   self._reports(METRICS_VERB))
        return instance_views(beats or {}, reports, self.settings.orchestrator.worker_timeout_s)

    async def get_instance_metrics(self, worker_id: str) -> WorkerReport:
        """One worker's report, from the worker itself (with the instance view's fields:
        healthy, health_reason, load, latency_avg_ms / latency_p95_ms, ttft_ms_avg,
        tpot_ms_avg, gpu_*); NotFound when it does not answer."""
        if not valid_token(worker_id):
            raise NotFound(f"{worker_id!r} is not a worker id")
        subject = self.subjects.admin(f"{INSTANCE_VERB}.{worker_id}")
        for data in await self.gather(subject):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                return worker_report_decoder.decode(data)
        raise NotFound(f"worker {worker_id} not found (no answer on {subject})")

    # -- remote engine instances (client/instances.py) -----------------------------------
    async def register_instance(self, spec: InstanceSpec) -> InstanceSpec:
        """Add (or replace) a remote engine instance: the worker processes of its group
        start fronting it (`cplane instances add`). ValueError on a bad spec."""
        return await register_instance(self.nc.jetstream(), self.settings, spec)

    async def unregister_instance(self, instance_id: str) -> None:
        """Remove an instance: its worker drains it (running requests finish or move on)
        and stops routing to it. NotFound when it is not registered."""
        if not await unregister_instance(self.nc.jetstream(), self.settings, instance_id):
            raise NotFound(f"instance {instance_id} is not registered")

    async def list_instances(self) -> list[InstanceSpec]:
        """Every registered remote instance (live state: get_instance_views)."""
        return await list_instances(self.nc.jetstream(), self.settings)

    async def get_request_status(self, request_id: str, group: str = INTERACTIVE_GROUP,
                                 tenant: str | None = None) -> RequestStatus:
        """Its phase (queued, dispatched, prefill, decoding, completed, failed, cancelled)
        with timestamps, or phase `not_found`; `tenant`: a tenant's request (its id is
        its own within that tenant). Raises NoOrchestrator when nobody answers."""
        if not valid_token(request_id) or not valid_token(group) or (
                tenant is not None and not valid_token(tenant)):
            return RequestStatus(request_id=request_id, phase=RequestPhase.NOT_FOUND,
                                 message="not a valid request id")
        query = encode(RequestQuery(request_id=request_id, group=scoped(tenant, group)))
        replies = await self.gather(self.subjects.admin(REQUEST_VERB), query)
        if not replies:
            raise NoOrchestrator("no orchestrator answered")
        answers = []
        for data in replies:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                answers.append(request_status_decoder.decode(data))
        return merge_status(request_id, answers)

    async def cancel_request(self, request_id: str, group: str = INTERACTIVE_GROUP, *,
                             force: bool = False, tenant: str | None = None) -> CancelResult:
        """Store a cancel for the request (LLM_CANCEL), unless it is unknown (then only
        with `force`: it may still sit unread in LLM_REQ) or already finished;
        `tenant`: that tenant's request of this id, and no other's."""
        status = await self.get_request_status(request_id, group, tenant)
        found = status.phase is not RequestPhase.NOT_FOUND
        if status.phase.terminal:
            return CancelResult(request_id=request_id, found=True, sent=False,
                                phase=status.phase, message=f"already {status.phase}")
        if not found and not force:
            return CancelResult(request_id=request_id, found=False, sent=False,
                                phase=status.phase, message="not found")
        await self.nc.jetstream().publish(self.subjects.cancel(request_id, tenant), b"",
                                          timeout=self.timeout_s)
        return CancelResult(request_id=request_id, found=found, sent=True, phase=status.phase,
                            message="cancel stored")

    async def update_policy(self, name: str, params: Mapping[str, Any] | None = None,
                            by: str = "") -> AdminReply:
        """Switch every replica's dispatch policy (`cplane policy set`)."""
        admin = Admin(self.nc, self.settings, timeout_s=max(self.timeout_s, 5.0))
        return await admin.set_policy(name, params, by=by)

    async def update_router(self, name: str, params: Mapping[str, Any] | None = None,
                            by: str = "") -> AdminReply:
        """Switch every replica's router (`cplane router set`); a policy that brings its
        own router keeps it (`reply.router` is the router in force)."""
        return await self._admin().set_router(name, params, by=by)

    async def get_router(self) -> AdminReply:
        """The router choice (`reply.router_state`) and the router in force (`reply.router`)."""
        return await self._admin().get_router()

    def _admin(self) -> Admin:
        return Admin(self.nc, self.settings, timeout_s=max(self.timeout_s, 5.0))


__all__ = ["CancelResult", "ControlPlane", "NoOrchestrator", "NotFound"]
