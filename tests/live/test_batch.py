"""Batch jobs on a real nats-server with sim workers: files in and out, a collector
killed mid-job, re-submits, cancels, and interactive TTFT while a batch runs."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS

from cplane.bus.provision import ensure_all
from cplane.client.batch import InvalidFile, SubmitOptions, cancel_job, publish_lines, start_job
from cplane.client.batch_collect import Collector, write_results
from cplane.client.batch_lines import CANCELLED_CODE, LineChecker
from cplane.client.batch_run import PLACEHOLDER_JOB, run_batch
from cplane.client.batch_state import Resubmit
from cplane.client.batch_store import JobStore
from cplane.client.sdk import Client, RequestFailed, new_request_id
from cplane.schemas.batch import BatchJob, JobState
from cplane.schemas.messages import ErrorCode, Priority, Request
from cplane.schemas.settings import Settings
from tests.natsfix import PublishCount, isolated_settings
from tests.stack import stack
from tests.waiting import until

ZERO = {"sim": {"zero_cost": True}}


def chat(cid: str, text: str, max_tokens: int = 4, model: str = "sim") -> dict[str, object]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": text}]}}


def write_jsonl(path: Path, rows: list[object]) -> Path:
    with path.open("wb") as fh:
        for r in rows:
            fh.write(r if isinstance(r, bytes) else msgspec.json.encode(r))
            fh.write(b"\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [msgspec.json.decode(x) for x in path.read_bytes().splitlines() if x.strip()]


async def start(nc: NATS, s: Settings, path: Path, **opts: object) -> tuple[JobStore, BatchJob]:
    from cplane.client.batch import validate_file

    await ensure_all(nc.jetstream(), s)  # the stores, as an orchestrator provisions them
    store = await JobStore.open(nc.jetstream(), s)
    checked = validate_file(path, LineChecker(PLACEHOLDER_JOB, limits=s.limits))
    job, again = await start_job(store, path, checked, SubmitOptions(**opts),  # type: ignore[arg-type]
                                 nc.max_payload)
    assert again is None
    return store, job


async def test_good_and_bad_lines_give_output_and_error_files(nats_url: str, nc: NATS,
                                                              tmp_path: Path) -> None:
    s = isolated_settings(nats_url, orchestrator={"model_wait_s": 0.5}, **ZERO)
    rows: list[object] = [chat(f"q{i}", f"question {i}") for i in range(8)]
    rows.insert(3, b"not json at all")
    rows.insert(6, chat("nomodel", "x", model="no-such-model"))
    rows.append({"custom_id": "bad", "method": "POST", "url": "/v1/embeddings", "body": {}})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    async with stack(s, workers=2):
        with pytest.raises(InvalidFile) as refused:  # without --skip-invalid: nothing runs
            await run_batch(nc, s, src, out, err)
        assert [e.line_no for e in refused.value.errors] == [4, 11]
        assert "line 4: not JSON" in str(refused.value) and "line 11: url must" in str(
            refused.value)
        assert await (await JobStore.open(nc.jetstream(), s)).list() == []
        run = await run_batch(nc, s, src, out, err, SubmitOptions(skip_invalid=True))
    assert run.job.state is JobState.COMPLETED and run.resubmit is None
    assert (run.job.total, run.job.invalid, run.job.completed, run.job.failed) == (9, 2, 8, 1)
    good, bad = read_jsonl(out), read_jsonl(err)
    assert [g["custom_id"] for g in good] == [f"q{i}" for i in range(8)]  # input order
    for g in good:
        resp = g["response"]
        assert isinstance(resp, dict) and resp["status_code"] == 200 and g["error"] is None
        assert resp["body"]["choices"][0]["message"]["content"]  # type: ignore[index]
    assert [b["custom_id"] for b in bad] == [None, "nomodel", "bad"]  # input order too
    assert bad[1]["error"]["code"] == "model_unavailable"  # type: ignore[index]
    assert "line 4" in bad[0]["error"]["message"]  # type: ignore[index]


@pytest.mark.serial  # beside three busy xdist workers the job once finished before the kill
async def test_collector_killed_mid_job_then_results_has_every_line_once(
        nats_url: str, nc: NATS, tmp_path: Path) -> None:
    # 8 slots, 16 decode steps of 25 ms per line: the job takes at least
    # 200 / 8 * 0.4 = 10 s, so the collector is surely killed mid-job (at the
    # sim's default 6.5 ms steps a slow publish let it finish first).
    s = isolated_settings(nats_url, sim={"decode_a_ms": 25.0})
    n = 200
    src = write_jsonl(tmp_path / "in.jsonl",
                      [chat(f"c{i}", f"q {i}", max_tokens=16) for i in range(n)])
    store, job = await start(nc, s, src)
    js = nc.jetstream()
    async with stack(s, workers=[{"capacity": 4}, {"capacity": 4}]):
        first = Collector(js, store, s, job.id, ack_wait_s=1.0)
        task = asyncio.create_task(first.run())
        publishing = asyncio.create_task(publish_lines(js, store, s, job.id, src))
        await until(lambda: _collected(store, job.id, 40), 30, "some results stored")
        task.cancel()  # killed: whatever it fetched and did not store comes again
        await asyncio.gather(task, return_exceptions=True)
        assert 40 <= (await store.require(job.id)).completed < n
        await publishing
        # later, another process (`cplane batch results`) takes over
        done = await asyncio.wait_for(Collector(js, store, s, job.id, ack_wait_s=1.0).run(), 60)
    assert done.state is JobState.COMPLETED and done.completed == n
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    w = await write_results(store, s, job.id, out, err)
    assert (w.ok, w.errors, w.missing) == (n, 0, 0)
    assert [r["custom_id"] for r in read_jsonl(out)] == [f"c{i}" for i in range(n)]


async def test_resubmit_is_the_same_job_and_runs_nothing_again(nats_url: str, nc: NATS,
                                                               tmp_path: Path) -> None:
    s = isolated_settings(nats_url, **ZERO)
    src = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i}", f"q {i}") for i in range(20)])
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    async with stack(s, workers=1) as run:
        first = await run_batch(nc, s, src, out, err)
        assert run.orchestrator is not None
        dispatched = run.orchestrator.stats.accepted
        again = await run_batch(nc, s, src, tmp_path / "o2.jsonl", tmp_path / "e2.jsonl")
        assert run.orchestrator.stats.accepted == dispatched  # nothing published again
    assert again.job.id == first.job.id and again.resubmit is Resubmit.DONE
    assert (tmp_path / "o2.jsonl").read_bytes() == out.read_bytes()


async def test_a_cancelled_job_stops(nats_url: str, nc: NATS, tmp_path: Path) -> None:
    """Queued lines never run, running ones stop, no line goes out after the cancel."""
    s = isolated_settings(nats_url)
    n = 120
    src = write_jsonl(tmp_path / "in.jsonl",
                      [chat(f"x{i}", f"long {i}", max_tokens=400) for i in range(n)])
    store, job = await start(nc, s, src)
    js = nc.jetstream()
    async with stack(s, workers=[{"capacity": 4}, {"capacity": 4}]):
        collector = asyncio.create_task(Collector(js, store, s, job.id).run())
        await publish_lines(js, store, s, job.id, src)
        job, sent = await cancel_job(nc, store, s, job.id)
        assert job.state is JobState.CANCELLING and sent == n
        done = await asyncio.wait_for(collector, 60)
    assert done.state is JobState.CANCELLED
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    w = await write_results(store, s, job.id, out, err)
    assert w.ok + w.errors == n and w.missing == 0
    assert w.ok <= 10  # at most what the fleet held (2 x 4 slots, headroom) could finish
    stopped = [e for e in read_jsonl(err) if e["error"]["code"] == CANCELLED_CODE]  # type: ignore[index]
    assert len(stopped) >= n - 10


async def test_no_line_is_published_after_a_cancel(nats_url: str, nc: NATS,
                                                   tmp_path: Path) -> None:
    s = isolated_settings(nats_url)
    src = write_jsonl(tmp_path / "in.jsonl", [chat(f"p{i}", "x") for i in range(50)])
    store, job = await start(nc, s, src)  # streams and stores, but no orchestrator
    job, _ = await cancel_job(nc, store, s, job.id, wait_s=0.2)  # no publisher answers
    job = await publish_lines(nc.jetstream(), store, s, job.id, src, checkpoint_lines=10)
    assert (job.published, job.publishing_done) == (0, True)
    info = await nc.jetstream().stream_info(s.streams.req.name)
    assert info.state.messages == 0


async def test_lines_wait_for_a_request_stream_that_answers_nothing(
        nats_url: str, nc: NATS, tmp_path: Path) -> None:
    """No responders (LLM_REQ gone, or a cluster electing its leader) stores nothing:
    the line is sent again with backoff, and the job publishes once a stream answers."""
    s = isolated_settings(nats_url)
    src = write_jsonl(tmp_path / "in.jsonl", [chat(f"w{i}", "x") for i in range(5)])
    store, job = await start(nc, s, src)  # streams and stores, but no orchestrator
    js = nc.jetstream()
    await js.delete_stream(s.streams.req.name)
    tries = PublishCount(js)
    pending = asyncio.ensure_future(publish_lines(js, store, s, job.id, src))
    await until(lambda: tries.n > 5, 10, "lines sent again after no responders")
    assert not pending.done()
    await ensure_all(js, s)
    job = await asyncio.wait_for(pending, 30)
    assert (job.published, job.publishing_done) == (5, True)
    assert (await js.stream_info(s.streams.req.name)).state.messages == 5


async def test_interactive_ttft_holds_while_a_large_batch_runs(nats_url: str, nc: NATS,
                                                               tmp_path: Path) -> None:
    """Batch lines wait for spare room: with aging at 0.2 s they would outrank every
    interactive request within a second; they must not."""
    s = isolated_settings(nats_url, orchestrator={"policy_params": {"aging_s": 0.2}})
    n = 300
    src = write_jsonl(tmp_path / "in.jsonl",
                      [chat(f"b{i}", f"batch {i}", max_tokens=48) for i in range(n)])
    store, job = await start(nc, s, src)
    js = nc.jetstream()
    ttfts: list[float] = []
    async with stack(s, workers=[{"capacity": 8}, {"capacity": 8}]):
        collector = asyncio.create_task(Collector(js, store, s, job.id).run())
        await publish_lines(js, store, s, job.id, src)
        client = Client(nc, s)
        await until(lambda: (collector.done() or False) or _collected(store, job.id, 20),
                    30, "the batch running")
        await asyncio.sleep(1.0)  # batch lines have now waited 5 aging steps
        for _ in range(12):
            try:
                final = await client.generate(
                    Request(request_id=new_request_id(), prompt="hi", max_tokens=4),
                    priority=Priority.HIGH, slo_class="interactive", timeout=30)
            except RequestFailed as e:  # interactive is sheddable: a shed is a missed target
                assert e.error.code is ErrorCode.OVERLOADED, e
                ttfts.append(math.inf)
                continue
            ttfts.append(final.timings.ttft_ms)
        still_running = not collector.done()
        done = await asyncio.wait_for(collector, 120)
    assert still_running, "the batch ended before the interactive requests: nothing measured"
    assert done.state is JobState.COMPLETED and done.completed == n
    ttfts.sort()
    print(f"\ninteractive TTFT ms while {n} batch lines ran: "
          f"{', '.join(f'{t:.0f}' for t in ttfts)}")
    assert ttfts[-2] < 250, ttfts  # the interactive class's TTFT target (p90 of 12)


async def _collected(store: JobStore, job_id: str, n: int) -> bool:
    job = await store.get(job_id)
    return job is not None and job.completed >= n


async def _cli(s: Settings, *args: str, timeout: float = 120) -> tuple[int, str]:
    env = dict(os.environ, CPLANE__NATS__PREFIX=s.nats.prefix, PYTHONUNBUFFERED="1")
    for key in ("req", "done", "out", "cancel"):  # the test's stream names
        env[f"CPLANE__STREAMS__{key.upper()}__NAME"] = getattr(s.streams, key).name
    env.pop("CPLANE_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cplane.cli", "batch", *args, "--nats-url", s.nats.url,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode()


async def test_cli_streams_2000_lines_and_fetches_them_again(nats_url: str, tmp_path: Path
                                                             ) -> None:
    s = isolated_settings(nats_url, **ZERO)
    n = 2000
    src = write_jsonl(tmp_path / "in.jsonl", [chat(f"k{i}", f"q {i}") for i in range(n)])
    out = tmp_path / "out.jsonl"
    async with stack(s, workers=2):
        rc, log = await _cli(s, "submit", str(src), "-o", str(out), "-q")
        assert rc == 0, log
        assert "lines/s" in log and f"{n} ok" in log
        job_id = log.split("job ", 1)[1].split(":", 1)[0]
        rc, text = await _cli(s, "status", job_id, "--json")
        job = msgspec.json.decode(text.strip().splitlines()[-1], type=BatchJob)
        assert (job.state, job.completed, job.published) == (JobState.COMPLETED, n, n)
        rc, text = await _cli(s, "list", "--json")
        assert job_id in text
        again = tmp_path / "again.jsonl"
        rc, text = await _cli(s, "results", job_id, "-o", str(again))
        assert rc == 0, text
    assert again.read_bytes() == out.read_bytes()
    assert [r["custom_id"] for r in read_jsonl(out)] == [f"k{i}" for i in range(n)]
    rc, text = await _cli(s, "submit", str(tmp_path / "missing.jsonl"))
    assert rc == 2 and "no such file" in text
