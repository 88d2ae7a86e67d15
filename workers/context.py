"""What every work item's handling shares: the worker's context and the outcome kinds.

One `ServeContext` per worker; `serve.py` (running an item) and `migrate.py`
(work that may have run before) use it. Publishing helpers here store before
they return, or raise `NotStored`: the caller acks a work message only after
they did. Which state each run is in is the run ledger's (`runs`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Container
from dataclasses import dataclass, field
from typing import NoReturn

from nats.aio.client import Client as NATS
from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from cplane.bus.claims import Claims
from cplane.bus.outcome import StoredPublisher, error_reply, send_again, terminal_msg_id
from cplane.bus.replay import last_chunk, stored_count, stored_seqs, stored_terminal
from cplane.bus.stored_retry import StoreResult, publish_until_stored
from cplane.bus.stream_config import replicas_of
from cplane.schemas import trace
from cplane.schemas.codec import encode
from cplane.schemas.messages import (
    ErrorCode,
    ErrorReply,
    Final,
    Role,
    TokenChunk,
    WorkBatch,
    WorkItem,
)
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import Subjects, model_target
from cplane.workers.chunker import ChunkStream
from cplane.workers.engines.base import Engine
from cplane.workers.fence import Fence, cancel_requested, fenced
from cplane.workers.latency import LatencyAverages
from cplane.workers.run_fence import Superseded, close_run_fence
from cplane.workers.runs import RunLedger
from cplane.workers.stats import WorkerStats

log = logging.getLogger("cplane.worker")
_RETRY_S = 0.5


class Outcome(enum.StrEnum):
    """What became of one run: stored before the message is acked, except the
    two engine faults (nothing stored yet: the runtime judges its engine, then
    serves the run again and it leaves, handed back or with its error)."""

    FINAL = "final"  # Final published (cancelled ones included)
    ERROR = "error"  # ErrorReply published (the request's fault, or bounds reached)
    HANDOFF = "handoff"  # decode item published (prefill role)
    HANDBACK = "handback"  # back to its model's pool (drain, unhealthy, engine fault)
    SKIPPED = "skipped"  # its terminal was already stored: nothing to do
    ENGINE_FAULT = "engine_fault"  # the engine failed on it: not stored yet
    ENGINE_DEAD = "engine_dead"  # EngineDeadError: not stored yet


class NotStored(Exception):
    """An outcome JetStream did not store (refused, or unanswered for half the
    duplicate window): the message that carries the item stays unacked."""


def _not_stored(item: WorkItem, result: StoreResult) -> NoReturn:
    """Why a terminal was not stored, raised: the run was lost (cancelled, while
    it tried), a newer run fence refused it, or no try was answered in time."""
    if cancel_requested():
        raise asyncio.CancelledError
    rid = item.request.request_id
    if result is StoreResult.CONFLICT:
        raise Superseded(f"{rid}: another run took it over (a newer run fence than "
                         f"#{item.fence_seq}): this run's terminal is refused")
    raise NotStored(f"terminal of {rid}: {result.value}")


@dataclass(slots=True)
class ServeContext:
    """What every item needs; one per worker."""

    nc: NATS
    js: JetStreamContext
    settings: Settings
    store: StoredPublisher
    engine: Engine
    worker_id: str
    role: Role
    runs: RunLedger = field(default_factory=RunLedger)  # every run here, by state
    claims: Claims | None = None  # runs that may overlap another claim their request
    cancelled: Container[str] = frozenset()  # request ids cancelled (bus/cancels.py)
    # Open while connected and sure of what it runs (see ChunkStream): closed on a
    # disconnect, opened again once every running item is claimed or given up.
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    # Until when publishing for the runs held here needs no check (workers/fence.py).
    fence: Fence | None = None

    subjects: Subjects = field(init=False)
    # Other workers: (last heartbeat, monotonic s; its process's start, ms since
    # the epoch), and when this worker last (re)connected.
    peers: dict[str, tuple[float, float]] = field(default_factory=dict)
    connected_since: float = field(default_factory=time.monotonic)
    latency: LatencyAverages = field(default_factory=LatencyAverages)
    stats: WorkerStats = field(init=False)  # what workers/metrics.py exports
    counts: dict[str, int] = field(default_factory=lambda: {
        "finals": 0, "errors": 0, "handoffs": 0, "handbacks": 0, "cancelled": 0,
        "skipped": 0, "migrated": 0, "dead_letters": 0, "engine_faults": 0,
    })

    def still_streaming(self, chunk: TokenChunk) -> bool:
        """Whether the process that streamed `chunk` may still be running its request.

        No, when that worker has been silent for worker_timeout_s (counted from
        this worker's own last reconnect too: heartbeats pause with the broker),
        when the process beating under its id started after the chunk (a
        restart with the same id), or when nothing was streamed for a long while.
        """
        timeout = self.settings.orchestrator.worker_timeout_s
        if time.time() * 1000 - chunk.ts_ms > 3 * timeout * 1000:
            return False
        last, started_ms = self.peers.get(chunk.worker_id, (0.0, 0.0))
        if started_ms > chunk.ts_ms:
            return False
        return time.monotonic() - max(last, self.connected_since) < timeout

    def __post_init__(self) -> None:
        self.gate.set()
        self.subjects = self.settings.subjects  # built once (Settings builds one per call)
        self.stats = WorkerStats(self.worker_id, self.settings, self.runs)

    @property
    def max_attempts(self) -> int:
        """An item runs at most this many times (1 + max_migrations)."""
        return 1 + self.settings.worker.max_migrations

    def model_of(self, item: WorkItem) -> str:
        """The model the item runs on here (a request naming none takes ours)."""
        return item.request.model or self.engine.models[0]

    @property
    def epoch(self) -> int:
        """Reconnects of this worker's connection so far."""
        return int(self.nc.stats.get("reconnects", 0))

    async def publish_terminal(self, item: WorkItem, msg: Final | ErrorReply,
                               stream: ChunkStream | None = None) -> None:
        """Store the terminal on `llm.done` (and send it to reply_to when asked).

        The same bytes are retried until JetStream stores them (a broker
        restart), for up to half the duplicate window (bus/stored_retry.py): a
        live reader that got a copy while the store failed sees the identical
        terminal again, never a second, different one. When the connection
        dropped while `stream` was streaming, chunks that never reached LLM_OUT
        (lost in a socket buffer) are re-sent first, so the Final never counts
        a chunk nobody has. Raises NotStored when it was not stored, Superseded
        when the store refused it under a newer run fence.
        """
        await fenced(self.fence)  # a lost run's terminal never goes out
        req = item.request
        window_s = self.settings.streams.out.duplicate_window_s
        deadline = time.monotonic() + window_s / 2
        data = encode(msg)
        # The terminal of a stream is the run's, under its chunks' fence: refused once
        # another run took the request over (run_fence.py). One without (an error
        # before any chunk, a dead letter) closes no text of its own.
        headers = dict(stream.store_fence) if stream is not None else {}
        if item.traceparent:
            headers[trace.HEADER] = item.traceparent

        async def ready(failed: Exception | None) -> None:
            """Before each try: connected, every chunk stored, the reply_to copy sent."""
            if failed is not None:
                log.info("terminal of %s not stored yet (%r): retrying", req.request_id, failed)
            await self._until_connected(deadline)
            if stream is not None and stream.sent and (
                    failed is not None or stream.epoch != self.epoch):
                await self._resend_lost(item, stream, deadline)
            if req.reply_to:
                await self.nc.publish(req.reply_to, data, headers=headers or None)

        if (req.reply_to or not self.nc.is_connected or not self.gate.is_set()
                or (stream is not None and stream.sent and stream.epoch != self.epoch)):
            await ready(None)  # else (the common case) ready as it is
        elif stream is not None and stream.sent and self._replicated_out:
            await self._all_stored(item, stream, deadline)
        result = await publish_until_stored(
            self.store, self.subjects.done_store(req.group, req.request_id), data,
            terminal_msg_id(req.group, req.request_id), window_s=window_s, headers=headers or None,
            still_valid=lambda: not self.nc.is_closed and not cancel_requested(),
            on_retry=ready, retry_s=_RETRY_S)
        if not result.stored:
            _not_stored(item, result)
        if result is StoreResult.DUPLICATE:
            # A terminal with this id was stored before (the same id run again within
            # the window): the stream kept that one and republishes nothing now, so
            # a copy published after it gets the stored one here, not this run's.
            await self._resend_stored_terminal(item)
        self.store.terminal_stored(self.subjects, msg)
        await self._close_fence(item)
        key = "finals" if isinstance(msg, Final) else "errors"
        self.counts[key] += 1
        if isinstance(msg, Final):
            self.stats.finished(item, msg)
        else:
            self.stats.failed(item, msg.code)

    async def _close_fence(self, item: WorkItem) -> None:
        """A run that took its request over (it wrote a run fence) and stored the
        terminal: its fence goes with max_age, as the request's chunks do."""
        if item.fence_seq and self.run_fences:
            await close_run_fence(self.js, self.subjects, item, self.worker_id,
                                  self.settings.worker.publish_timeout_s)

    async def _resend_stored_terminal(self, item: WorkItem) -> None:
        req = item.request
        stored = await stored_terminal(self.js, self.settings, req.group, req.request_id)
        if stored is not None:  # not to readers that had it (our own earlier try too)
            await send_again(self.nc, self.subjects, item, stored)

    async def _until_connected(self, deadline: float) -> None:
        """Publish nothing into nats-py's reconnect buffer: it is dropped (see drop_pending)."""
        while not self.nc.is_connected or not self.gate.is_set():
            if self.nc.is_closed:
                raise ConnectionClosedError
            if time.monotonic() > deadline:
                raise TimeoutError("not connected")
            await asyncio.sleep(0.05)

    @property
    def run_fences(self) -> bool:
        """Outputs carry run fences (run_fence.py) on a single broker only: a replicated
        LLM_OUT refuses a publish that names a subject's last sequence while an earlier
        one naming it is still in flight, which would drop a stream's chunks."""
        return not self._replicated_out

    @property
    def _replicated_out(self) -> bool:
        return replicas_of(self.settings, self.settings.streams.out) > 1

    async def _all_stored(self, item: WorkItem, stream: ChunkStream, deadline: float) -> None:
        """On a cluster (LLM_OUT replicated), before the Final: every chunk stored.

        Chunks are core publishes that the stream's leader stores; while a
        cluster elects a new leader for LLM_OUT (a node killed or hung) the
        ones published meanwhile are dropped, with no reconnect to tell. One
        count per request (not an ack per chunk) says whether any is missing;
        then the missing ones are found and re-sent before the Final goes."""
        req = item.request
        try:
            have = await stored_count(self.js, self.settings, req.group, req.request_id)
        except (TimeoutError, NatsError):
            have = -1  # unanswered (an election): look chunk by chunk, with retries
        if have < stream.next_seq:
            await self._resend_lost(item, stream, deadline)

    async def _resend_lost(self, item: WorkItem, stream: ChunkStream, deadline: float) -> None:
        """Re-send the chunks LLM_OUT lacks; retried (the broker is back, its API
        perhaps not yet) until `deadline`, since the terminal must not go first."""
        req = item.request
        while True:
            try:
                have = await stored_seqs(self.js, self.settings, req.group, req.request_id,
                                         stream.first_seq)
                lost = [q for q in range(stream.first_seq, stream.next_seq) if q not in have]
                if lost:
                    log.info("re-sending %d chunks of %s lost in a reconnect", len(lost),
                             req.request_id)
                    await stream.resend(lost)
                    await self.nc.flush()
                stream.epoch = self.epoch
                return
            except (TimeoutError, NatsError):
                if self.nc.is_closed or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(_RETRY_S)
                await self._until_connected(deadline)

    async def resend_tail(self, item: WorkItem, stream: ChunkStream) -> None:
        """Right after a reconnect, before anything new goes out: re-send the chunks
        sent after the last one LLM_OUT holds (a lost connection loses a tail of
        what was sent, never a middle: one read). Closes the gap at once, so a
        successor of a run stopped later never finds a hole in the stream."""
        if stream.epoch == self.epoch or not stream.sent:
            return
        req = item.request
        last = await last_chunk(self.js, self.settings, req.group, req.request_id)
        start = stream.first_seq if last is None else max(stream.first_seq, last.seq + 1)
        lost = list(range(start, stream.next_seq))
        if lost:
            log.info("re-sending %d chunks of %s lost in a reconnect", len(lost),
                     req.request_id)
            await stream.resend(lost)
        stream.epoch = self.epoch

    async def publish_error(
        self, item: WorkItem, code: ErrorCode, message: str, retryable: bool = False
    ) -> None:
        err = error_reply(item.request.request_id, code, message, retryable)
        await self.publish_terminal(item, err)

    async def publish_work(self, role: Role, item: WorkItem, tag: str = "") -> None:
        """Store `item` on its model's pool of `role`. The Nats-Msg-Id is fixed by
        the hand-off (request, role, attempt, next_seq, tag), so a retried publish
        is stored once."""
        await fenced(self.fence)
        data = encode(WorkBatch(items=[item]))
        rid = self.subjects.scoped_id(item.request.group, item.request.request_id)
        msg_id = f"{rid}:{role.value}:{item.attempt}:{item.next_seq}{tag}"
        subject = self.subjects.work(role, model_target(self.model_of(item)))
        await self.store.publish(subject, data, msg_id)


