"""Stopping a service's background tasks for sure.

Python 3.11's `asyncio.wait_for` can lose a cancellation that arrives as the
awaited future completes: the task goes on as if never cancelled (its
`cancelling()` stays non-zero), and a shutdown that gathers it waits forever
(seen as a worker that never stopped, once in a few dozen test runs). So a
stop cancels, waits a moment, and cancels again what still runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger("cplane.bus")


async def cancel_all(tasks: Iterable[asyncio.Task[object]], *, every_s: float = 1.0,
                     tries: int = 10) -> None:
    """Cancel `tasks` and wait until each has ended, cancelling again every `every_s`
    what a lost cancellation left running; after `tries` rounds, log what remains."""
    pending = {t for t in tasks if not t.done()}
    for _ in range(tries):
        if not pending:
            return
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)
    if pending:
        log.warning("tasks still running after %d cancellations: %s", tries,
                    ", ".join(t.get_name() for t in pending))


__all__ = ["cancel_all"]
