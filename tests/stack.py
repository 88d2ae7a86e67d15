"""An in-process stack for tests: orchestrator + workers on the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cplane.orchestrator.core import Journal
from cplane.orchestrator.service import Orchestrator
from cplane.schemas.codec import heartbeat_decoder
from cplane.schemas.messages import WorkerState
from cplane.schemas.settings import Settings
from cplane.workers.engines.base import Engine
from cplane.workers.engines.sim import SimEngine
from cplane.workers.runtime import Worker
from tests.waiting import until


@dataclass
class Running:
    orchestrator: Orchestrator | None
    workers: list[Worker]
    stops: dict[object, asyncio.Event] = field(default_factory=dict)
    tasks: dict[object, asyncio.Task[None]] = field(default_factory=dict)

    async def stop_worker(self, worker: Worker) -> None:
        self.stops[worker].set()
        await self.tasks[worker]


@dataclass
class StateWatch:
    """The states one worker's heartbeats said, in order; `unhealthy` set at the first
    UNHEALTHY."""

    states: list[WorkerState] = field(default_factory=list)
    unhealthy: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_heartbeat(self, msg: Msg) -> None:
        self.states.append(heartbeat_decoder.decode(msg.data).state)
        if self.states[-1] is WorkerState.UNHEALTHY:
            self.unhealthy.set()


async def watch_states(nc: NATS, settings: Settings, worker_id: str) -> StateWatch:
    watch = StateWatch()
    await nc.subscribe(settings.subjects.heartbeat(worker_id), cb=watch.on_heartbeat)
    return watch


async def _start(svc: Orchestrator | Worker, run: Running) -> None:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(svc.run(stop, ready))
    run.stops[svc], run.tasks[svc] = stop, task
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({waiter, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raise its error
    assert waiter in done, "service did not become ready"


async def start_worker(settings: Settings, run: Running, engine: Engine | None = None,
                       **worker: object) -> Worker:
    s = msgspec.structs.replace(settings, worker=msgspec.structs.replace(settings.worker, **worker))
    eng = engine or SimEngine(s.sim, model=s.worker.model)
    if engine is None:
        await eng.start()
    w = Worker(s, eng)
    run.workers.append(w)
    await _start(w, run)
    return w


async def start_replicas(settings: Settings, run: Running, conns: Sequence[NATS]
                         ) -> list[Orchestrator]:
    """One orchestrator replica per connection (a test closes one to kill it), started
    in `run`; returns once exactly one of them leads."""
    orchs = [Orchestrator(settings, nc=c) for c in conns]
    for o in orchs:
        await _start(o, run)
    await until(lambda: sum(o.leading for o in orchs) == 1, 10, "a leader")
    return orchs


@contextlib.asynccontextmanager
async def stack(
    settings: Settings,
    workers: int | Sequence[dict[str, object]] = 2,
    orchestrator: bool = True,
    journal: Journal | None = None,
) -> AsyncIterator[Running]:
    """Start an orchestrator and workers (dicts override WorkerSettings fields);
    `journal` records the orchestrator's decision core (orchestrator/core.py)."""
    run = Running(orchestrator=None, workers=[])
    specs = [{} for _ in range(workers)] if isinstance(workers, int) else list(workers)
    try:
        for i, spec in enumerate(specs):
            spec = {"worker_id": f"w{i}", **spec}
            await start_worker(settings, run, engine=spec.pop("engine", None), **spec)  # type: ignore[arg-type]
        if orchestrator:
            run.orchestrator = Orchestrator(settings, journal=journal)
            await _start(run.orchestrator, run)
        yield run
    finally:
        for stop in run.stops.values():
            stop.set()
        await asyncio.gather(*run.tasks.values(), return_exceptions=True)
        for w in run.workers:
            if isinstance(w.engine, SimEngine):
                await w.engine.shutdown()
