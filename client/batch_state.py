"""A batch job's state machine and identity. Pure: the callers store what these return.

    validating -> in_progress -> finalizing -> completed
         |             |  \\
         |             |   cancelling -> finalizing -> cancelled
         +-------------+--> failed

`transition(job, to, now_ms)` refuses any other move (ValueError), so a late
writer (a collector finishing while a cancel lands) cannot undo a cancel:
finalizing a cancelling job ends it `cancelled`, not `completed`.
"""

from __future__ import annotations

import enum
import hashlib

import msgspec

from cplane.schemas.batch import BatchJob, JobState

_NEXT: dict[JobState, frozenset[JobState]] = {
    JobState.VALIDATING: frozenset({JobState.IN_PROGRESS, JobState.FAILED,
                                    JobState.CANCELLING}),
    JobState.IN_PROGRESS: frozenset({JobState.FINALIZING, JobState.FAILED,
                                     JobState.CANCELLING}),
    JobState.CANCELLING: frozenset({JobState.FINALIZING, JobState.CANCELLED, JobState.FAILED}),
    JobState.FINALIZING: frozenset({JobState.COMPLETED, JobState.CANCELLED, JobState.FAILED}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def job_id_for(content_digest: bytes, *options: str) -> str:
    """`batch_<20 hex>` from the input's digest and the options that change what runs:
    the same file submitted the same way is the same job (and is served once)."""
    h = hashlib.blake2b(content_digest, digest_size=10)
    for opt in options:
        h.update(b"\0" + opt.encode())
    return f"batch_{h.hexdigest()}"


def transition(job: BatchJob, to: JobState, now_ms: float, **changes: object) -> BatchJob:
    """`job` moved to `to` (with other field changes); ValueError for an illegal move."""
    if to is not job.state and to not in _NEXT[job.state]:
        raise ValueError(f"job {job.id} is {job.state.value}; it cannot become {to.value}")
    extra: dict[str, object] = {"finished_ms": now_ms} if to.terminal else {}
    return msgspec.structs.replace(job, state=to, updated_ms=now_ms, **extra, **changes)


def finished_state(job: BatchJob) -> JobState:
    """Where a job whose expected results are all in ends: cancelled if a cancel came."""
    return JobState.CANCELLED if job.state is JobState.CANCELLING else JobState.COMPLETED


def all_in(job: BatchJob, collected: int) -> bool:
    """Every result the job waits for is collected (a cancel lowers what it waits for)."""
    return job.state in (JobState.IN_PROGRESS, JobState.CANCELLING, JobState.FINALIZING) and (
        job.publishing_done or job.state is not JobState.CANCELLING) and (
        collected >= job.expected)


class Resubmit(enum.Enum):
    """What `batch submit` does with a file whose job already exists."""

    PUBLISH = "publish"  # publishing never finished: go on from `published` (dedup covers overlap)
    COLLECT = "collect"  # every line is out: only collect the results
    DONE = "done"  # finished: write its results again
    REFUSE = "refuse"  # cancelled or failed: the same job id cannot run again


def on_resubmit(job: BatchJob) -> Resubmit:
    if job.state in (JobState.CANCELLED, JobState.FAILED, JobState.CANCELLING):
        return Resubmit.REFUSE
    if job.state is JobState.COMPLETED:
        return Resubmit.DONE
    if job.publishing_done:
        return Resubmit.COLLECT
    return Resubmit.PUBLISH


__all__ = ["Resubmit", "all_in", "finished_state", "job_id_for", "on_resubmit", "transition"]
