"""workers/fence.py: when a worker may publish without checking, and the one check."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

import pytest

from cplane.workers.chunker import ChunkStream
from cplane.workers.fence import MARGIN_S, Fence, fenced
from tests.unit.test_chunker import Sink


async def test_open_until_ack_wait_after_the_last_confirmed_round() -> None:
    calls = 0

    async def check() -> float:
        nonlocal calls
        calls += 1
        return time.monotonic()

    fence = Fence(5.0, check)
    assert fence.open()
    fence.progress_until = time.monotonic() - 0.01  # a pause: the bound passed
    assert not fence.open()
    fence.progress_confirmed(time.monotonic())
    assert fence.open() and calls == 0
    assert fence.progress_until == pytest.approx(time.monotonic() + 5.0 - MARGIN_S, abs=0.1)


async def test_claims_bound_the_fence_too() -> None:
    until = float("inf")

    async def check() -> float:
        return time.monotonic()

    fence = Fence(5.0, check, claims_until=lambda: until)
    assert fence.open()
    until = time.monotonic() - 0.01  # a claim may have lapsed
    assert not fence.open()


async def test_waiters_share_one_check_and_a_lost_run_raises() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    calls = 0
    lost: list[asyncio.Task[None]] = []

    async def check() -> float:
        nonlocal calls
        calls += 1
        start = time.monotonic()
        started.set()
        await release.wait()
        for t in lost:
            t.cancel()  # what the worker's check does to a run taken over
        return start

    fence = Fence(5.0, check)
    fence.progress_until = 0.0
    published: list[str] = []

    async def run(name: str) -> None:
        await fenced(fence)
        published.append(name)  # no await between the check and this

    kept = asyncio.create_task(run("kept"))
    taken = asyncio.create_task(run("taken"))
    lost.append(taken)
    await started.wait()
    release.set()
    await kept
    with pytest.raises(asyncio.CancelledError):
        await taken
    assert published == ["kept"] and calls == 1 and fence.checks == 1 and fence.open()


async def _swallowed_cancel(steps: list[str], after: Callable[[], Awaitable[None]]) -> None:
    """A run reads the store (nats-py's request: asyncio.wait_for), is cancelled in
    the loop turn its reply lands, then goes on to `after` (its next publish)."""
    reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def run() -> None:
        steps.append(await asyncio.wait_for(reply, 10))
        await after()
        steps.append("published")

    task = asyncio.create_task(run())
    await asyncio.sleep(0)  # the run waits for its reply
    reply.set_result("read")
    task.cancel()  # what the worker's check does to a run found taken over
    with pytest.raises(asyncio.CancelledError):
        await task
    if sys.version_info < (3, 12):  # wait_for returned the reply: the cancel was dropped
        assert steps == ["read"]
    assert "published" not in steps


async def test_a_cancel_an_await_swallowed_still_stops_the_runs_publishes() -> None:
    """The cluster chaos run's dup_terminals=1: a run taken over was cancelled while
    its terminal path read LLM_OUT, Python 3.11's wait_for dropped the cancel, and
    the run stored a terminal beside its successor's. Publishing checks the
    cancel request, not only whether a CancelledError came."""

    async def check() -> float:
        return time.monotonic()

    fence = Fence(5.0, check)  # open: nothing else would stop the run
    await _swallowed_cancel([], lambda: fenced(fence))
    sink = Sink()
    chunks = ChunkStream(sink, ["out"], "r", "w", fence=fence)
    await chunks.add([1], "a")
    await _swallowed_cancel([], lambda: chunks.add([2], "b"))
    await _swallowed_cancel([], lambda: chunks.resend([0]))
    assert [c.seq for _, c in sink.sent] == [0]  # the one sent before any cancel
