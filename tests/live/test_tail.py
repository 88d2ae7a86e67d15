"""Streaming consumers on a real nats-server: `client.results()` (durable, replay from a
start time, at least once) and `cplane tail` as a process."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import os
import subprocess
import sys
import time

import pytest
from nats.aio.client import Client as NATS

from cplane.client.results import StoredResult, delete_durable
from cplane.client.sdk import Client
from cplane.schemas.messages import Final, Request
from cplane.schemas.settings import Settings
from cplane.tail_cmd import parse_since
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.waiting import until

ZERO = {"sim": {"zero_cost": True}}


async def take(it: object, n: int, timeout: float = 15) -> list[StoredResult]:
    out: list[StoredResult] = []

    async def go() -> None:
        async for r in it:  # type: ignore[attr-defined]
            out.append(r)
            if len(out) >= n:
                return

    await asyncio.wait_for(go(), timeout)
    return out


async def generate(client: Client, rid: str) -> Final:
    return await client.generate(Request(request_id=rid, prompt="hi", max_tokens=3), timeout=30)


async def test_a_late_consumer_replays_what_it_missed(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, **ZERO)
    client = Client(nc, s)
    async with stack(s, workers=1):
        before = time.time()
        for i in range(3):
            await generate(client, f"early{i}")
        # started after they finished: replays them from LLM_DONE, then follows live
        it = client.results(start=datetime.timedelta(seconds=time.time() - before + 5))
        got = await take(it, 3)
        assert [r.request_id for r in got] == ["early0", "early1", "early2"]
        assert all(r.group == "i" and isinstance(r.terminal, Final) for r in got)
        assert all(r.stored_ms >= before * 1000 - 1000 for r in got)
        js = nc.jetstream()
        before = len(await js.consumers_info(s.streams.done.name))

        async def consumer_made() -> bool:
            return len(await js.consumers_info(s.streams.done.name)) > before

        live = asyncio.create_task(take(client.results(), 1))
        await until(consumer_made, 10, "the live consumer on LLM_DONE")
        await generate(client, "live0")
        assert [r.request_id for r in await live] == ["live0"]


async def test_a_durable_consumer_resumes_and_delivers_at_least_once(nats_url: str,
                                                                     nc: NATS) -> None:
    s = isolated_settings(nats_url, **ZERO)
    client = Client(nc, s)
    async with stack(s, workers=1):
        start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
        for i in range(4):
            await generate(client, f"d{i}")
        first = client.results(durable="audit", start=start, ack_wait_s=1.0)
        got = await take(first, 2)  # d0 acked when d1 was asked for; d1 never acked
        await first.aclose()  # type: ignore[attr-defined]
        assert [r.request_id for r in got] == ["d0", "d1"]
        await generate(client, "d4")
        again = await take(client.results(durable="audit", ack_wait_s=1.0), 4)
        # d1 comes again (not acked: after ack_wait), d0 does not; d2.. where it stood
        assert sorted(r.request_id for r in again) == ["d1", "d2", "d3", "d4"]
        assert await delete_durable(nc.jetstream(), s, "audit")
        assert not await delete_durable(nc.jetstream(), s, "audit")


async def _generate_until_printed(client: Client, proc: asyncio.subprocess.Process,
                                  rid: str, timeout: float) -> list[str]:
    """Generate `rid`-0, -1, ... until `cplane tail` prints one: the process shows no
    sign of having subscribed, so each miss just means it was not listening yet."""
    deadline = time.monotonic() + timeout
    for i in itertools.count():
        await generate(client, f"{rid}-{i}")
        try:
            return await _lines_until(proc, rid, 0.5)
        except (AssertionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
    raise AssertionError("unreachable")


def _env(s: Settings) -> dict[str, str]:
    env = dict(os.environ, CPLANE__NATS__PREFIX=s.nats.prefix,
               CPLANE__STREAMS__DONE__NAME=s.streams.done.name, PYTHONUNBUFFERED="1")
    env.pop("CPLANE_CONFIG", None)
    return env


async def _lines_until(proc: asyncio.subprocess.Process, needle: str,
                       timeout: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = await asyncio.wait_for(proc.stdout.readline(), deadline - time.monotonic())
        if not raw:
            break
        lines.append(raw.decode())
        if needle in lines[-1]:
            return lines
    raise AssertionError(f"{needle!r} not printed; got {lines}")


@pytest.mark.parametrize("what", ["--results", "--tokens"])
async def test_cplane_tail_prints_outputs_as_they_are_stored(nats_url: str, nc: NATS,
                                                             what: str) -> None:
    s = isolated_settings(nats_url, **ZERO)
    client = Client(nc, s)
    async with stack(s, workers=1):
        await generate(client, "before")
        args = [sys.executable, "-m", "cplane.cli", "tail", what, "--nats-url", nats_url]
        if what == "--results":
            args += ["--since", "1m", "--json"]
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(s))
        try:
            if what == "--results":  # replayed from LLM_DONE
                assert '"before"' in "".join(await _lines_until(proc, '"before"', 20))
                await generate(client, "after")
                printed = await _lines_until(proc, "after", 20)
            else:  # a core subscription: what is sent before it listens is not printed
                printed = await _generate_until_printed(client, proc, "after", 20)
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
    assert any("after" in line for line in printed)


def test_since_durations() -> None:
    assert parse_since("90") == datetime.timedelta(seconds=90)
    assert parse_since("5m") == datetime.timedelta(minutes=5)
    assert parse_since("2h") == datetime.timedelta(hours=2)
    with pytest.raises(ValueError, match="duration"):
        parse_since("yesterday")
