"""Until when this worker may publish for the runs it holds, without asking first.

A run's output may be written by another worker once its work message was
redelivered (after `ack_wait_s` without an ack or `in_progress`) or its
claim lapsed (after `claim_ttl_s` without a renewal). Neither can happen
before:

- `progress_until`: the start of the last `in_progress` round the server
  confirmed (a request answered behind it: bus/connect.py round_trip), plus
  `ack_wait_s`;
- `claims_until`: the start of the last claim renewal round that succeeded,
  plus `claim_ttl_s` (only while claims are held);

each less a margin for the write in flight. A worker that was paused, starved
of CPU or cut off from the broker finds the time past on its own clock
(monotonic: a SIGSTOP counts) and publishes nothing more, chunks, terminals
and hand-offs alike, until `ensure()` has checked every run it holds: claimed
(the claim is the fence), still its own (no other worker streamed after it,
no terminal stored), or given up. The check runs once for all waiters.

Per-seq `Nats-Msg-Id`s on the chunks (chunker.py) back this up inside the
stream's duplicate window: a write already in a socket buffer when the pause
began cannot store a second content for a seq.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

MARGIN_S = 0.5  # a write's time in flight, and then some

Check = Callable[[], Awaitable[float]]  # returns when its result holds from (monotonic)


def _unbounded() -> float:
    return float("inf")


class Fence:
    def __init__(self, ack_wait_s: float, check: Check,
                 claims_until: Callable[[], float] = _unbounded) -> None:
        self.ack_wait_s = ack_wait_s
        self._check = check
        self._claims_until = claims_until  # Claims.valid_until: inf while none is held
        self.progress_until = time.monotonic() + ack_wait_s - MARGIN_S
        self._checking: asyncio.Future[None] | None = None
        self.checks = 0  # checks run (a pause, a cut, a starved loop)

    def open(self) -> bool:
        """Publishing is safe now."""
        now = time.monotonic()
        return now < self.progress_until and now < self._claims_until() - MARGIN_S

    def progress_confirmed(self, round_start: float) -> None:
        """An in_progress round begun at `round_start` reached the server."""
        self.progress_until = max(self.progress_until, round_start + self.ack_wait_s - MARGIN_S)

    async def ensure(self) -> None:
        """Return once publishing is safe again: the check has run (once for every
        caller waiting now) and the runs it found lost are cancelled. Raises what
        the check raises (the broker is away: the caller tries again later)."""
        if self.open():
            return
        if self._checking is None:
            self._checking = asyncio.ensure_future(self._run())
        await asyncio.shield(self._checking)

    async def _run(self) -> None:
        try:
            # Every run held is claimed (or cancelled) from `start` on: a redelivered
            # copy waits for the claim, so the messages' ack_wait no longer bounds
            # us; the claims do (their own `valid_until`).
            start = await self._check()
            self.checks += 1
            self.progress_until = max(self.progress_until, start + self.ack_wait_s - MARGIN_S)
        finally:
            self._checking = None


def cancel_requested() -> bool:
    """The calling task was told to stop (Task.cancel), even when an await swallowed
    the CancelledError: Python 3.11's `asyncio.wait_for`, which nats-py's requests
    use, returns a reply that is ready when the cancel lands and drops the cancel.
    A run taken over while its terminal path read the store went on so, and
    stored a second terminal (cluster chaos run, dup_terminals=1)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def fenced(fence: Fence | None) -> None:
    """Wait for `fence` when it is closed, then raise CancelledError when the calling
    run was cancelled (the check found it lost): nothing of a lost run goes out
    after it, whether or not an earlier await delivered that cancel."""
    if fence is not None and not fence.open():
        await fence.ensure()
    if cancel_requested():
        raise asyncio.CancelledError


__all__ = ["MARGIN_S", "Fence", "cancel_requested", "fenced"]
