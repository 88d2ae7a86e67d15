"""The faults of a chaos run: three scheduled lanes, periodic worker faults, the long tail.

Faults are triggered by progress (share of the requests accepted so far) so
the schedule holds at any N and machine speed. Three lanes run side by side,
each in its own order (a lane's next fault waits for its previous one to
end); faults on one target never overlap across lanes (one lock for
nats-server, one for the orchestrator replicas):

    crashes     15%  kill -9 orch0, restart it 3 s later
                35%  nats-server stopped gracefully (SIGTERM), restarted on the same port and store
                50%  overload: publish at 3x the fleet's completion rate (stream full -> refusals)
                60%  resubmissions (resubmit.py), in the background
                65%  kill -9 orch1, restart it 3 s later
                80%  nats-server killed -9, restarted on the same port and store
    pauses      25%  the leading orchestrator replica SIGSTOPped 3-10 s (lease_ttl_s=3 s), SIGCONT
                45%  nats-server SIGSTOPped 2-6 s
                72%  a random orchestrator replica SIGSTOPped 3-10 s
                90%  nats-server SIGSTOPped 2-6 s
    partitions  10%  the worker proxy blackholed 4-10 s (worker_timeout_s=3.5 s, ack_wait_s=5 s)
                30%  both proxies delay every byte 100-300 ms, for 6 s
                55%  the orchestrator proxy blackholed 4-10 s
                62%  the worker proxy blackholed 4-10 s
                85%  both proxies reset every connection (RST)

On a cluster (`CPLANE_CHAOS_CLUSTER`; cluster.py) the nats-server faults at
35, 45, 80 and 90% give way to that file's node faults (leader kills, a hung
node, a rolling restart), and there are no proxies.

Periodic: every `kill_every_s` a streaming worker is killed -9 (a replacement
starts, under the same id every other time, once its link and the broker let
it connect; no kill while a replacement waits); every `pause_every_s` a
streaming worker is SIGSTOPped 4-12 s (one at a time; a paused worker is
never killed). A long generation that has streamed for longer than LLM_OUT's
`max_age` (its first chunks are gone from LLM_OUT) is the first choice of the
next kill or pause, once per request: whoever continues it cannot read its
head back, and must not silently start it again from scratch. Every other
long generation is spared the random kills and pauses until then (so that
it lives that long); the others take their chances. Once the load and the
scheduled faults are done, only these aimed faults go on, while a long
generation not hit yet still streams (at most out_max_age_s + 25 s).

Every fault is logged as a `FAULT ...` line of harness.log (the run keeps
them for the report) and counted in the run's `counts` where the figures
line shows it (pauses, partitions).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from nats.aio.client import Client as NATS

from cplane.orchestrator.partitions import PartitionMap, lease_key
from tests.chaos.load import Publisher
from tests.chaos.procs import Fleet, NatsServer, Proc
from tests.chaos.proxy import Proxy
from tests.chaos.resubmit import RunView

Event = Callable[[], Awaitable[None] | None]


class Broker(Protocol):
    """The run's nats-server: one (procs.NatsServer) or a cluster's nodes (cluster.py)."""

    @property
    def url(self) -> str: ...

    @property
    def procs(self) -> list[Proc]: ...

    def available(self) -> bool: ...


class BrokerFaults(Protocol):
    """Faults aimed at the broker, in place of the single server's (cluster.ClusterFaults)."""

    def crashes(self) -> list[tuple[float, Event]]: ...

    def pauses(self) -> list[tuple[float, Event]]: ...


class LaneView(RunView, Protocol):
    """What the fault lanes use of the run (scenario.Run). The proxies, the
    recorder's connection and the publisher come after the lanes are made:
    they are read from the run when needed."""

    @property
    def server(self) -> Broker: ...

    fleet: Fleet
    nc_rec: NATS | None
    wproxy: Proxy | None  # the proxied worker's link
    oproxy: Proxy | None  # orch1's link

    def router_env(self, replica: int) -> dict[str, str]: ...


class FaultLanes:
    """Injects the run's faults while the load runs (`chaos`), then the long tail."""

    def __init__(self, run: LaneView, resubmit: Callable[[int], None]) -> None:
        self.run = run
        self.cfg, self.rng, self.rec, self.counts, self.log = (
            run.cfg, run.rng, run.rec, run.counts, run.log)
        self.server, self.fleet = run.server, run.fleet
        self.resubmit = resubmit  # publishes up to k finished ids again (resubmit.py)
        self.locks = {"nats": asyncio.Lock(), "orch": asyncio.Lock()}
        self.nats_busy = False  # nats-server stopped, restarting or SIGSTOPped
        self.pending_starts: list[tuple[str | None, str]] = []  # replacements waiting for a link
        self.worker_pause: asyncio.Task[None] | None = None
        self.long_hits: dict[str, list[str]] = {}  # long request id -> faults aimed at it
        self.broker_faults: BrokerFaults | None = None  # a cluster's (else the server's own)

    def _clear(self, url: str) -> bool:
        """Whether a process started now on `url` can connect (its first connect must succeed)."""
        if self.nats_busy or not self.server.available():
            return False
        return all(px.passing() for px in (self.run.wproxy, self.run.oproxy)
                   if px is not None and px.url == url)

    async def _until_clear(self, url: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._clear(url) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # poll the faults that hold the link (bounded)

    # -- crash lane (as before) ---------------------------------------------
    async def _restart_orch(self, i: int) -> None:
        async with self.locks["orch"]:
            p = self.fleet.orchestrators[i]
            self.log(f"FAULT kill -9 {p.name} pid={p.pid}")
            p.kill9()
            await asyncio.sleep(3.0)  # the fault under test: the orchestrator stays dead 3 s
            await self._until_clear(p.argv[-1])
            p.env = {**p.env, **self.run.router_env(i)}
            p.start()
            self.log(f"restarted {p.name} pid={p.pid} router="
                     f"{p.env['CPLANE__ORCHESTRATOR__ROUTER']}")

    async def _restart_nats(self, graceful: bool) -> None:
        server = self.server
        assert isinstance(server, NatsServer)
        async with self.locks["nats"]:
            how = "SIGTERM (graceful)" if graceful else "kill -9"
            self.counts["node_kills"] += not graceful
            self.log(f"FAULT nats-server {how} pid={server.proc.pid}")
            self.nats_busy = True
            try:
                await server.restart(graceful, down_s=1.0)
            finally:
                self.nats_busy = False
            self.log(f"nats-server back pid={server.proc.pid}")

    # -- pause lane -----------------------------------------------------------
    async def _leader(self) -> Proc | None:
        assert self.run.nc_rec is not None
        try:
            kv = await self.run.nc_rec.jetstream().key_value("llm_leases")
            # partitioned leadership: the leader of one partition, the default or a pool's
            keys = [lease_key(p) for p in PartitionMap.of(self.run.cfg.leader_partitions).pools]
            key = self.run.rng.choice(keys) if len(keys) > 1 else keys[0]
            entry = await asyncio.wait_for(kv.get(key), 3.0)
            holder = (entry.value or b"").decode()
        except Exception as exc:
            self.log(f"leader lookup failed: {exc!r}")
            return None
        return self.fleet.orchestrator_by_id(holder)

    async def _pause(self, p: Proc, seconds: float, what: str, note: str = "") -> None:
        self.counts["pauses"] += 1
        self.log(f"FAULT pause {what} {p.name} pid={p.pid} for {seconds:.1f}s (SIGSTOP) {note}"
                 .rstrip())
        if await p.pause(seconds):
            self.log(f"resumed {p.name} pid={p.pid} (SIGCONT)")

    async def _pause_orch(self, leader: bool) -> None:
        async with self.locks["orch"]:
            p = await self._leader() if leader else None
            live = [o for o in self.fleet.orchestrators if o.alive()]
            if p is None and live:
                p = self.rng.choice(live)
            if p is not None:
                what = "leading orchestrator" if leader else "orchestrator"
                await self._pause(p, self.rng.uniform(3.0, 10.0), what)

    async def _pause_nats(self) -> None:
        async with self.locks["nats"]:
            self.nats_busy = True
            try:
                await self._pause(self.server.procs[0], self.rng.uniform(2.0, 6.0), "nats-server")
            finally:
                self.nats_busy = False

    # -- partition lane -------------------------------------------------------
    def _behind(self, px: Proxy) -> str:
        return ",".join(n for n, u in self.fleet.urls.items() if u == px.url
                        and any(p.name == n and p.alive() for p in self.fleet.all_procs()))

    async def _blackhole(self, px: Proxy | None, lo: float, hi: float) -> None:
        if px is None:
            return
        lock = self.locks["orch"] if px is self.run.oproxy else contextlib.nullcontext()
        async with lock:
            seconds = self.rng.uniform(lo, hi)
            self.counts["partitions"] += 1
            self.log(f"FAULT partition blackhole {px.name} ({self._behind(px)}) for {seconds:.1f}s")
            px.blackhole()
            try:
                await asyncio.sleep(seconds)  # the fault under test: the link is silent this long
            finally:
                px.set_pass()

    async def _delay(self, seconds: float) -> None:
        proxies = [px for px in (self.run.wproxy, self.run.oproxy) if px is not None]
        try:
            for px in proxies:
                ms = self.rng.uniform(100.0, 300.0)
                self.counts["partitions"] += 1
                self.log(f"FAULT partition delay {px.name} ({self._behind(px)}) {ms:.0f} ms "
                         f"for {seconds:.1f}s")
                px.delay(ms)
            await asyncio.sleep(seconds)  # the fault under test: the links are slow this long
        finally:
            for px in proxies:
                px.set_pass()

    async def _reset(self) -> None:
        for px in (self.run.wproxy, self.run.oproxy):
            if px is not None:
                self.counts["partitions"] += 1
                self.log(f"FAULT partition reset {px.name} ({self._behind(px)})")
                px.reset()

    # -- workers: kills and pauses -------------------------------------------
    def _aged_long(self) -> tuple[str, str, float] | None:
        """A long generation streaming now whose first chunk is older than LLM_OUT's
        max_age (and not hit yet): (request id, worker id, seconds streamed)."""
        assert self.run.pub is not None
        now = time.monotonic()
        for rid in self.run.pub.long:
            st = self.rec.streaming.get(rid)
            if rid in self.long_hits or st is None or now - st[1] > 0.5:
                continue
            age = now - self.rec.first_chunk_at.get(rid, now)
            p = self.fleet.workers.get(st[0])
            if age > self.cfg.out_max_age_s + 1.0 and p is not None and p.alive() \
                    and not p.paused:
                return rid, st[0], age
        return None

    def _reserved(self) -> set[str]:
        """Workers streaming a reserved long generation not hit yet: every other long
        generation (seeded order) is spared the random kills and pauses until its head
        has aged out, so that the fault aimed at it finds it still running."""
        assert self.run.pub is not None
        now, out = time.monotonic(), set()
        for i, rid in enumerate(self.run.pub.long):
            st = self.rec.streaming.get(rid)
            if i % 2 == 0 and rid not in self.long_hits and st and now - st[1] < 1.0:
                out.add(st[0])
        return out

    def _pick_worker(self, why: str) -> tuple[str, str] | None:
        live = [w for w in self.fleet.live_workers() if not self.fleet.workers[w].paused]
        if not live:
            return None
        aged = self._aged_long()
        if aged is not None:
            rid, wid, age = aged
            note = f"(long {rid} streaming {age:.1f}s: its head aged out of LLM_OUT)"
            self.long_hits.setdefault(rid, []).append(f"{why} {wid}")
            return wid, note
        spared = self._reserved()
        live = [w for w in live if w not in spared]
        if not live:
            return None  # every worker streams a reserved long generation: next tick
        now = time.monotonic()
        busy = [w for w in live if now - self.rec.last_chunk_at.get(w, 0.0) < 0.5]
        return self.rng.choice(busy or live), ""

    def _kill_worker(self, n: int) -> None:
        picked = self._pick_worker("kill")
        if picked is None:
            return
        wid, note = picked
        p = self.fleet.workers[wid]
        self.log(f"FAULT kill -9 worker {wid} pid={p.pid} {note}".rstrip())
        p.kill9()
        self.pending_starts.append((wid if n % 2 else None, self.fleet.url_of(wid)))
        self._start_pending()

    def _start_pending(self) -> None:
        waiting: list[tuple[str | None, str]] = []
        for wid, url in self.pending_starts:
            if not self._clear(url):
                waiting.append((wid, url))
                continue
            new = self.fleet.start_worker(wid, url=url)
            self.log(f"replacement worker {new.name} pid={new.pid}"
                     + (f" via {url}" if url != self.server.url else ""))
        self.pending_starts = waiting

    async def _pause_worker(self) -> None:
        picked = self._pick_worker("pause")
        if picked is None:
            return
        wid, note = picked
        p = self.fleet.workers[wid]
        await self._pause(p, self.rng.uniform(4.0, 12.0), "worker", note)

    # -- the schedule (the broker's faults: the single server's here, or a cluster's) --
    def _broker_events(self) -> tuple[list[tuple[float, Event]], list[tuple[float, Event]]]:
        """(crash lane, pause lane) faults aimed at the broker."""
        if self.broker_faults is not None:
            return self.broker_faults.crashes(), self.broker_faults.pauses()
        return ([(0.35, lambda: self._restart_nats(True)),
                 (0.80, lambda: self._restart_nats(False))],
                [(0.45, self._pause_nats), (0.90, self._pause_nats)])

    def _lanes(self, pub: Publisher) -> dict[str, list[tuple[float, Event]]]:
        half = max(1, self.cfg.resubmit // 2)
        crashes, pauses = self._broker_events()

        def frac(event: tuple[float, Event]) -> float:
            return event[0]

        return {
            "crashes": sorted([
                (0.15, lambda: self._restart_orch(0)),
                (0.50, lambda: pub.start_overload(self.cfg.overload_s)),
                (0.60, lambda: self.resubmit(half) if self.cfg.resubmit else None),
                (0.65, lambda: self._restart_orch(1)),
                *crashes,
            ], key=frac),
            "pauses": sorted([
                (0.25, lambda: self._pause_orch(leader=True)),
                (0.72, lambda: self._pause_orch(leader=False)),
                *pauses,
            ], key=frac),
            "partitions": [
                (0.10, lambda: self._blackhole(self.run.wproxy, 4.0, 10.0)),
                (0.30, lambda: self._delay(6.0)),
                (0.55, lambda: self._blackhole(self.run.oproxy, 4.0, 10.0)),
                (0.62, lambda: self._blackhole(self.run.wproxy, 4.0, 10.0)),
                (0.85, self._reset),
            ] if self.cfg.partitions else [],
        }

    def _sample_rss(self) -> None:
        self.fleet.sample_rss()
        for p in self.server.procs:
            p.sample_rss()

    async def _lane(self, name: str, events: list[tuple[float, Event]], pub: Publisher) -> None:
        for frac, event in events:
            while pub.progress() < frac and not pub.done.is_set():
                await asyncio.sleep(0.1)  # the lane's tick: wait for the progress that triggers it
            res = event()
            if res is not None:
                await res
        self.log(f"lane {name}: done")

    async def chaos(self, pub: Publisher) -> None:
        lanes = [asyncio.create_task(self._lane(name, evs, pub), name=f"lane-{name}")
                 for name, evs in self._lanes(pub).items()]
        cap = max(20, self.cfg.requests // 5)
        now = time.monotonic()
        last_kill, last_pause, last_rss = now, now - self.cfg.pause_every_s / 2, 0.0
        kills = 0
        try:
            while not pub.done.is_set() or not all(t.done() for t in lanes):
                for t in lanes:
                    if t.done() and t.exception() is not None:
                        raise RuntimeError(f"fault {t.get_name()} failed") from t.exception()
                now = time.monotonic()
                if now - last_rss > 1.0:
                    self._sample_rss()
                    last_rss = now
                if pub.overloaded() and pub.overload_accepted >= cap:
                    pub.overload_until = 0.0
                    self.log("overload phase ends (its accepted share reached)")
                self._start_pending()
                # a kill waits for the last one's replacement (one that cannot connect
                # yet, the broker being away, is started later): the fleet never shrinks
                full = not self.pending_starts and \
                    len(self.fleet.live_workers()) >= self.cfg.workers
                if now - last_kill >= self.cfg.kill_every_s and full:
                    kills += 1
                    self._kill_worker(kills)
                    last_kill = now
                idle = self.worker_pause is None or self.worker_pause.done()
                if now - last_pause >= self.cfg.pause_every_s and idle:
                    self.worker_pause = asyncio.create_task(self._pause_worker())
                    last_pause = now
                await asyncio.sleep(0.1)  # the fault scheduler's tick (pacing, not a wait)
            for t in lanes:
                await t
            kills += await self._long_tail()
            if self.worker_pause is not None:
                await self.worker_pause  # ends within its pause (at most 12 s)
            deadline = time.monotonic() + 60
            while self.pending_starts and time.monotonic() < deadline:
                self._start_pending()
                await asyncio.sleep(0.1)  # poll for the link to a replacement (bounded: 60 s)
        finally:
            for t in [*lanes, *([self.worker_pause] if self.worker_pause else [])]:
                t.cancel()
            await asyncio.gather(*lanes, *([self.worker_pause] if self.worker_pause else []),
                                 return_exceptions=True)
        self.log(f"faults done: {kills} worker kills, {dict(self.counts)}")

    def _long_waiting(self) -> bool:
        """A long generation not hit yet is streaming now (its head may still age out)."""
        assert self.run.pub is not None
        now = time.monotonic()
        for rid in self.run.pub.long:
            st = self.rec.streaming.get(rid)
            if rid not in self.long_hits and st is not None and now - st[1] < 2.0:
                return True
        return False

    async def _long_tail(self) -> int:
        """After the load and the scheduled faults: only the faults aimed at long
        generations whose head aged out, while one not hit yet still streams (bounded:
        out_max_age_s + 25 s). Returns the kills made."""
        deadline = time.monotonic() + self.cfg.out_max_age_s + 25.0
        kills = 0
        while self._long_waiting() and time.monotonic() < deadline:
            self._start_pending()
            idle = self.worker_pause is None or self.worker_pause.done()
            if self._aged_long() is not None and not self.pending_starts:
                if idle and len(self.long_hits) % 2:
                    self.worker_pause = asyncio.create_task(self._pause_worker())
                else:
                    kills += 1
                    self._kill_worker(kills)
            await asyncio.sleep(0.2)  # the tail's tick (pacing, not a wait)
        self.log(f"long tail done: {kills} kills")
        return kills
