"""workers/fence.py: when a worker may publish without checking, and the one check."""

from __future__ import annotations

import asyncio
import time

import pytest

from cplane.workers.fence import MARGIN_S, Fence, fenced


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
