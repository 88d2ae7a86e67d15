"""The chaos run on a 3-node JetStream cluster: the nodes, and the faults aimed at them.

`NatsCluster` is the run's broker when `CPLANE_CHAOS_CLUSTER` is set: N
`NatsServer` nodes (procs.py) with the cluster block of bus/cluster.py (TLS
routes authorized by certificate subject, route pings every second, so a
hung node loses its routes after about 4 s), the same accounts block on
each. Every stream and store is R3 (the services get
`CPLANE__STREAMS__REPLICAS`); each process lists every node, its own first
(orchestrators on n1 and n2, workers spread), so a node's death moves its
clients to the others.

`ClusterFaults` replaces the single server's faults in the lanes (faults.py):

    crashes  10%  kill -9 the node leading LLM_REQ, restarted on its store 3 s later
             30%  kill -9 the node leading LLM_OUT, restarted likewise
             42%  kill -9 the JetStream meta leader, restarted likewise
             78%  rolling restart: each node in turn stopped (SIGTERM), started, and
                  waited for until its JetStream is current (an upgrade)
    pauses   45%  one node SIGSTOPped 6-10 s (past its route timeout), then resumed
             90%  the node leading LLM_REQ SIGSTOPped 6-10 s (a hung leader)

After each kill or pause the harness times the election: the seconds until a
node other than the victim leads what it led (`ELECTION` lines of harness.log,
in the report). Workers and orchestrators are killed and paused as in the
single-node run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nats.js import JetStreamContext

from cplane.bus.cluster import (
    leader_of,
    node_config,
    node_healthy,
    node_index,
    route_urls,
    urls_from,
)
from cplane.bus.server import free_port
from cplane.bus.stream_config import copy_behind
from cplane.bus.tasks import cancel_all
from cplane.bus.tls import make_certs
from tests.chaos.procs import NatsServer, Proc

if TYPE_CHECKING:
    from tests.chaos.faults import FaultLanes

Event = Callable[[], Awaitable[None] | None]
DOWN_S = 3.0  # a killed node stays down this long before it is started on its store
ELECTION_MAX_S = 60.0


class NatsCluster:
    """`size` nats-server nodes forming one JetStream cluster, restartable one by one."""

    def __init__(self, run_dir: Path, size: int = 3, extra_config: str = "") -> None:
        tls = make_certs(run_dir / "tls")
        ports = [(free_port(), free_port()) for _ in range(size)]  # route, monitoring
        routes = route_urls([route for route, _ in ports])
        self.monitor_ports = [mon for _, mon in ports]
        self.nodes = [
            NatsServer(run_dir, name=f"n{i + 1}", extra_config="\n".join([
                node_config(f"n{i + 1}", route, mon, routes, tls), extra_config]))
            for i, (route, mon) in enumerate(ports)]

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def url_from(self, i: int) -> str:
        """Every node's URL, node `i % size` first."""
        return urls_from([n.url for n in self.nodes], i)

    @property
    def procs(self) -> list[Proc]:
        return [n.proc for n in self.nodes]

    def up(self, i: int) -> bool:
        return self.nodes[i].proc.alive() and not self.nodes[i].proc.paused

    def available(self) -> bool:
        """A majority of the nodes runs: a process started now finds JetStream."""
        return sum(self.up(i) for i in range(len(self.nodes))) > len(self.nodes) // 2

    async def start(self, timeout_s: float = 60.0) -> None:
        for node in self.nodes:
            await node.start()
        await self.until_healthy(range(len(self.nodes)), timeout_s)

    async def until_healthy(self, which: range | list[int], timeout_s: float) -> float:
        """Wait (bounded) until each node of `which` says its JetStream is current and a
        meta leader is known; the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            ok = await asyncio.to_thread(
                lambda: all(node_healthy(self.monitor_ports[i]) for i in which)
                and self.leader() is not None)
            if ok:
                return time.monotonic() - t0
            await asyncio.sleep(0.2)  # poll the nodes' /healthz (bounded by timeout_s)
        raise TimeoutError(f"cluster nodes {list(which)} not healthy within {timeout_s} s")

    def leader(self, stream: str | None = None) -> int | None:
        """Index of the node leading `stream` (None: the JetStream meta group), as the
        running, unpaused nodes see it."""
        ports = [p for i, p in enumerate(self.monitor_ports) if self.up(i)]
        return node_index(leader_of(ports, stream), len(self.nodes))

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)


class ClusterFaults:
    """The node faults of a cluster run, in the lanes of faults.FaultLanes."""

    def __init__(self, lanes: FaultLanes, cluster: NatsCluster) -> None:
        self.lanes, self.cluster = lanes, cluster
        self.log, self.counts, self.rng = lanes.log, lanes.counts, lanes.rng
        self.elections: list[tuple[str, float | None]] = []  # (what, seconds; None: none seen)
        self._led: dict[str | None, int | None] = {}  # LLM_REQ, LLM_OUT, meta -> leading node

    def crashes(self) -> list[tuple[float, Event]]:
        return [
            (0.10, lambda: self.kill_leader("LLM_REQ")),
            (0.30, lambda: self.kill_leader("LLM_OUT")),
            (0.42, lambda: self.kill_leader(None)),
            (0.78, self.rolling_restart),
        ]

    def pauses(self) -> list[tuple[float, Event]]:
        return [
            (0.45, lambda: self.pause_node(None)),
            (0.90, lambda: self.pause_node("LLM_REQ")),
        ]

    # -- elections ------------------------------------------------------------
    async def _leader_now(self, stream: str | None) -> int | None:
        """Who leads, asked so that a stale view cannot answer: a stream's info comes from
        its leader itself (the JetStream API, 1 s timeout); the meta leader is the one
        every running node names."""
        if stream is not None:
            nc = self.lanes.run.nc_rec
            if nc is None:
                return None
            try:
                info = await nc.jetstream(timeout=1.0).stream_info(stream)
            except Exception:
                return None
            return node_index(info.cluster.leader if info.cluster else None,
                              len(self.cluster.nodes))
        views = await asyncio.to_thread(
            lambda: {leader_of([p]) for i, p in enumerate(self.cluster.monitor_ports)
                     if self.cluster.up(i)})
        return node_index(views.pop(), len(self.cluster.nodes)) if len(views) == 1 else None

    async def _election(self, what: str, stream: str | None, old: int, t0: float) -> None:
        """Time until a node leads `stream` (None: the meta group) again: another one,
        or the old one once it is back (down for less than the election timeout, it
        may find no other elected and win again)."""
        while time.monotonic() - t0 < ELECTION_MAX_S:
            now = await self._leader_now(stream)
            if now is not None and (now != old or self.cluster.up(old)) and not (
                    now == old and time.monotonic() - t0 < 0.5):
                took = time.monotonic() - t0
                self.elections.append((what, took))
                again = " again, after its return" if now == old else ""
                self.log(f"ELECTION {what}: n{now + 1} leads{again} after {took:.2f}s "
                         f"(was n{old + 1})")
                return
            await asyncio.sleep(0.1)  # poll who leads (bounded)
        self.elections.append((what, None))
        self.log(f"ELECTION {what}: no other leader within {ELECTION_MAX_S:.0f}s")

    def _watch(self, victim: int, t0: float, why: str) -> list[asyncio.Task[None]]:
        """Elections to time after node `victim` went away: what it led of LLM_REQ,
        LLM_OUT and the meta group, read before the fault."""
        return [asyncio.create_task(self._election(f"{name or 'meta'} ({why} n{victim + 1})",
                                                   name, victim, t0))
                for name, led in self._led.items() if led == victim]

    def _note_leaders(self) -> None:
        self._led = {name: self.cluster.leader(name) for name in ("LLM_REQ", "LLM_OUT", None)}

    # -- faults -----------------------------------------------------------------
    async def kill_leader(self, stream: str | None) -> None:
        """kill -9 the node leading `stream` (None: the meta leader); restart it on its store."""
        async with self.lanes.locks["nats"]:
            await asyncio.to_thread(self._note_leaders)
            victim = self._led.get(stream)
            if victim is None:
                victim = self.rng.randrange(len(self.cluster.nodes))
            node = self.cluster.nodes[victim]
            what = f"leader of {stream}" if stream else "JetStream meta leader"
            self.counts["node_kills"] += 1
            self.log(f"FAULT kill -9 nats node n{victim + 1} ({what}) pid={node.proc.pid}")
            t0 = time.monotonic()
            node.proc.kill9()
            watch = self._watch(victim, t0, "kill")
            await asyncio.sleep(DOWN_S)  # the fault under test: the node stays dead
            await node.start()
            took = await self.cluster.until_healthy([victim], 60.0)
            self.log(f"nats node n{victim + 1} back pid={node.proc.pid}, current after "
                     f"{took:.2f}s")
            await asyncio.gather(*watch)

    async def pause_node(self, stream: str | None) -> None:
        """SIGSTOP a node (the one leading `stream`, else any) past its route timeout."""
        async with self.lanes.locks["nats"]:
            await asyncio.to_thread(self._note_leaders)
            victim = self._led.get(stream) if stream else None
            if victim is None:
                victim = self.rng.randrange(len(self.cluster.nodes))
            node = self.cluster.nodes[victim]
            seconds = self.rng.uniform(6.0, 10.0)
            watch = self._watch(victim, time.monotonic(), "pause")
            note = f"(leader of {stream})" if stream else ""
            await self.lanes._pause(node.proc, seconds, "nats node", note)
            await asyncio.gather(*watch)
            took = await self.cluster.until_healthy([victim], 60.0)
            self.log(f"nats node n{victim + 1} current again {took:.2f}s after SIGCONT")

    async def rolling_restart(self) -> None:
        """Each node in turn: SIGTERM (a clean shutdown), start on its store, wait until its
        JetStream is current again, then the next one (an upgrade, one node at a time)."""
        async with self.lanes.locks["nats"]:
            self.log("FAULT rolling restart of the nats cluster")
            for i, node in enumerate(self.cluster.nodes):
                await asyncio.to_thread(self._note_leaders)
                self.counts["node_restarts"] += 1
                self.log(f"rolling: stopping n{i + 1} pid={node.proc.pid} (SIGTERM)")
                t0 = time.monotonic()
                await node.proc.terminate(15.0)
                watch = self._watch(i, t0, "rolling stop")
                await node.start()
                took = await self.cluster.until_healthy([i], 60.0)
                self.log(f"rolling: n{i + 1} back pid={node.proc.pid}, current after {took:.2f}s")
                await asyncio.gather(*watch)
            self.log("rolling restart done")

    def report_lines(self) -> list[str]:
        took = sorted(s for _, s in self.elections if s is not None)
        lines = [f"leader elections: {len(self.elections)} timed, "
                 + (f"median {took[len(took) // 2]:.2f}s, max {took[-1]:.2f}s"
                    if took else "none seen")
                 + f"; node kills {self.counts['node_kills']}, pauses of nodes and rolling "
                   f"restarts in the fault list"]
        lines += [f"    {what}: {'none within %.0fs' % ELECTION_MAX_S if s is None else f'{s:.2f}s'}"
                  for what, s in self.elections]
        return lines


class SourceWatch:
    """How far behind LLM_OUT the server-side copies fall: LLM_DONE's source (terminals
    kept for days) and the harness's mirror (observed only: archive.py). A copy that falls further behind
    than LLM_OUT's max_age loses what aged out meanwhile, so the run reports the
    worst seen (sampled every second): messages behind, and seconds since contact."""

    def __init__(self, js: JetStreamContext, streams: tuple[str, ...]) -> None:
        self.js, self.streams = js, streams
        self.worst: dict[str, tuple[int, float]] = {s: (0, 0.0) for s in streams}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="source-watch")

    async def _run(self) -> None:
        while True:
            for name in self.streams:
                try:
                    info = await self.js.stream_info(name)
                except Exception:  # an election: the next sample
                    continue
                behind = copy_behind(info)
                if behind is not None:
                    (lag, idle), (now_lag, now_idle) = self.worst[name], behind
                    self.worst[name] = (max(lag, now_lag), max(idle, now_idle))
            await asyncio.sleep(1.0)  # the sampling period (bounded by the run)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_all([self._task])

    def report_lines(self, max_age_s: float) -> list[str]:
        return [f"copies of LLM_OUT (its max_age {max_age_s:g}s), worst sampled: " + "; ".join(
            f"{name} {lag} messages behind, {idle:.1f}s since contact"
            for name, (lag, idle) in self.worst.items())]
