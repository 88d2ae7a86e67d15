"""Wire messages: the single source of truth for what crosses NATS.

JSON on the wire so any language can publish. Evolution rules (msgspec's):
new fields get defaults, field types never change, readers ignore unknown
fields. Times are milliseconds since the Unix epoch (`*_ms`) unless named
otherwise; durations are milliseconds too.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

SCHEMA_VERSION = 1


class Priority(enum.StrEnum):
    """Request priority; the subject token of `llm.req.<priority>.<slo_class>`."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"
    BACKGROUND = "background"

    @property
    def level(self) -> int:
        """0 for CRITICAL ... 4 for BACKGROUND (lower runs first)."""
        return _LEVEL[self]


PRIORITIES: tuple[Priority, ...] = tuple(Priority)
_LEVEL = {p: i for i, p in enumerate(PRIORITIES)}


class Role(enum.StrEnum):
    """What a worker does with a work item."""

    UNIFIED = "unified"  # prefill and decode in one engine
    PREFILL = "prefill"  # prompt only; hands a decode item on
    DECODE = "decode"  # continues after the prefill's first token


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # llm.cancel.<id> or client abort
    ABORT = "abort"  # the engine aborted it (e.g. shutdown without hand-back)


class ErrorCode(enum.StrEnum):
    INVALID_REQUEST = "invalid_request"  # not JSON, wrong fields, bad values
    UNKNOWN_MODEL = "unknown_model"
    PROMPT_TOO_LONG = "prompt_too_long"
    OVERLOADED = "overloaded"
    ENGINE_ERROR = "engine_error"
    INTERNAL = "internal"
    # Delivered `max_deliveries` times without an outcome (a request that keeps
    # crashing the orchestrator, work that keeps crashing workers); evidence on
    # `llm.dlq.<stream>.<seq>`.
    DEAD_LETTER = "dead_letter"
    # Its workers died `max_migrations` times mid-generation; retryable.
    WORKER_FAILED = "worker_failed"
    # No live worker served the model within the wait bound; retryable.
    MODEL_UNAVAILABLE = "model_unavailable"
    # max_tokens, prompt size or body size above the configured limits.
    TOO_LARGE = "too_large"
    # Its cost_budget is below what the cheapest pool that can serve it charges.
    OVER_BUDGET = "over_budget"
    # Not allowed to its publisher: a priority above the tenant's ceiling, a body
    # naming another tenant, an id in use by another tenant's request.
    FORBIDDEN = "forbidden"
    # Above its tenant's request rate or in-flight cap; retryable (retry_after_ms).
    RATE_LIMITED = "rate_limited"


class WorkerState(enum.StrEnum):
    """`Heartbeat.state`: only READY workers get work."""

    READY = "ready"
    DRAINING = "draining"  # finishing what it holds, taking nothing new
    UNHEALTHY = "unhealthy"  # its engine died or keeps failing; takes nothing new
    STOPPED = "stopped"  # last heartbeat: forget it at once


class Base(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """Root of every wire struct: immutable, compact (defaults omitted)."""


class ChatMessage(Base, frozen=True, kw_only=True):
    role: str
    content: str


class Request(Base, frozen=True, kw_only=True):
    """What a client publishes to `llm.req.<priority>.<slo_class>`.

    Exactly one of `prompt`, `prompt_token_ids` or `messages` is given.
    `priority` and `slo_class` default to the subject's tokens; when the body
    names them too, the subject wins (it is the queue the request sat in).
    Publish with header `Nats-Msg-Id: <request_id>` for server-side dedup.
    """

    request_id: str
    model: str = ""  # "" = any model the fleet serves
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    # sampling
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off (vLLM's convention)
    stop: list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    # scheduling metadata (the seeds' RequestMetadata)
    priority: Priority | None = None
    slo_class: str | None = None
    slo_deadline_ms: float | None = None  # end-to-end budget from publish, ms
    ttft_target_ms: float | None = None
    tpot_target_ms: float | None = None
    cost_budget: float | None = None  # currency units for this request
    # GPUs one engine must span (tensor x pipeline parallel): the request runs only on
    # workers whose heartbeats report that layout, or is refused (model_unavailable,
    # naming the layouts served) once none has come within orchestrator.model_wait_s.
    # 0 = any layout.
    parallelism_hint: int = 0
    user_id: str | None = None
    tenant: str | None = None
    session_id: str | None = None
    # The publisher minted request_id for this very request (never published before:
    # the gateway's ids, a fresh UUID), so no earlier run can have stored a terminal
    # under it: the orchestrator skips that lookup, a round trip on the way to the
    # first token. A wrong claim only lets the publisher's own id run again.
    fresh_id: bool = False
    # delivery
    group: str = "i"  # output subject group: "i" interactive, else batch job id
    reply_to: str | None = None  # extra core-NATS subject that also gets every output
    created_ms: float | None = None  # client clock at publish, for latency accounting
    schema_version: int = SCHEMA_VERSION


class WorkItem(Base, frozen=True, kw_only=True):
    """One request as the orchestrator hands it to a worker role."""

    request: Request
    priority: Priority
    slo_class: str
    role: Role = Role.UNIFIED
    enqueued_ms: float = 0.0  # when JetStream stored the request
    dispatched_ms: float = 0.0  # when the orchestrator dispatched it
    attempt: int = 1
    # Tokens already streamed to the client (migration, or the prefill's
    # first token for a decode item); the worker continues after them.
    resume_token_ids: list[int] = []
    resume_text: str = ""
    next_seq: int = 0  # seq of the next TokenChunk to publish
    kv_transfer_params: dict[str, Any] | None = None
    served_by: list[str] = []  # worker ids that handled it so far
    ttft_ms: float | None = None  # set by the prefill for the decode's Final
    prompt_tokens: int | None = None
    orchestrator_id: str = ""
    # The orchestrator could not rule out an earlier dispatch of this request
    # (its message was redelivered): the worker looks for a stored terminal and
    # streamed chunks (LLM_DONE, LLM_OUT) before it runs it.
    redispatched: bool = False
    # W3C traceparent of the request's publish (header `traceparent`), carried per
    # item because one work message may hold many requests (schemas/trace.py).
    traceparent: str = ""
    # The LLM_OUT sequence of the run fence this item's outputs are stored under
    # (0: none written yet). A run that takes a request over writes a new fence
    # (`Subjects.fence_store`); LLM_OUT then refuses every output stored under an
    # older one, also those of a dead run still on their way (workers/run_fence.py).
    fence_seq: int = 0


class WorkBatch(Base, frozen=True, kw_only=True):
    """One LLM_WORK message: one or more items (never more than the target can take).

    The worker acks the message when every item in it is Final, handed back
    or failed.
    """

    items: list[WorkItem]


class Usage(Base, frozen=True, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cost: float = 0.0  # at the serving worker's prices below (0 = unpriced)
    # The prices that applied, per 1000 prompt / output tokens, and where they come
    # from (the worker's settings, or the GPU catalogue and its layout).
    price_in_per_1k: float = 0.0
    price_out_per_1k: float = 0.0
    price_source: str = ""


class Timings(Base, frozen=True, kw_only=True):
    """Server-side latencies of one request, milliseconds."""

    queue_ms: float = 0.0  # stored in LLM_REQ -> dispatched
    ttft_ms: float = 0.0  # stored in LLM_REQ -> first token published
    tpot_ms: float = 0.0  # (last - first token) / (completion_tokens - 1)
    e2e_ms: float = 0.0  # stored in LLM_REQ -> Final published


class TokenChunk(Base, frozen=True, kw_only=True, tag="chunk", tag_field="type"):
    """Tokens of one request, on `llm.out.<group>.<request_id>` (core publish).

    `seq` counts chunks from 0 without gaps; a client drops a seq it has seen.
    """

    request_id: str
    seq: int
    token_ids: list[int]
    text: str = ""
    ts_ms: float = 0.0  # worker clock when published
    worker_id: str = ""


class Final(Base, frozen=True, kw_only=True, tag="final", tag_field="type"):
    """Terminal success/cancel message on `llm.done.<group>.<request_id>` (JetStream)."""

    request_id: str
    finish_reason: FinishReason
    usage: Usage = Usage()
    timings: Timings = Timings()
    text: str = ""  # the whole completion, for batch collectors and late readers
    chunks: int = 0  # number of TokenChunks published before this Final
    workers: list[str] = []  # every worker that served it, in order
    model: str = ""
    ts_ms: float = 0.0


class ErrorReply(Base, frozen=True, kw_only=True, tag="error", tag_field="type"):
    """Terminal failure, on `llm.done.<group>.<request_id>` (JetStream)."""

    request_id: str
    code: ErrorCode
    message: str
    retryable: bool = False
    ts_ms: float = 0.0
    retry_after_ms: float | None = None  # overloaded: when a retry may be served


class Heartbeat(Base, frozen=True, kw_only=True):
    """Published by each worker every second on `llm.hb.<worker_id>` (core NATS)."""

    worker_id: str
    role: Role
    models: list[str]
    engine: str
    capacity: int  # concurrent sequences it will run
    running: int = 0
    waiting: int = 0
    held_items: int = 0  # work items pulled and not yet terminal
    kv_usage: float = 0.0  # 0..1
    prefix_hit_rate: float = 0.0  # 0..1
    prompt_tokens_per_s: float = 0.0
    gen_tokens_per_s: float = 0.0
    state: WorkerState = WorkerState.READY
    # Its configured price per 1000 tokens (cost_optimized routes by these).
    price_in_per_1k: float = 0.0
    price_out_per_1k: float = 0.0
    parallelism: int = 1  # GPUs its engine spans (TP x PP): Request.parallelism_hint
    # Moving averages (EWMA) over its recent requests: least_response_time.
    ttft_ms_avg: float = 0.0
    tpot_ms_avg: float = 0.0
    # Since it started: items served to the end (or handed to a decode), and
    # items its engine failed on (circuit breakers read their growth).
    served: int = 0
    faults: int = 0
    ts_ms: float = 0.0
    started_ms: float = 0.0
    # The GPUs its engine runs on (those this process sees), from NVML (workers/gpu.py):
    # utilisation 0..1 averaged over them, memory summed. None, and then not on the
    # wire, where there is no GPU or no reading (CPU machines, remote and sim engines):
    # absent, never 0.
    gpu_util: float | None = None
    gpu_mem_used_bytes: int | None = None
    gpu_mem_total_bytes: int | None = None


class KvEvents(Base, frozen=True, kw_only=True):
    """A worker's prefix-cache changes, on `llm.kv.<worker_id>` (core NATS).

    Block hashes are schemas/blocks.py's over the model's tokens, so a router
    that hashes a prompt alike finds where it is cached (precise prefix
    routing). `seq` counts from 1 within `epoch` (one engine's life); a reader
    that sees a gap asks `llm.admin.kv.<worker_id>` and gets every block held,
    as a KvEvents with `cleared` set and the current `seq`."""

    worker_id: str
    epoch: str
    seq: int
    block_tokens: int
    stored: list[int] = []
    removed: list[int] = []
    cleared: bool = False  # forget this worker's blocks before applying `stored`


class Finished(msgspec.Struct, frozen=True, array_like=True):
    """One stored terminal in a `Fin`: `[request_id, ttft_ms]` on the wire."""

    request_id: str
    # Stored in LLM_REQ -> first token stored, as the publisher measured it
    # (Final.timings.ttft_ms); -1 when no token was produced (error, early cancel).
    ttft_ms: float = -1.0


class Fin(Base, frozen=True, kw_only=True):
    """The in-flight signal on `llm.fin.<publisher>` (core NATS, best effort).

    Every publisher of terminals (worker, orchestrator) sends one per loop
    turn, naming each terminal it stored since its last: the orchestrators
    free those requests' slots and count TTFT misses. A lost signal is healed
    by the orchestrators' LLM_DONE lookup (`reconcile_after_s`)."""

    done: list[Finished]


class Cancel(Base, frozen=True, kw_only=True):
    """Optional body of `llm.cancel.<request_id>` (an empty body works too)."""

    request_id: str = ""
    reason: str = ""


class DeadLetter(Base, frozen=True, kw_only=True):
    """Evidence of a message taken out of a stream, on `llm.dlq.<stream>.<seq>` (LLM_DLQ).

    The request it belonged to (when one could be read) got an ErrorReply.
    """

    stream: str
    seq: int  # stream sequence of the message taken out
    subject: str  # subject it was published to
    reason: str
    deliveries: int = 0
    request_id: str = ""
    data: bytes = b""  # its body (base64 in JSON), cut to `max_dead_letter_bytes`
    ts_ms: float = 0.0


Output = TokenChunk | Final | ErrorReply
TERMINAL = (Final, ErrorReply)

WIRE_TYPES: dict[str, type[Any]] = {
    "Request": Request,
    "WorkBatch": WorkBatch,
    "TokenChunk": TokenChunk,
    "Final": Final,
    "ErrorReply": ErrorReply,
    "Heartbeat": Heartbeat,
    "KvEvents": KvEvents,
    "Fin": Fin,
    "Cancel": Cancel,
    "DeadLetter": DeadLetter,
}
