"""`cplane batch`: offline jobs in the OpenAI batch format (client/batch*.py does the work).

    cplane batch submit in.jsonl [--output out.jsonl] [--errors err.jsonl] [--skip-invalid]
    cplane batch status JOB | list | cancel JOB | results JOB -o out.jsonl

Exit codes: 0 done, 1 the job failed or was cancelled, NATS unreachable, or
it is unknown; 2 bad arguments or an invalid file (each bad line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.errors import NoServersError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cplane.bus.credentials import ConnectErrors, cannot_reach, connect_options, server_list
from cplane.client.batch import (
    InvalidFile,
    SubmitOptions,
    cancel_job,
    check_options,
    publish_lines,
    start_job,
    validate_file,
)
from cplane.client.batch_collect import Collected, Collector, write_results
from cplane.client.batch_lines import LineChecker
from cplane.client.batch_run import PLACEHOLDER_JOB
from cplane.client.batch_state import Resubmit
from cplane.client.batch_store import JobStore, UnknownJob
from cplane.schemas.batch import BatchJob, JobState
from cplane.schemas.messages import PRIORITIES
from cplane.schemas.settings import Settings

Run = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]
err = Console(stderr=True)


def _errors_path(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".jsonl") + ".errors.jsonl")


@contextlib.asynccontextmanager
async def _connected(settings: Settings) -> AsyncIterator[tuple[NATS, JobStore]]:
    errors = ConnectErrors()  # quiet; kept for the reason (authorization, TLS)
    try:
        nc = await asyncio.wait_for(nats.connect(server_list(settings.nats.url),
                                                 error_cb=errors.record,
                                                 max_reconnect_attempts=-1,
                                                 **connect_options(settings.nats)), 5.0)
    except (TimeoutError, OSError, NoServersError):
        raise cannot_reach(settings.nats.url, errors.reason) from None
    try:
        yield nc, await JobStore.open(nc.jetstream(), settings)
    finally:
        await nc.close()


class Bar:
    """The rich progress bar of a running job: done of total, failed, rate, ETA."""

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}"), TextColumn("{task.fields[rate]}/s"),
            TextColumn("sent {task.fields[sent]}"), TimeRemainingColumn(),
            console=err, disable=not enabled, transient=False)
        self.task = self.progress.add_task("results", total=None, failed=0, rate="0", sent=0)
        self.start = time.monotonic()

    def collected(self, c: Collected) -> None:
        rate = c.done / max(1e-3, time.monotonic() - self.start)
        self.progress.update(self.task, completed=c.done, total=c.job.expected or None,
                             failed=c.failed, rate=f"{rate:,.0f}")

    def published(self, job: BatchJob) -> None:
        self.progress.update(self.task, sent=job.published, total=job.expected or None)


async def _collect_and_write(nc: NATS, store: JobStore, settings: Settings, job_id: str,
                             output: Path, errors: Path, bar: Bar,
                             publish: Awaitable[BatchJob] | None = None) -> int:
    collector = Collector(nc.jetstream(), store, settings, job_id, progress=bar.collected)
    t0 = time.monotonic()
    with bar.progress:
        if publish is not None:
            job, _ = await asyncio.gather(collector.run(), publish)
        else:
            job = await collector.run()
    job = await store.require(job_id)
    secs = time.monotonic() - t0
    w = await write_results(store, settings, job_id, output, errors)
    rate = (job.completed + job.failed) / secs if secs > 0 else 0.0
    print(f"job {job_id} {job.state.value}: {w.ok} ok -> {output}, {w.errors} errors -> "
          f"{errors} ({secs:.1f} s, {rate:,.0f} lines/s)")
    return 0 if job.state is JobState.COMPLETED else 1


async def submit(args: argparse.Namespace, settings: Settings) -> int:
    path = Path(args.input)
    if not await asyncio.to_thread(path.is_file):
        raise ValueError(f"no such file: {path}")
    opts = SubmitOptions(model=args.model or "", priority=args.priority,
                         slo_class=args.slo_class, skip_invalid=args.skip_invalid,
                         job_id=args.job_id or "")
    check_options(opts)
    output = Path(args.output or path.with_name(path.name.removesuffix(".jsonl")
                                                + ".output.jsonl"))
    errors = Path(args.errors) if args.errors else _errors_path(output)
    async with _connected(settings) as (nc, store):
        checker = LineChecker(PLACEHOLDER_JOB, model=opts.model, limits=settings.limits,
                              max_bytes=nc.max_payload)
        t0 = time.monotonic()
        checked = await asyncio.to_thread(validate_file, path, checker)
        try:
            job, again = await start_job(store, path, checked, opts, nc.max_payload)
        except InvalidFile as exc:
            print(f"cplane batch submit: {exc}", file=sys.stderr)
            return 2
        for e in checked.errors:
            print(f"skipped {e}", file=sys.stderr)
        print(f"job {job.id}: {job.total} lines ({job.invalid} invalid skipped), validated "
              f"and stored in {time.monotonic() - t0:.1f} s", flush=True)
        if again is Resubmit.REFUSE:
            print(f"cplane batch submit: job {job.id} (this file, these options) is "
                  f"{job.state.value}; pass --job-id to run it again", file=sys.stderr)
            return 1
        if again is not None:
            print(f"job {job.id} exists ({job.state.value}): "
                  + ("continuing" if again is Resubmit.PUBLISH else "collecting its results"),
                  flush=True)
        bar = Bar(not args.quiet)
        publish = None
        if again in (None, Resubmit.PUBLISH):
            publish = publish_lines(nc.jetstream(), store, settings, job.id, path,
                                    progress=bar.published)
        if args.no_wait:
            if publish is not None:
                await publish
            print(f"submitted; results: cplane batch results {job.id} -o {output}")
            return 0
        return await _collect_and_write(nc, store, settings, job.id, output, errors, bar,
                                        publish)


async def results(args: argparse.Namespace, settings: Settings) -> int:
    output = Path(args.output or f"{args.job}.output.jsonl")
    errors = Path(args.errors) if args.errors else _errors_path(output)
    async with _connected(settings) as (nc, store):
        job = await store.require(args.job)
        if args.no_wait or job.state.terminal:
            w = await write_results(store, settings, job.id, output, errors)
            print(f"job {job.id} {job.state.value}: {w.ok} ok -> {output}, {w.errors} errors "
                  f"-> {errors}" + (f", {w.missing} not finished yet" if w.missing else ""))
            return 0 if job.state is not JobState.FAILED else 1
        return await _collect_and_write(nc, store, settings, job.id, output, errors,
                                        Bar(not args.quiet))


async def status(args: argparse.Namespace, settings: Settings) -> int:
    async with _connected(settings) as (_, store):
        job = await store.require(args.job)
    if args.json:
        print(msgspec.json.encode(job).decode())
        return 0
    print(f"{job.id}: {job.state.value}")
    for key in ("total", "invalid", "published", "completed", "failed"):
        print(f"  {key:<10} {getattr(job, key)}")
    print(f"  created    {_iso(job.created_ms)}" + (
        f"  finished {_iso(job.finished_ms)}" if job.finished_ms else ""))
    if job.error:
        print(f"  error      {job.error}")
    return 0


async def list_jobs(args: argparse.Namespace, settings: Settings) -> int:
    async with _connected(settings) as (_, store):
        jobs = await store.list()
    if args.json:
        print(msgspec.json.encode(jobs).decode())
        return 0
    if not jobs:
        print("no batch jobs")
        return 0
    table = Table("job", "state", "total", "done", "failed", "invalid", "created", "input")
    for j in jobs:
        table.add_row(j.id, j.state.value, str(j.total), str(j.completed), str(j.failed),
                      str(j.invalid), _iso(j.created_ms), j.input_file)
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
    return 0


async def cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with _connected(settings) as (nc, store):
        job, sent = await cancel_job(nc, store, settings, args.job, wait_s=args.wait)
        if job.state.terminal:
            print(f"job {job.id} is {job.state.value} already; nothing to cancel")
            return 0
        print(f"job {job.id} cancelling: {job.published} of {job.total} lines were sent; "
              f"{sent} cancels published", flush=True)
        if args.no_wait:
            return 0
        # Collect what the cancel ends (cancelled Finals), so the job closes.
        job = await Collector(nc.jetstream(), store, settings, job.id).run()
    print(f"job {job.id} {job.state.value}: {job.completed} completed, {job.failed} failed "
          "or cancelled")
    return 0 if job.state is JobState.CANCELLED else 1


def _iso(ms: float) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(
        timespec="seconds") if ms else "-"


def _runner(fn: Run, settings_of: Callable[[argparse.Namespace], Settings]
            ) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(fn(args, settings_of(args)))
        except UnknownJob as exc:
            print(f"cplane batch: {exc}", file=sys.stderr)
            return 1
    return run


def add_batch_parser(sp: argparse._SubParsersAction,
                     common: Callable[[argparse.ArgumentParser], None],
                     settings_of: Callable[[argparse.Namespace], Settings]) -> None:
    """`cplane batch ...` (cplane/cli.py build_parser calls this)."""
    p = sp.add_parser("batch", help="offline jobs in the OpenAI batch format")
    bp = p.add_subparsers(dest="batch_cmd", required=True)
    s = bp.add_parser("submit", help="validate, store and run an OpenAI batch file")
    common(s)
    s.add_argument("input", help="JSONL: {custom_id, method, url, body} per line")
    s.add_argument("--model", default=None, help="override every line's body.model")
    s.add_argument("--priority", choices=[p.value for p in PRIORITIES], default="background")
    s.add_argument("--slo-class", default="batch")
    s.add_argument("--output", "-o", default=None, help="default: INPUT.output.jsonl")
    s.add_argument("--errors", default=None, help="default: OUTPUT.errors.jsonl")
    s.add_argument("--skip-invalid", action="store_true",
                   help="run the valid lines (the bad ones go to the errors file)")
    s.add_argument("--job-id", default=None,
                   help="default: derived from the content and options (a re-submit is one job)")
    s.add_argument("--no-wait", action="store_true", help="publish, print the job id, exit")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.set_defaults(fn=_runner(submit, settings_of))
    r = bp.add_parser("results", help="collect a job's results (also after its submitter died)")
    common(r)
    r.add_argument("job")
    r.add_argument("--output", "-o", default=None, help="default: JOB.output.jsonl")
    r.add_argument("--errors", default=None, help="default: OUTPUT.errors.jsonl")
    r.add_argument("--no-wait", action="store_true", help="write what is in now")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    r.set_defaults(fn=_runner(results, settings_of))
    st = bp.add_parser("status", help="a job's state and counts")
    common(st)
    st.add_argument("job")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_runner(status, settings_of))
    ls = bp.add_parser("list", help="every job in the bucket")
    common(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=_runner(list_jobs, settings_of))
    c = bp.add_parser("cancel", help="stop a job: queued lines never run, running ones stop")
    common(c)
    c.add_argument("job")
    c.add_argument("--wait", type=float, default=5.0,
                   help="seconds to wait for the submitter to stop publishing")
    c.add_argument("--no-wait", action="store_true", help="do not wait for the job to close")
    c.set_defaults(fn=_runner(cancel, settings_of))


__all__ = ["add_batch_parser"]
