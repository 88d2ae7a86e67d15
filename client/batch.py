"""Batch jobs from the SDK: validate, store, publish, cancel (collecting: batch_collect.py).

    store = await JobStore.open(js, settings)
    check = validate_file(path, LineChecker("", max_bytes=nc.max_payload))  # every bad line
    job = await start_job(store, path, check, opts)                    # record + stored input
    await publish_lines(js, store, settings, job.id, path)             # the requests
    job = await Collector(js, store, settings, job.id).run()           # the results
    await write_results(store, settings, job.id, out, errors)          # in input order

Promises:
- A file streams through: each pass reads one line at a time (validate,
  store, publish; results are assembled from the stored copy).
- Request ids come from the job id and the custom_id, and the job id from
  the file's content and the options: the same file submitted again is the
  same job. A job whose publishing stopped half way (its submitter died)
  goes on from the last line JetStream acked; a repeated line is dropped by
  JetStream's dedup window (Nats-Msg-Id) and the orchestrator's memory.
- `publish_lines` stops at its next checkpoint (`CHECKPOINT_LINES`) once a
  cancel is recorded, and records how many lines went out.
- `cancel_job` records the cancel, waits for the publisher to stop, then
  cancels every line that went out: held or queued lines never run (the
  orchestrator finishes them `cancelled` when it holds them), running ones
  are aborted by their workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import APIError

from cplane.client.batch_collect import checker_for
from cplane.client.batch_lines import LineChecker, LineError
from cplane.client.batch_state import Resubmit, job_id_for, on_resubmit, transition
from cplane.client.batch_store import JobStore, file_lines
from cplane.client.errors import NOT_STORED, STREAM_FULL_CODES
from cplane.schemas.batch import BatchJob, JobState
from cplane.schemas.codec import encode
from cplane.schemas.messages import Priority
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import RESERVED_GROUPS, valid_token

CHECKPOINT_LINES = 256  # published counts are recorded (and a cancel noticed) this often
WINDOW = 256  # publishes awaited together
MAX_REPORTED = 50  # invalid lines listed one by one at most
_FULL_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 2.0, 2.0)


def now_ms() -> float:
    return time.time() * 1000


class InvalidFile(ValueError):
    """The file has invalid lines (and --skip-invalid was not given) or no valid one."""

    def __init__(self, errors: list[LineError], valid: int) -> None:
        shown = [str(e) for e in errors[:MAX_REPORTED]]
        if len(errors) > MAX_REPORTED:
            shown.append(f"... and {len(errors) - MAX_REPORTED} more")
        what = (f"{len(errors)} invalid line(s)" if errors else "no line") + (
            f" of {len(errors) + valid}" if errors else "")
        super().__init__(f"{what}; nothing was submitted:\n" + "\n".join(shown)
                         if shown else f"{what}; nothing was submitted")
        self.errors = errors
        self.valid = valid


@dataclass(frozen=True, slots=True)
class SubmitOptions:
    model: str = ""  # overrides every line's body.model
    priority: str = Priority.BACKGROUND.value
    slo_class: str = "batch"
    skip_invalid: bool = False
    job_id: str = ""  # "" = derived from the content and these options
    tenant: str | None = None  # the lines are this tenant's requests (schemas/batch.py)


@dataclass(frozen=True, slots=True)
class Checked:
    """What one validation pass over the file found."""

    digest: bytes
    valid: int
    errors: list[LineError]


def validate_file(path: Path, checker: LineChecker) -> Checked:
    """Check every line (one at a time) and hash the file's content."""
    h = hashlib.blake2b(digest_size=32)
    errors: list[LineError] = []
    valid = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    for n, raw in file_lines(path):
        v = checker.check(raw, n)
        if isinstance(v, LineError):
            errors.append(v)
        else:
            valid += 1
    return Checked(h.digest(), valid, errors)


def check_options(opts: SubmitOptions) -> None:
    """ValueError for options no job can run with."""
    Priority(opts.priority)  # ValueError names the bad value
    if not valid_token(opts.slo_class):
        raise ValueError(f"slo class {opts.slo_class!r} is not a subject token")
    if opts.job_id and (not valid_token(opts.job_id) or opts.job_id in RESERVED_GROUPS
                        or len(opts.job_id) > 64):
        raise ValueError(f"job id {opts.job_id!r} must be a subject token of at most 64 "
                         "characters and not a reserved group")


async def start_job(store: JobStore, path: Path, checked: Checked, opts: SubmitOptions,
                    max_request_bytes: int) -> tuple[BatchJob, Resubmit | None]:
    """Create the job record and store its input; or find the job this file already is.

    Returns (job, None) for a new job, (job, what to do) for an existing one.
    Raises InvalidFile when the file cannot run as asked.
    """
    if checked.valid == 0 or (checked.errors and not opts.skip_invalid):
        raise InvalidFile(checked.errors, checked.valid)
    job_id = opts.job_id or job_id_for(checked.digest, opts.model, opts.priority,
                                       opts.slo_class)
    t = now_ms()
    job = BatchJob(id=job_id, state=JobState.VALIDATING, input_file=path.name,
                   model=opts.model, priority=opts.priority, slo_class=opts.slo_class,
                   tenant=opts.tenant, max_request_bytes=max_request_bytes, total=checked.valid,
                   invalid=len(checked.errors), created_ms=t, updated_ms=t)
    if not await store.create(job):
        return await store.require(job_id), on_resubmit(await store.require(job_id))
    try:
        name = await store.put_input(job_id, path)
    except Exception as exc:
        why = f"storing the input: {exc}"
        await store.update(job_id, lambda j: transition(j, JobState.FAILED, now_ms(), error=why))
        raise

    def stored(j: BatchJob) -> BatchJob:
        if j.state is JobState.CANCELLING:  # cancelled while validating: nothing goes out
            return msgspec.structs.replace(j, input_object=name, publishing_done=True)
        return transition(j, JobState.IN_PROGRESS, now_ms(), input_object=name)

    return await store.update(job_id, stored), None


async def _publish(js: JetStreamContext, subject: str, data: bytes, rid: str) -> None:
    """One line, retried with backoff while the request stream is full (batch waits)
    or answers nothing (a cluster electing its leader: nothing was stored)."""
    for pause in (*_FULL_BACKOFF_S, None):
        try:
            await js.publish(subject, data, headers={"Nats-Msg-Id": rid})
            return
        except NOT_STORED:
            if pause is None:
                raise
        except APIError as exc:
            if exc.err_code not in STREAM_FULL_CODES or pause is None:
                raise
        await asyncio.sleep(pause)


async def publish_lines(js: JetStreamContext, store: JobStore, settings: Settings,
                        job_id: str, path: Path,
                        progress: Callable[[BatchJob], None] | None = None,
                        checkpoint_lines: int = CHECKPOINT_LINES) -> BatchJob:
    """Publish the job's lines after those already recorded as published; see the promises."""
    job = await store.require(job_id)
    if job.state is not JobState.IN_PROGRESS:  # cancelled (or failed) before anything went out
        return await store.update(job_id, lambda j: j if j.publishing_done else
                                  msgspec.structs.replace(j, publishing_done=True))
    checker = checker_for(job, settings)
    subject = settings.subjects.request(job.priority, job.slo_class, job.tenant)
    prio = Priority(job.priority)
    start = job.published  # lines out before (a resumed submit)
    published, seen, stopped, last_checkpoint = start, 0, False, start
    window: list[tuple[bytes, str]] = []

    def record(j: BatchJob) -> BatchJob:
        nonlocal stopped
        stopped = j.state is not JobState.IN_PROGRESS  # cancelling (or failed): stop here
        n = max(j.published, published)
        return msgspec.structs.replace(j, published=n, updated_ms=now_ms(),
                                       publishing_done=stopped or n >= j.total)

    async def send() -> None:
        nonlocal published
        await asyncio.gather(*(_publish(js, subject, d, rid) for d, rid in window))
        published += len(window)
        window.clear()

    async def checkpoint() -> BatchJob:
        await send()
        j = await store.update(job_id, record)
        if progress:
            progress(j)
        return j

    for n, raw in file_lines(path):
        v = checker.check(raw, n)
        if isinstance(v, LineError):
            continue
        seen += 1
        if seen <= start:
            continue
        req = msgspec.structs.replace(v.request, priority=prio, slo_class=job.slo_class,
                                      created_ms=now_ms(), tenant=job.tenant)
        window.append((encode(req), req.request_id))
        if len(window) >= min(WINDOW, checkpoint_lines):
            await send()
        if published - last_checkpoint >= checkpoint_lines:
            last_checkpoint = published
            job = await checkpoint()
            if stopped:
                return job
    return await checkpoint()


async def cancel_job(nc: NATS, store: JobStore, settings: Settings, job_id: str,
                     wait_s: float = 5.0) -> tuple[BatchJob, int]:
    """Record the cancel, wait for publishing to stop, cancel every line sent.

    Returns (the job, how many cancels went out). A finished job is left as
    it is (0 cancels). When no publisher acknowledges within `wait_s` (the
    submitter is gone), the lines up to one checkpoint past the recorded
    count are cancelled too, since they may have gone out unrecorded.
    """
    job = await store.require(job_id)
    if job.state.terminal:
        return job, 0
    job = await store.update(job_id, lambda j: j if j.state.terminal else transition(
        j, JobState.CANCELLING, now_ms()))
    if job.state.terminal:
        return job, 0
    deadline = time.monotonic() + wait_s
    while not job.publishing_done and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        job = await store.require(job_id)
    slack = 0
    if not job.publishing_done:
        slack = CHECKPOINT_LINES + WINDOW
        job = await store.update(job_id, lambda j: msgspec.structs.replace(
            j, publishing_done=True, updated_ms=now_ms()))
    bound = min(job.total, job.published + slack)
    checker = checker_for(job, settings)
    sent = 0
    async with store.input_file(job_id) as path:
        for n, raw in file_lines(path):
            if sent >= bound:
                break
            v = checker.check(raw, n)
            if not isinstance(v, LineError):
                await nc.publish(settings.subjects.cancel(v.request.request_id, job.tenant),
                                 b"")
                sent += 1
    await nc.flush()
    return job, sent


__all__ = ["CHECKPOINT_LINES", "Checked", "InvalidFile", "SubmitOptions", "cancel_job",
           "check_options", "publish_lines", "start_job", "validate_file"]
