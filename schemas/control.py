"""Wire types of the control subjects (request/reply on `<prefix>.admin.<verb>`).

Every orchestrator replica and every worker answers; the asker (client/control.py
`ControlPlane`) collects the replies until no more come for a short while and
aggregates them.

- `<prefix>.admin.status` (empty body): every orchestrator answers an
  `OrchestratorReport` with the instances it knows.
- `<prefix>.admin.metrics` (empty): orchestrators answer `OrchestratorReport`,
  workers `WorkerReport`.
- `<prefix>.admin.instances` (empty): orchestrators answer `InstancesReply`.
- `<prefix>.admin.instance.<worker_id>` (empty): that worker's `WorkerReport`.
- `<prefix>.admin.request` (`RequestQuery`): a `RequestStatus` from whoever
  holds or runs the request; orchestrators also answer a finished one from
  LLM_DONE. Nobody answers for an unknown id.

Latency histograms carry seconds (Prometheus' unit), samples milliseconds
(the wire's unit everywhere else). Cancel goes through `<prefix>.cancel.<id>`
(stored in LLM_CANCEL), as for any client.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from cplane.schemas.messages import Base, Heartbeat

STATUS_VERB = "status"
METRICS_VERB = "metrics"
INSTANCES_VERB = "instances"
INSTANCE_VERB = "instance"  # + ".<worker_id>"
REQUEST_VERB = "request"


class HistogramData(Base, frozen=True, kw_only=True):
    """A latency histogram: `counts[i]` observations <= `bounds[i]` and above the
    bound before it; the last count is above every bound (+Inf). Seconds."""

    bounds: list[float]
    counts: list[int]
    sum: float = 0.0
    count: int = 0


class OutcomeCount(Base, frozen=True, kw_only=True):
    """Requests that ended on one worker, by outcome (a finish reason or `error`)."""

    outcome: str
    priority: str
    slo_class: str
    tenant: str
    count: int


class SloCount(Base, frozen=True, kw_only=True):
    """Per SLO class: requests finished normally (stop/length) and those within target."""

    slo_class: str
    finished: int = 0
    met: int = 0  # TTFT and TPOT within the class's (or request's) targets
    met_tokens: int = 0  # completion tokens of those (goodput in tokens)


class RateWindow(Base, frozen=True, kw_only=True):
    """What one process finished over its last `window_s` seconds (rates)."""

    window_s: float = 0.0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class WorkerReport(Base, frozen=True, kw_only=True, tag="worker", tag_field="kind"):
    """One worker's load, health and what it served since it started."""

    worker_id: str
    role: str = ""
    state: str = ""
    engine: str = ""
    models: list[str] = []
    capacity: int = 0
    running: int = 0
    waiting: int = 0
    held_items: int = 0
    kv_usage: float = 0.0
    prefix_hit_rate: float = 0.0
    prompt_tokens_per_s: float = 0.0
    gen_tokens_per_s: float = 0.0
    engine_errors_in_a_row: int = 0  # the breaker: engine_error_limit of them -> unhealthy
    outcomes: list[OutcomeCount] = []
    errors: dict[str, int] = {}  # ErrorReplies it published, by code
    slo: list[SloCount] = []
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_by_tenant: dict[str, float] = {}
    events: dict[str, int] = {}  # handoffs, handbacks, migrated, dead_letters, engine faults...
    ttft: HistogramData | None = None
    tpot: HistogramData | None = None
    itl: HistogramData | None = None
    e2e: HistogramData | None = None
    queue: HistogramData | None = None
    recent: dict[str, list[float]] = {}  # ms: the last N of ttft, tpot, e2e, queue
    window: RateWindow = RateWindow()
    started_ms: float = 0.0
    ts_ms: float = 0.0
    # The instance view (`InstanceView`'s fields under their report names), judged by
    # the worker as it answers (client/aggregate.py: the same functions as the view).
    healthy: bool = False  # state ready (a worker that answers is alive)
    health_reason: str = ""  # why not healthy ("" when healthy)
    load: float = 0.0  # held_items / capacity
    latency_avg_ms: float = 0.0  # end to end (stored in LLM_REQ -> Final), every request
    latency_p95_ms: float = 0.0  # end to end, its recent requests (nearest rank)
    ttft_ms_avg: float = 0.0  # moving averages (EWMA), as its heartbeat carries them
    tpot_ms_avg: float = 0.0
    served: int = 0  # items served to the end (or handed to a decode) since it started
    faults: int = 0  # items its engine failed on
    # Its GPUs as its heartbeat carries them (schemas/messages.py Heartbeat): None, and
    # then not on the wire, where there is none.
    gpu_util: float | None = None
    gpu_mem_used_bytes: int | None = None
    gpu_mem_total_bytes: int | None = None


class InstanceView(msgspec.Struct, frozen=True, kw_only=True):
    """One serving instance (a worker and its engine) as the specification's
    `get_instances()` shows it: `ControlPlane.get_instance_views()`, built by
    client/aggregate.py `instance_view` from the heartbeat an orchestrator replica
    holds and the worker's own report. Not sent by any process; its JSON keeps
    every field (a GPU field absent is `null`)."""

    instance_id: str  # the worker id: its work subject and heartbeat
    role: str  # unified | prefill | decode
    models: list[str] = []
    engine: str = ""  # sim | vllm | ...
    state: str = ""  # ready | draining | unhealthy | stopped
    healthy: bool = False  # ready, and its last heartbeat younger than worker_timeout_s
    health_reason: str = ""  # why not ("state draining", "no heartbeat for 5 s")
    active_requests: int = 0  # sequences its engine runs now
    queued: int = 0  # waiting in its engine
    held: int = 0  # work items it holds (running, waiting, being stored)
    capacity: int = 0  # sequences it takes at once
    load: float = 0.0  # held / capacity
    latency_avg_ms: float = 0.0  # end to end, every request since it started
    latency_p95_ms: float = 0.0  # end to end, its recent requests
    ttft_ms_avg: float = 0.0  # moving averages of its recent requests
    tpot_ms_avg: float = 0.0
    kv_usage: float = 0.0  # 0..1
    prefix_hit_rate: float = 0.0  # 0..1
    prompt_tokens_per_s: float = 0.0
    gen_tokens_per_s: float = 0.0
    gpu_util: float | None = None  # 0..1, mean over its GPUs; None: no GPU reading
    gpu_mem_used_bytes: int | None = None  # summed over its GPUs
    gpu_mem_total_bytes: int | None = None
    served: int = 0
    faults: int = 0
    started_ms: float = 0.0
    ts_ms: float = 0.0  # its heartbeat's (or report's) time


class QueueDepth(Base, frozen=True, kw_only=True):
    """One priority's requests in LLM_REQ, from JetStream (consumer and stream state)."""

    priority: str
    pending: int = 0  # not yet delivered to any orchestrator (consumer num_pending)
    held: int = 0  # delivered, not yet acked: held by an orchestrator (num_ack_pending)
    by_class: dict[str, int] = {}  # messages in the stream per SLO class token


class OrchestratorReport(Base, frozen=True, kw_only=True, tag="orchestrator",
                         tag_field="kind"):
    """One orchestrator replica: its role, decisions and counters, the queue it sees."""

    orchestrator_id: str
    leading: bool = False
    policy: str = ""
    router: str = ""
    pd_mode: str = ""
    counters: dict[str, int] = {}  # OrchestratorStats
    rejections: dict[str, int] = {}  # ErrorReplies it published, by code
    accepted: dict[str, int] = {}  # requests held, by "<priority>/<slo_class>"
    routed: dict[str, int] = {}  # routing decisions by "<role>/<pool|worker>"
    held: dict[str, int] = {}  # its ledger: held requests per priority
    in_flight: int = 0  # dispatched (or being dispatched), terminal not seen yet
    queue: list[QueueDepth] = []
    workers_known: int = 0
    workers_ready: int = 0
    # LLM_DONE's copy of LLM_OUT's terminals (a stream source): messages behind and seconds
    # since it last heard from LLM_OUT (None: not known now). What ages out of LLM_OUT
    # before it is copied never reaches LLM_DONE (docs/guarantees.md).
    done_copy_lag: int | None = None
    done_copy_idle_s: float | None = None
    instances: list[Heartbeat] = []  # on `status` only
    started_ms: float = 0.0
    ts_ms: float = 0.0


Report = OrchestratorReport | WorkerReport


class InstancesReply(Base, frozen=True, kw_only=True):
    orchestrator_id: str
    instances: list[Heartbeat] = []
    ts_ms: float = 0.0


class RequestQuery(Base, frozen=True, kw_only=True):
    request_id: str
    group: str = "i"


class RequestPhase(enum.StrEnum):
    """Where a request is; ordered by `rank` (a later phase wins when answers differ)."""

    NOT_FOUND = "not_found"
    QUEUED = "queued"  # in LLM_REQ, held by an orchestrator
    DISPATCHED = "dispatched"  # its work is stored in LLM_WORK, no worker runs it yet
    PREFILL = "prefill"  # a worker runs it; no token yet
    DECODING = "decoding"  # its first token is out
    COMPLETED = "completed"  # Final (stop / length)
    FAILED = "failed"  # ErrorReply
    CANCELLED = "cancelled"  # Final (cancelled)

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def terminal(self) -> bool:
        return self.rank >= _RANK[RequestPhase.COMPLETED]


_RANK = {p: i for i, p in enumerate(RequestPhase)}


class RequestStatus(Base, frozen=True, kw_only=True):
    """One request's phase with what is known of its timeline (ms since the epoch)."""

    request_id: str
    phase: RequestPhase
    source: str = ""  # who answered: orchestrator:<id>, worker:<id>, LLM_DONE
    orchestrator_id: str = ""
    worker_id: str = ""
    priority: str = ""
    slo_class: str = ""
    queued_ms: float = 0.0  # stored in LLM_REQ
    dispatched_ms: float = 0.0
    started_ms: float = 0.0  # a worker began running it
    first_token_ms: float = 0.0
    finished_ms: float = 0.0
    tokens: int = 0  # completion tokens so far
    finish_reason: str = ""
    error_code: str = ""
    message: str = ""


report_decoder = msgspec.json.Decoder(Report)
worker_report_decoder = msgspec.json.Decoder(WorkerReport)
instances_decoder = msgspec.json.Decoder(InstancesReply)
request_query_decoder = msgspec.json.Decoder(RequestQuery)
request_status_decoder = msgspec.json.Decoder(RequestStatus)

CONTROL_TYPES: dict[str, type[Any]] = {
    "WorkerReport": WorkerReport,
    "OrchestratorReport": OrchestratorReport,
    "InstancesReply": InstancesReply,
    "RequestQuery": RequestQuery,
    "RequestStatus": RequestStatus,
}

__all__ = [
    "CONTROL_TYPES",
    "INSTANCES_VERB",
    "INSTANCE_VERB",
    "METRICS_VERB",
    "REQUEST_VERB",
    "STATUS_VERB",
    "HistogramData",
    "InstanceView",
    "InstancesReply",
    "OrchestratorReport",
    "OutcomeCount",
    "QueueDepth",
    "RateWindow",
    "Report",
    "RequestPhase",
    "RequestQuery",
    "RequestStatus",
    "SloCount",
    "WorkerReport",
    "instances_decoder",
    "report_decoder",
    "request_query_decoder",
    "request_status_decoder",
    "worker_report_decoder",
]
