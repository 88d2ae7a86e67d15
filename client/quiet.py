"""Open requests that went quiet read back what is stored.

A reader sees an output through LLM_OUT's republish, a core message that is
sent once: a terminal stored by a cluster node that died before republishing
it, or published again after a lost ack (stored once, so republished once, to
nobody), never reaches a live subscription. `QuietWatch` keeps a heap of the
open handles by when each is next due: one that made no progress since its
last check looks up its stored terminal (and replays stored chunks when it
holds a gap), then waits twice as long before the next look, up to `max_s`.
Progress costs nothing on the hot path: the handle's next expected `seq` is
compared between checks. Each tick pops only the due entries: O(k log n).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Watched(Protocol):
    closed: bool

    def progress(self) -> int: ...

    def settled(self) -> bool: ...

    async def look_again(self) -> bool: ...


class QuietWatch:
    """Looks up stored outputs of handles quiet for `first_s` (then 2x, up to `max_s`)."""

    def __init__(self, first_s: float = 5.0, max_s: float = 60.0, per_tick: int = 256) -> None:
        self.first_s = first_s
        self.max_s = max(max_s, first_s)
        self.per_tick = per_tick  # lookups started per tick; the rest wait for the next
        self.looked_up = 0  # lookups started (tests, the gateway's /metrics)
        self.recovered = 0  # lookups that found output the live subscription had lost
        self._heap: list[tuple[float, int, Watched, int, float]] = []
        self._order = itertools.count()  # ties never compare handles
        self._task: asyncio.Task[None] | None = None
        self._lookups: set[asyncio.Task[bool]] = set()

    def add(self, handle: Watched) -> None:
        loop = asyncio.get_running_loop()
        heapq.heappush(self._heap, (loop.time() + self.first_s, next(self._order), handle,
                                    handle.progress(), self.first_s))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())

    def close(self) -> None:
        for task in (self._task, *self._lookups):
            if task is not None:
                task.cancel()
        self._heap.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        tick = min(1.0, self.first_s / 2)
        while self._heap:
            await asyncio.sleep(tick)
            now, started = loop.time(), 0
            heap, again = self._heap, []
            while heap and heap[0][0] <= now:
                _, _, handle, seen, wait = heapq.heappop(heap)
                if handle.closed or handle.settled():
                    continue
                progress = handle.progress()
                due = now + self.first_s
                if progress != seen:  # alive: the quiet clock starts again
                    wait = self.first_s
                elif started < self.per_tick:
                    started += 1
                    self._look(handle)
                    wait = min(wait * 2, self.max_s)
                    due = now + wait
                else:  # over this tick's share of lookups: due again next tick
                    due = now
                again.append((due, next(self._order), handle, progress, wait))
            for entry in again:
                heapq.heappush(heap, entry)

    def _look(self, handle: Watched) -> None:
        self.looked_up += 1
        task = asyncio.get_running_loop().create_task(handle.look_again())
        self._lookups.add(task)
        task.add_done_callback(self._looked)

    def _looked(self, task: asyncio.Task[bool]) -> None:
        self._lookups.discard(task)
        if not task.cancelled() and task.exception() is None and task.result():
            self.recovered += 1
