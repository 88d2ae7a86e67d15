"""One call for a whole batch job from Python (what `cplane batch submit` does, without a bar).

    async with await Client.connect(url) as client:
        run = await run_batch(client.nc, client.settings, Path("in.jsonl"), Path("out.jsonl"),
                              Path("err.jsonl"), SubmitOptions(skip_invalid=True))
        print(run.job.state, run.written.ok, run.written.errors)

Raises InvalidFile (every bad line with its number) when the file cannot run
as asked; `ValueError` when the same file and options name a job that was
cancelled or failed (pass another `job_id`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NATS

from cplane.client.batch import (
    SubmitOptions,
    check_options,
    publish_lines,
    start_job,
    validate_file,
)
from cplane.client.batch_collect import Collector, Progress, Written, write_results
from cplane.client.batch_lines import LineChecker
from cplane.client.batch_state import Resubmit
from cplane.client.batch_store import JobStore
from cplane.schemas.batch import BatchJob
from cplane.schemas.settings import Settings

PLACEHOLDER_JOB = "batch_" + "0" * 20  # a real id's length: the same encoded sizes


@dataclass(frozen=True, slots=True)
class BatchRun:
    job: BatchJob
    resubmit: Resubmit | None  # None: a new job
    written: Written


async def run_batch(nc: NATS, settings: Settings, path: Path, output: Path, errors: Path,
                    opts: SubmitOptions | None = None, *, progress: Progress | None = None
                    ) -> BatchRun:
    """Validate, store, publish, collect, then write both files in input order."""
    opts = opts or SubmitOptions()
    check_options(opts)
    js = nc.jetstream()
    store = await JobStore.open(js, settings)
    checker = LineChecker(PLACEHOLDER_JOB, model=opts.model, limits=settings.limits,
                          max_bytes=nc.max_payload)
    checked = await asyncio.to_thread(validate_file, path, checker)
    job, again = await start_job(store, path, checked, opts, nc.max_payload)
    if again is Resubmit.REFUSE:
        raise ValueError(f"job {job.id} is {job.state.value}; pass another job_id to run it")
    collect = Collector(js, store, settings, job.id, progress=progress).run()
    if again in (None, Resubmit.PUBLISH):
        job, _ = await asyncio.gather(collect, publish_lines(js, store, settings, job.id, path))
    else:
        job = await collect
    written = await write_results(store, settings, job.id, output, errors)
    return BatchRun(await store.require(job.id), again, written)


__all__ = ["PLACEHOLDER_JOB", "BatchRun", "run_batch"]
