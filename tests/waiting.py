"""Waiting in tests for an event we can only observe by asking (stream, consumer or
service state): poll the condition, bounded in time, never a fixed sleep as the check."""

from __future__ import annotations

import asyncio
import time


async def until(cond: object, timeout: float = 15.0, what: str = "condition") -> None:
    """Return once `cond()` (a plain or async callable) is true; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        ok = cond() if callable(cond) else cond
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
