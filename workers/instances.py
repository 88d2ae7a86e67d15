"""One worker process fronting many remote engine instances (`cplane worker --engine openai`).

Each instance (schemas/instances.py `InstanceSpec`) gets its own `Worker`
(workers/runtime.py) over a `RemoteEngine`, all on one NATS connection: one
identity per instance (its heartbeats, its work subjects, its breaker), so
routers see and choose each server like any worker. Instances come from the
command line (`--url`, fixed for the process) and, with a group, from the KV
keys `instance.<id>` of `<prefix>_config`, watched while the process runs:

- a key put for our group: the instance is fronted (a changed spec: the old
  front drains, the new one starts);
- a key deleted (or moved to another group): its Worker drains (running
  requests finish within `drain_timeout_s` or are handed back with their
  tokens, and continue elsewhere), then the engine's client closes;
- a server that cannot be reached at start is retried until it can, or until
  it is removed; a server whose probes fail `down_after` times in a row makes
  its Worker unhealthy (it stops pulling and hands its work back); once the
  probes pass again a fresh Worker takes the same identity.

The watch is backed by a full listing every `resync_s`, so a watch lost with
a broker restart costs at most that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

import msgspec
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from cplane.bus.connect import connect
from cplane.bus.kv_keys import live_entries
from cplane.bus.prom import serve_metrics
from cplane.bus.provision import ensure_config_bucket
from cplane.bus.tasks import cancel_all
from cplane.schemas.control import WorkerReport
from cplane.schemas.instances import INSTANCE_KEY_PREFIX, InstanceSpec
from cplane.schemas.messages import WorkerState
from cplane.schemas.settings import Settings
from cplane.workers.engines.remote import RemoteEngine, RemoteSettings
from cplane.workers.metrics import fleet_families
from cplane.workers.runtime import Worker

log = logging.getLogger("cplane.instances")
instance_decoder = msgspec.json.Decoder(InstanceSpec)
_DELETED = ("DEL", "PURGE")


@dataclass(frozen=True, slots=True, kw_only=True)
class FrontOptions:
    """How the process talks to its servers (the same for every instance)."""

    stall_timeout_s: float = 120.0
    probe_s: float = 1.0
    start_timeout_s: float = 5.0  # one start try; retried every retry_s
    retry_s: float = 2.0
    down_after: int = 3  # failed probes in a row -> unhealthy
    cooldown_s: float = 10.0  # after unhealthy from engine errors, before a fresh Worker
    resync_s: float = 10.0


def remote_settings(spec: InstanceSpec, o: FrontOptions) -> RemoteSettings:
    return RemoteSettings(url=spec.url, model_name=spec.model_name, api=spec.api,
                          tokenizer=spec.tokenizer, kv_events=spec.kv_events,
                          api_key=os.environ.get(spec.api_key_env, "") if spec.api_key_env
                          else "", pool=spec.capacity, stall_timeout_s=o.stall_timeout_s,
                          probe_s=o.probe_s, start_timeout_s=o.start_timeout_s)


def worker_settings(settings: Settings, spec: InstanceSpec, alone: bool) -> Settings:
    """The process's settings with this instance's identity, role, model and capacity;
    `/metrics` on the configured port only when it fronts a single fixed instance."""
    w = msgspec.structs.replace(settings.worker, worker_id=spec.instance_id,
                                role=spec.role.value, model=spec.model_name,
                                capacity=spec.capacity,
                                parallelism=max(spec.gpu_count, spec.tensor_parallel_size))
    m = settings.metrics if alone else msgspec.structs.replace(settings.metrics, worker_port=0)
    return msgspec.structs.replace(settings, worker=w, metrics=m)


@dataclass(eq=False)
class Front:
    """One instance being fronted: its engine, its current Worker, the task running both."""

    spec: InstanceSpec
    leave: asyncio.Event = field(default_factory=asyncio.Event)
    engine: RemoteEngine | None = None
    worker: Worker | None = None
    task: asyncio.Task[None] | None = None
    problem: str = "starting"  # why it is not serving ("" when it is)
    generation: int = 0  # Workers started so far


class InstanceSupervisor:
    """Fronts the instances of `static` and of `group` (None: only `static`)."""

    def __init__(self, settings: Settings, static: list[InstanceSpec], group: str | None,
                 options: FrontOptions | None = None, nc: NATS | None = None) -> None:
        if not static and group is None:
            raise ValueError("no instance to front: give --url or --group")
        self.settings = settings
        self.static = static
        self._fixed = {s.instance_id for s in static}  # from the command line: never changed
        self.group = group
        self.options = options or FrontOptions()
        self.fronts: dict[str, Front] = {}
        self._nc = nc
        self._alone = len(static) == 1 and group is None
        self._lock = asyncio.Lock()  # the watch and the resync change the set one at a time
        self._metrics: WSGIServer | None = None

    @property
    def metrics_port(self) -> int:
        """Where this process's `/metrics` listens (0: not served here)."""
        return self._metrics.server_port if self._metrics is not None else 0

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        nc = self._nc or await connect(self.settings.nats.url, "worker-instances",
                                       settings=self.settings.nats)
        tasks: list[asyncio.Task[Any]] = []
        server = self._metrics = self._serve_metrics()
        try:
            for spec in self.static:
                self._add(nc, spec)
            if self.group is not None:
                kv = await ensure_config_bucket(nc.jetstream(), self.settings)
                await self._resync(nc, kv)
                tasks += [asyncio.create_task(self._watch(nc, kv), name="instances-watch"),
                          asyncio.create_task(self._resync_loop(nc, kv), name="instances-sync")]
            if ready is not None:
                ready.set()
            await stop.wait()
        finally:
            if server is not None:
                server.shutdown()
            await cancel_all(tasks)
            await asyncio.gather(*(self._remove(i) for i in list(self.fronts)),
                                 return_exceptions=True)
            if self._nc is None:
                with contextlib.suppress(Exception):
                    await nc.drain()

    def _serve_metrics(self) -> WSGIServer | None:
        """One `/metrics` for every instance fronted here (a single fixed instance's Worker
        serves its own); `/readyz` passes while at least one instance takes work."""
        m = self.settings.metrics
        if self._alone or not m.worker_port:
            return None

        async def reports() -> list[WorkerReport]:
            workers = [f.worker for f in list(self.fronts.values()) if f.worker is not None]
            # A Worker has its control endpoint once it runs.
            return [await c.report() for w in workers
                    if (c := getattr(w, "control", None)) is not None]

        async def not_ready() -> str | None:
            if any(f.worker is not None and f.worker.state is WorkerState.READY
                   and f.worker.consuming for f in self.fronts.values()):
                return None
            return "no instance takes work: " + ("; ".join(
                f"{i}: {f.problem or 'starting'}" for i, f in self.fronts.items()) or "none")

        return serve_metrics(m.host, m.worker_port, reports, fleet_families, not_ready)

    # -- the instance set ----------------------------------------------------------------
    def _add(self, nc: NATS, spec: InstanceSpec) -> None:
        front = Front(spec)
        self.fronts[spec.instance_id] = front
        front.task = asyncio.create_task(self._front(nc, front), name=f"front-{spec.instance_id}")
        log.info("fronting %s at %s (%s, %s)", spec.instance_id, spec.url, spec.role,
                 spec.model_name)

    async def _remove(self, instance_id: str) -> None:
        """Drain the instance's Worker and close its engine; returns when it is gone."""
        front = self.fronts.pop(instance_id, None)
        if front is None:
            return
        front.leave.set()
        if front.task is not None:
            with contextlib.suppress(Exception):
                await front.task
        log.info("instance %s removed", instance_id)

    async def _apply(self, nc: NATS, spec: InstanceSpec | None, instance_id: str) -> None:
        """Make the fronted set agree with one key: spec None = deleted."""
        async with self._lock:
            await self._apply_locked(nc, spec, instance_id)

    async def _apply_locked(self, nc: NATS, spec: InstanceSpec | None, instance_id: str) -> None:
        ours = spec is not None and spec.group == self.group
        front = self.fronts.get(instance_id)
        if front is not None and instance_id in self._fixed:
            return  # fixed on the command line
        if front is not None and (not ours or front.spec != spec):
            await self._remove(instance_id)
            front = None
        if ours and front is None and spec is not None:
            self._add(nc, spec)

    async def _watch(self, nc: NATS, kv: KeyValue) -> None:
        while True:
            try:
                watcher = await kv.watch(INSTANCE_KEY_PREFIX + ">")
                async for entry in watcher:
                    if entry is None:
                        continue  # end of the initial values
                    await self._apply(nc, _spec_of(entry), entry.key[len(INSTANCE_KEY_PREFIX):])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away: the resync covers the gap
                log.warning("instance watch failed (%s); watching again", exc)
                await asyncio.sleep(self.options.retry_s)

    async def _resync_loop(self, nc: NATS, kv: KeyValue) -> None:
        while True:
            await asyncio.sleep(self.options.resync_s)
            try:
                await self._resync(nc, kv)
            except Exception as exc:
                log.warning("instance listing failed: %s", exc)

    async def _resync(self, nc: NATS, kv: KeyValue) -> None:
        entries = await live_entries(nc.jetstream(), kv, self.settings.subjects.config_bucket,
                                     INSTANCE_KEY_PREFIX)
        listed = {k[len(INSTANCE_KEY_PREFIX):] for k in entries}
        for instance_id in [i for i in self.fronts if i not in listed]:
            await self._apply(nc, None, instance_id)
        for key, entry in entries.items():
            with contextlib.suppress(Exception):
                await self._apply(nc, _spec_of(entry), key[len(INSTANCE_KEY_PREFIX):])

    # -- one instance ------------------------------------------------------------------
    async def _front(self, nc: NATS, front: Front) -> None:
        spec, o = front.spec, self.options
        engine = front.engine = RemoteEngine(remote_settings(spec, o))
        try:
            while not front.leave.is_set():  # reach the server
                try:
                    await engine.start()
                    break
                except Exception as exc:
                    front.problem = f"cannot start: {exc}"
                    log.warning("instance %s: %s", spec.instance_id, front.problem)
                    await _wait(front.leave, o.retry_s)
            while not front.leave.is_set():  # serve; a fresh Worker after each outage
                await self._serve(nc, front, engine)
                if engine.problem() is None and not front.leave.is_set():
                    # Unhealthy from faults while /health passes (5xx, broken streams):
                    # give the server time before taking work again.
                    front.problem = front.problem or "engine errors in a row"
                    await _wait(front.leave, o.cooldown_s)
                while not front.leave.is_set() and engine.problem() is not None:
                    front.problem = engine.problem() or ""
                    await _wait(front.leave, o.probe_s)
        finally:
            await engine.shutdown()

    async def _serve(self, nc: NATS, front: Front, engine: RemoteEngine) -> None:
        """Run one Worker for the instance until it leaves or its server is down."""
        o = self.options
        stop = asyncio.Event()
        worker = front.worker = Worker(
            worker_settings(self.settings, front.spec, self._alone), engine, nc=nc)
        front.generation += 1
        front.problem = ""
        run = asyncio.create_task(worker.run(stop), name=f"worker-{front.spec.instance_id}")
        failed = 0
        try:
            while not front.leave.is_set() and not run.done():
                await _wait(front.leave, o.probe_s)
                why = engine.problem()
                failed = failed + 1 if why is not None else 0
                if why is not None and failed >= o.down_after:
                    front.problem = why
                    await worker.engine_down(f"server {front.spec.url}: {why}")
                if worker.state is WorkerState.UNHEALTHY:
                    break
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await run
            front.worker = None


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)


def _spec_of(entry: KeyValue.Entry) -> InstanceSpec | None:
    if entry.operation in _DELETED or not entry.value:
        return None
    try:
        return instance_decoder.decode(entry.value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("ignoring instance key %s: %s", entry.key, exc)
        return None


__all__ = ["FrontOptions", "InstanceSupervisor", "remote_settings", "worker_settings"]
