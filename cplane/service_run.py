"""How a `cplane` service process runs (`cplane orchestrator`, `worker`, `gateway`):
under uvloop until SIGINT/SIGTERM, which only set a stop event."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable

# Young-generation threshold once serving (CPython's default is 700). A service
# holds hundreds of requests in flight, each a handful of containers (tasks,
# frames, runs, messages) living a few milliseconds: at 700 a collection runs
# every few requests, walks all of them and promotes them to older generations,
# which are walked again. Measured on a zero-cost sim worker at saturation
# (bench/cpu_per_request.py, 20,000 requests): the collector took 0.18-0.22 s
# of 1.5-1.7 s of CPU at 700, 0.11-0.13 s (nearly all of it start-up) at
# 10,000; CPU per request -5 to -10 %. Peak RSS unchanged (57.8 MB per worker
# after 40,000 requests, against 57.5 MB before).
YOUNG_GC_THRESHOLD = 10_000


async def freeze_heap_when(ready: asyncio.Event) -> None:
    """Once the service is up, move everything alive (imported libraries, the engine,
    settings) to the permanent generation: a full collection then walks only what
    was made since. Measured on a sim worker: gen-2 pauses of 40-60 ms every few
    seconds under load, each one a p99 latency spike, without it. Then collect
    the young generation less often (YOUNG_GC_THRESHOLD)."""
    await ready.wait()
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)


def run_service(main: Callable[[asyncio.Event, asyncio.Event], Awaitable[None]]) -> None:
    """Run a service under uvloop until SIGINT/SIGTERM; the signal only sets a stop
    event. `main` sets its ready event once started (then the heap is frozen)."""
    import uvloop

    async def runner() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        freezer = asyncio.create_task(freeze_heap_when(ready))
        try:
            await main(stop, ready)
        finally:
            freezer.cancel()

    uvloop.run(runner())


__all__ = ["freeze_heap_when", "run_service"]
