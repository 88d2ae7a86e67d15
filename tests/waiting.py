"""How tests wait: for the event they expect, never for a fixed time.

- `until(cond)`: an event we can only observe by asking (stream, consumer, service
  or engine state): poll `cond`, bounded in time; fail with `what` when it never holds.
- `until_sync(cond)`: the same from plain (non-async) code, e.g. a fixture that
  watches a subprocess's log; `until_up(proc, log)` for `cplane up`'s NATS URL.
- `quiet_for(seconds, happened, why=...)`: a NEGATIVE check ("no second terminal",
  "nothing redelivered"). There is no event for "never", so this is the one place a
  test waits a fixed time; `why` says what would arrive within that time if the code
  were wrong (and so why `seconds` is long enough). It fails at once if it happens.

A bare `asyncio.sleep(x)` in a test is either one of these in disguise (use them) or
the thing under test (time must pass: aging, a TTL, a pause); say so in a comment.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from nats.aio.client import Client as NATS

POLL_S = 0.02


async def _check(cond: object) -> bool:
    ok = cond() if callable(cond) else cond
    if inspect.isawaitable(ok):
        ok = await ok
    return bool(ok)


async def until(cond: object, timeout: float = 15.0, what: str = "condition") -> None:
    """Return once `cond()` (a plain or async callable) is true; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not await _check(cond):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(POLL_S)


def until_sync(cond: Callable[[], object], timeout: float = 15.0,
               what: str = "condition") -> None:
    """`until` for plain code (blocks the thread while it polls)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(POLL_S)


def until_up(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0,
             what: str = "`cplane up` to say it is up") -> str:
    """The NATS URL `cplane up` prints once it is up (its output goes to `log`);
    fails with the log if the process exits first."""
    url: list[str] = []

    def said_up() -> bool:
        assert proc.poll() is None, log.read_text()
        m = re.search(r"cplane is up: NATS at (nats://127\.0\.0\.1:\d+)", log.read_text())
        url.extend(m.groups() if m else ())
        return bool(url)

    until_sync(said_up, timeout, what)
    return url[0]


def stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP took effect: state T in /proc/<pid>/stat)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


async def quiet_for(seconds: float, happened: Callable[[], object], *, why: str) -> None:
    """Assert that `happened()` stays false for `seconds` (checked every 20 ms).

    The only fixed wait tests may use: proving that something does NOT happen means
    watching for a while. `why` (required) names what would show up within `seconds`
    if the code under test were wrong; it is part of the failure message."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not await _check(happened), f"happened within {seconds} s, but must not: {why}"
        await asyncio.sleep(POLL_S)
    assert not await _check(happened), f"happened within {seconds} s, but must not: {why}"


async def subscribed(*ncs: NATS) -> None:
    """Return once every subscription made so far on each connection is live at the server,
    so that a message another connection publishes next is delivered.

    A bare `await nc.flush()` does not promise that: nats-py (2.16) leaves a new SUB in its
    pending buffer for its flusher task, while flush() writes its PING straight to the
    socket, ahead of the SUB; the PONG can come back before the server has read the SUB.
    By the time that first PONG is back the flusher has written the SUB, so the second
    PING follows it and its PONG proves the server registered it (a connection's commands
    are handled in order)."""
    for nc in ncs:
        await nc.flush()
        await nc.flush()
