"""Collecting a batch job's results, and writing them out in input order.

`Collector.run()` reads the job's terminals from LLM_DONE
(`<prefix>.s.done.<job>.*`) through one durable pull consumer per job and
stores them, as JSON lines, in result parts in the object store
(`<job>/results/<n>`). A terminal is acked only after the part holding it
is stored, so a collector killed at any moment loses nothing: its unacked
terminals come again (after `ACK_WAIT_S`) to whichever collector runs next
(`cplane batch results`), and what it stored is read back from the parts.
Repeats (a terminal stored and redelivered) are dropped by request id, so
each line has exactly one result. Several collectors of one job may run at
once (the submitter and `batch results`): they share the consumer, number
their parts through the job record, and read each other's parts.

It ends when every result the job waits for is in (`batch_state.all_in`),
then closes the job: `completed`, or `cancelled` after a cancel.

`write_results()` streams the stored input and puts each line's result (or
why it has none) in the output or errors file, in input order. Results are
first spilled to a temporary file with an index by request id, so memory
holds offsets, not completions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import msgspec
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from cplane.client.batch_lines import (
    LineChecker,
    LineError,
    invalid_line,
    not_run_line,
    output_line,
    succeeded,
)
from cplane.client.batch_state import all_in, finished_state, transition
from cplane.client.batch_store import JobStore, file_lines
from cplane.schemas.batch import BatchJob, JobState
from cplane.schemas.codec import final_decoder
from cplane.schemas.messages import ErrorReply, Final
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import scoped

log = logging.getLogger("cplane.batch")
ACK_WAIT_S = 5.0  # a dead collector's unacked terminals come back after this
PART_LINES = 1000  # results per part at most...
FLUSH_S = 0.5  # ...or this long after the first one waited
FETCH = 500
CONSUMER_IDLE_S = 86_400.0  # an abandoned job's consumer goes away after a day
_line_encoder = msgspec.json.Encoder()

Progress = Callable[["Collected"], None]


def now_ms() -> float:
    return time.time() * 1000


def consumer_name(job_id: str) -> str:
    return f"collect-{job_id}"


@dataclass(slots=True)
class Collected:
    """What one collector knows: the job record and the distinct results seen."""

    job: BatchJob
    ok: int = 0
    failed: int = 0

    @property
    def done(self) -> int:
        return self.ok + self.failed


def checker_for(job: BatchJob, settings: Settings) -> LineChecker:
    """The checker that classifies the stored input exactly as the submit did."""
    return LineChecker(job.id, model=job.model, limits=settings.limits,
                       max_bytes=job.max_request_bytes)


async def job_request_ids(store: JobStore, job: BatchJob, settings: Settings) -> set[str]:
    """The request ids of the job's valid lines (terminals of anything else are not its)."""
    checker = checker_for(job, settings)
    async with store.input_file(job.id) as path:
        return {v.request.request_id for n, raw in file_lines(path)
                if not isinstance(v := checker.check(raw, n), LineError)}


class Collector:
    def __init__(self, js: JetStreamContext, store: JobStore, settings: Settings, job_id: str,
                 *, progress: Progress | None = None, ack_wait_s: float = ACK_WAIT_S) -> None:
        self.js = js
        self.ack_wait_s = ack_wait_s
        self.store = store
        self.settings = settings
        self.job_id = job_id
        self.progress = progress
        self.seen: set[str] = set()
        self._ids: set[str] = set()
        self._parts_read: set[int] = set()
        self.state: Collected

    async def run(self, stop: asyncio.Event | None = None) -> BatchJob:
        """Collect until the job's results are all in (or `stop`); returns the job record."""
        job = await self.store.require(self.job_id)
        self.state = Collected(job)
        if job.state.terminal:
            return job
        self._ids = await job_request_ids(self.store, job, self.settings)
        await self._read_parts(job)
        sub = await self._subscribe()
        try:
            while not (stop and stop.is_set()):
                job = self.state.job = await self.store.require(self.job_id)
                if job.state.terminal:
                    break
                if all_in(job, len(self.seen)):
                    job = await self._close()
                    break
                if not await self._take(sub):  # idle: another collector may have stored some
                    await self._read_parts(await self.store.require(self.job_id))
            return self.state.job
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if self.state.job.state.terminal:
                with contextlib.suppress(NotFoundError):
                    await self.js.delete_consumer(self.settings.streams.done.name,
                                                  consumer_name(self.job_id))

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        stream = self.settings.streams.done.name
        cfg = ConsumerConfig(
            durable_name=consumer_name(self.job_id),
            filter_subject=self.settings.subjects.done_store_of(
                scoped(self.state.job.tenant, self.job_id)),
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s, max_ack_pending=4 * PART_LINES, max_deliver=-1,
            inactive_threshold=CONSUMER_IDLE_S)
        with contextlib.suppress(Exception):  # exists already (another collector): bind to it
            await self.js.add_consumer(stream, cfg)
        return await self.js.pull_subscribe_bind(consumer_name(self.job_id), stream=stream)

    async def _take(self, sub: JetStreamContext.PullSubscription) -> bool:
        """Fetch, keep new results, store them as one part, then ack; False when idle."""
        lines: list[bytes] = []
        msgs = []
        ok = failed = 0
        deadline = time.monotonic() + FLUSH_S
        while len(lines) < PART_LINES and time.monotonic() < deadline:
            try:
                batch = await sub.fetch(FETCH, timeout=max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                break
            for msg in batch:
                msgs.append(msg)
                term = self._decode(msg.subject, msg.data)
                if term is None or term.request_id in self.seen:
                    continue
                self.seen.add(term.request_id)
                lines.append(msg.data)
                if succeeded(term):
                    ok += 1
                else:
                    failed += 1
        if lines:
            await self._store_part(lines, ok, failed)
        for msg in msgs:  # repeats and strangers too: they have been dealt with
            await msg.ack()
        return bool(msgs)

    def _decode(self, subject: str, data: bytes) -> Final | ErrorReply | None:
        """The terminal in `data` if it is one of this job's lines' (on its own subject)."""
        try:
            term = final_decoder.decode(data)
        except msgspec.DecodeError:
            log.warning("%s: dropped an undecodable terminal on %s", self.job_id, subject)
            return None
        if term.request_id not in self._ids or (subject and not subject.endswith(
                "." + term.request_id)):
            log.warning("%s: dropped a terminal of %r: not a line of this job", self.job_id,
                        term.request_id)
            return None
        return term

    async def _store_part(self, lines: list[bytes], ok: int, failed: int) -> None:
        def reserve(job: BatchJob) -> BatchJob:
            return msgspec.structs.replace(job, parts=job.parts + 1, updated_ms=now_ms())

        n = (await self.store.update(self.job_id, reserve)).parts - 1
        await self.store.put_part(self.job_id, n, b"\n".join(lines) + b"\n")
        self._parts_read.add(n)
        self.state.ok += ok
        self.state.failed += failed

        def count(job: BatchJob) -> BatchJob:
            return msgspec.structs.replace(job, completed=job.completed + ok,
                                           failed=job.failed + failed, updated_ms=now_ms())

        self.state.job = await self.store.update(self.job_id, count)
        if self.progress:
            self.progress(self.state)

    async def _read_parts(self, job: BatchJob) -> None:
        """Take in the results of parts this collector has not read (others' work)."""
        for n in range(job.parts):
            if n in self._parts_read:
                continue
            data = await self.store.get_part(self.job_id, n)
            if data is None:  # reserved, not (yet) written
                continue
            self._parts_read.add(n)
            for raw in data.splitlines():
                term = self._decode("", raw)
                if term is not None and term.request_id not in self.seen:
                    self.seen.add(term.request_id)
                    if succeeded(term):
                        self.state.ok += 1
                    else:
                        self.state.failed += 1
        if self.progress:
            self.progress(self.state)

    async def _close(self) -> BatchJob:
        """Every expected result is in: finalizing, then completed (or cancelled)."""
        ok, failed = self.state.ok, self.state.failed

        def close(job: BatchJob) -> BatchJob:
            if job.state.terminal:
                return job
            end = finished_state(job)
            job = transition(job, JobState.FINALIZING, now_ms())
            return transition(job, end, now_ms(), completed=ok, failed=failed)

        self.state.job = await self.store.update(self.job_id, close)
        if self.progress:
            self.progress(self.state)
        return self.state.job


def _rid(raw: bytes) -> str:
    try:
        return final_decoder.decode(raw).request_id
    except msgspec.DecodeError:
        return ""


@dataclass(frozen=True, slots=True)
class Written:
    ok: int  # lines in the output file
    errors: int  # lines in the errors file
    missing: int  # valid lines with no result yet (the job is not finished)


async def _spill(store: JobStore, job: BatchJob, fh: IO[bytes]) -> dict[str, tuple[int, int]]:
    """Every stored result into `fh`; request id -> (offset, length), the first one wins."""
    index: dict[str, tuple[int, int]] = {}
    for n in range(job.parts):
        data = await store.get_part(job.id, n)
        for raw in (data or b"").splitlines():
            rid = _rid(raw)
            if rid and rid not in index:
                index[rid] = (fh.tell(), len(raw))
                fh.write(raw)
    fh.flush()
    return index


async def write_results(store: JobStore, settings: Settings, job_id: str, output: Path,
                        errors: Path) -> Written:
    """Write the job's output and errors files in input order (see the module's doc)."""
    job = await store.require(job_id)
    checker = checker_for(job, settings)
    ok = errs = missing = 0
    with tempfile.TemporaryFile() as spill:
        index = await _spill(store, job, spill)
        async with store.input_file(job_id) as path:
            with output.open("wb") as out, errors.open("wb") as err:
                for n, raw in file_lines(path):
                    v = checker.check(raw, n)
                    if isinstance(v, LineError):
                        err.write(_line_encoder.encode(invalid_line(v)) + b"\n")
                        errs += 1
                        continue
                    where = index.get(v.request.request_id)
                    if where is None:
                        if job.state is not JobState.CANCELLED:
                            missing += 1
                            continue
                        err.write(_line_encoder.encode(not_run_line(v)) + b"\n")
                        errs += 1
                        continue
                    spill.seek(where[0])
                    good, line = output_line(v, final_decoder.decode(spill.read(where[1])))
                    (out if good else err).write(_line_encoder.encode(line) + b"\n")
                    ok, errs = (ok + 1, errs) if good else (ok, errs + 1)
    return Written(ok, errs, missing)


__all__ = ["ACK_WAIT_S", "Collected", "Collector", "Written", "consumer_name",
           "job_request_ids", "write_results"]
