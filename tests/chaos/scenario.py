"""One chaos run from start to figures: processes, load, faults on a schedule, then the books.

This module holds the run itself: it starts nats-server, the proxies, two
orchestrator replicas and the workers (Run.start), runs the load beside the
fault lanes, drains, reads the books and stops everything (run_chaos). The
knobs are in config.py, the faults and their schedule in faults.py, the ids
published again in resubmit.py, the figures and the report in report.py.

Every process is on its own credentials against the multi-tenant
configuration (tenants.py says who is who): the broker's configuration holds
the accounts block, the services get `--creds`, the load publishes from the
tenants' accounts, the recorder reads as the operator, and a spy on each
tenant account counts what it receives of another tenant (`leaks`).

One worker (whichever holds its slot: a replacement inherits it) and orch1
reach nats-server only through their own proxy (tests/chaos/proxy.py); every
other process, and the harness, connect directly.

Long generations (`long_share` of the requests, seeded; `long_tokens` tokens,
21-40 s on the sim engine at ~7 ms a token) run against an LLM_OUT scaled
down to `out_max_age_s` (20 s: longer than a short request lives through the
usual fault chains, shorter than a long generation). The books read what
LLM_OUT stored from the harness's own archive of it (archive.py: a durable
consumer on LLM_OUT made as soon as LLM_OUT exists, read and acked for the
whole run on a connection of its own; report.py says why every figure keeps
its meaning). A server-side mirror of LLM_OUT is kept beside it, observed
only: on a cluster it skipped messages during node faults.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig, StreamSource

from cplane.bus.credentials import connect_options, server_list
from cplane.schemas.settings import NatsSettings
from tests.chaos.archive import MIRROR, OutArchive
from tests.chaos.cluster import ClusterFaults, NatsCluster, SourceWatch
from tests.chaos.config import ChaosConfig
from tests.chaos.faults import FaultLanes
from tests.chaos.ledger import Recorder, done_subject
from tests.chaos.load import Publisher
from tests.chaos.procs import Fleet, NatsServer
from tests.chaos.proxy import Proxy
from tests.chaos.report import Books, Outcome
from tests.chaos.resubmit import Resubmitter
from tests.chaos.tenants import OPERATOR, ChaosAuth, TenantSpy
from tests.waiting import subscribed

__all__ = ["ChaosConfig", "Outcome", "Run", "run_chaos"]


class Run:
    def __init__(self, cfg: ChaosConfig, run_dir: Path) -> None:
        self.cfg, self.dir = cfg, run_dir
        self.rng = random.Random(cfg.seed)
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self._log = open(run_dir / "harness.log", "a", buffering=1)
        self.auth = ChaosAuth(run_dir, cfg.worker_ids(), cfg.tenants, cfg.leader_partitions)
        self.cluster = (NatsCluster(run_dir, cfg.cluster, extra_config=self.auth.accounts)
                        if cfg.cluster else None)
        self.server: NatsServer | NatsCluster = self.cluster or NatsServer(
            run_dir, extra_config=self.auth.accounts)
        self.fleet = Fleet(run_dir, self.server.url, cfg.service_env(), cfg.capacity,
                           creds=self.auth.creds, worker_ids=self.auth.worker_ids)
        self.rec = Recorder()
        self.faults: list[tuple[float, str]] = []
        self.counts: Counter[str] = Counter()
        self.nc_pub: dict[str, NATS] = {}  # the load's connections, by tenant
        self.nc_spy: dict[str, NATS] = {}  # the spies' connections, by tenant
        self.spies = [TenantSpy(t, cfg.tenants) for t in cfg.tenants]
        self.nc_rec: NATS | None = None  # the operator's: recorder, books, look-ups
        self.nc_archive: NATS | None = None  # the operator's too: the archive of LLM_OUT
        self.archive: OutArchive | None = None  # made once LLM_OUT exists (start)
        self.pub: Publisher | None = None
        self.wproxy: Proxy | None = None  # the proxied worker's link
        self.oproxy: Proxy | None = None  # orch1's link
        self.orch_starts: Counter[int] = Counter()
        self.resubmitter = Resubmitter(self)
        self.lanes = FaultLanes(self, self.resubmitter.batch)
        self.cluster_faults = (ClusterFaults(self.lanes, self.cluster)
                               if self.cluster is not None else None)
        self.lanes.broker_faults = self.cluster_faults
        self.source_watch: SourceWatch | None = None  # a cluster run: LLM_OUT's copies' lag

    def log(self, what: str) -> None:
        self._log.write(f"{time.monotonic() - self.t0:8.2f}s {time.time():.3f} {what}\n")
        if what.startswith("FAULT"):
            self.faults.append((time.time(), what.removeprefix("FAULT ")))

    async def _connect(self, name: str, creds: str) -> NATS:
        async def err(exc: Exception) -> None:
            self.log(f"{name}: nats error {exc!r}")

        async def disc() -> None:
            self.log(f"{name}: disconnected")

        async def rec() -> None:
            self.log(f"{name}: reconnected")

        return await nats.connect(server_list(self.server.url), name=name, max_reconnect_attempts=-1,
                                  reconnect_time_wait=0.25, error_cb=err,
                                  disconnected_cb=disc, reconnected_cb=rec,
                                  pending_size=256 << 20, **self._pings,
                                  **connect_options(NatsSettings(creds=creds)))

    # -- phases -----------------------------------------------------------
    async def start(self) -> None:
        await self.server.start()
        self.log(f"nats-server on {self.server.url}, seed {self.cfg.seed}")
        if self.cfg.partitions and isinstance(self.server, NatsServer):
            self.wproxy = await Proxy("proxy-w", self.server.port, self.log).start()
            self.oproxy = await Proxy("proxy-o", self.server.port, self.log).start()
            self.log(f"proxies: worker via {self.wproxy.url}, orch1 via {self.oproxy.url}")
        self.nc_rec = await self._connect("chaos-rec", self.auth.creds(OPERATOR))
        for spy in self.spies:
            nc = await self._connect(f"chaos-spy-{spy.tenant}",
                                     self.auth.tenant_creds(spy.tenant))
            await nc.subscribe(">", cb=spy.on_msg, pending_msgs_limit=2_000_000,
                               pending_bytes_limit=1 << 30)
            await subscribed(nc)
            self.nc_spy[spy.tenant] = nc
        for t in self.cfg.tenants:
            self.nc_pub[t] = await self._connect(f"chaos-pub-{t}", self.auth.tenant_creds(t))
        beats: set[str] = set()

        async def on_hb(msg: Msg) -> None:
            beats.add(msg.subject)

        hb = await self.nc_rec.subscribe("llm.hb.*", cb=on_hb)
        await self.rec.subscribe(self.nc_rec)
        for i in range(2):
            url = self.oproxy.url if i == 1 and self.oproxy is not None else self._first(i)
            self.fleet.start_orchestrator(url, self.router_env(i))
        for k in range(self.cfg.workers):
            last = k == self.cfg.workers - 1
            self.fleet.start_worker(url=self.wproxy.url if last and self.wproxy
                                    else self._first(2 + k))
        self.log("routers: " + ", ".join(
            f"{p.name}={p.env.get('CPLANE__ORCHESTRATOR__ROUTER')}"
            for p in self.fleet.orchestrators))
        js = self.nc_rec.jetstream()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            dead = [p for p in self.fleet.all_procs() if not p.alive()]
            if dead:
                raise RuntimeError("a service exited during start-up:\n"
                                   + "\n".join(p.tail() for p in dead))
            if len(beats) >= self.cfg.workers:
                try:
                    await js.stream_info("LLM_REQ")
                    await js.stream_info("LLM_OUT")
                    break
                except Exception:  # not provisioned yet
                    pass
            await asyncio.sleep(0.2)  # poll heartbeats and the streams (bounded: 60 s)
        else:
            raise TimeoutError(f"fleet not up within 60 s: heartbeats from {sorted(beats)}")
        await hb.unsubscribe()
        # before the first request: the archive reads LLM_OUT from its first message
        self.nc_archive = await self._connect("chaos-archive", self.auth.creds(OPERATOR))
        self.archive = OutArchive(self.nc_archive, self.log)
        await self.archive.start()
        await js.add_stream(StreamConfig(
            name=MIRROR, mirror=StreamSource(name="LLM_OUT"), storage=StorageType.FILE,
            max_age=7200.0, allow_direct=False, mirror_direct=False,
            num_replicas=min(3, self.cfg.cluster or 1)))
        self.log(f"fleet up: heartbeats {sorted(beats)}; the archive reads LLM_OUT; "
                 f"{MIRROR} mirrors it (observed only)")
        if self.cluster is not None:
            self.source_watch = SourceWatch(js, ("LLM_DONE", MIRROR))
            self.source_watch.start()

    @property
    def _pings(self) -> dict[str, int]:
        """On a cluster the harness's own connections leave a hung node within ~4 s (a
        ping a second): the recorder's live view then misses seconds, not minutes."""
        return {"ping_interval": 1, "max_outstanding_pings": 3} if self.cluster else {}

    def _first(self, i: int) -> str | None:
        """On a cluster: every node, node i first (orchestrators on n1 and n2, workers
        spread); None (the server's URL) on one server."""
        return self.cluster.url_from(i) if self.cluster is not None else None

    def router_env(self, replica: int) -> dict[str, str]:
        """The environment that sets orchestrator `replica`'s router for its next start."""
        k = self.orch_starts[replica]
        self.orch_starts[replica] += 1
        return {"CPLANE__ORCHESTRATOR__ROUTER": self.cfg.router_for(replica, k)}



    async def drain(self, pub: Publisher) -> set[str]:
        """Wait (bounded) for a terminal of every accepted request; returns the ones still without."""
        assert self.nc_rec is not None
        js = self.nc_rec.jetstream()
        deadline = time.monotonic() + self.cfg.drain_s
        last_look = 0.0
        missing: set[str] = set()
        while time.monotonic() < deadline:
            self.fleet.sample_rss()
            missing = {r for r in pub.accepted if not self.rec.has_terminal(r)}
            if not missing:
                break
            if time.monotonic() - last_look > 5 and len(missing) <= 400:
                last_look = time.monotonic()
                for rid in list(missing):
                    try:
                        tenant = pub.tenant_of.get(rid)
                        m = await js.get_last_msg("LLM_DONE", done_subject(tenant, rid, True))
                        self.rec.take(done_subject(tenant, rid), m.data or b"", "stored")
                    except Exception:
                        pass
                continue
            await asyncio.sleep(1.0)  # poll the drain (bounded by its deadline)
        self.log(f"drain ended: {len(missing)} accepted requests without a terminal")
        return missing


    async def close(self) -> None:
        await self.resubmitter.cancel()
        if self.archive is not None:
            await self.archive.stop()
        if self.source_watch is not None:
            await self.source_watch.stop()
        for px in (self.wproxy, self.oproxy):
            if px is not None:
                px.set_pass()
        for nc in (*self.nc_pub.values(), *self.nc_spy.values(), self.nc_rec,
                   self.nc_archive):
            if nc is not None and not nc.is_closed:
                try:
                    await asyncio.wait_for(nc.close(), 5)
                except Exception:
                    pass
        await self.fleet.stop_all()
        for px in (self.wproxy, self.oproxy):
            if px is not None:
                await px.close()
        await self.server.stop()
        self._log.close()


async def run_chaos(cfg: ChaosConfig, run_dir: Path) -> Outcome:
    run = Run(cfg, run_dir)
    try:
        await run.start()
        pub = Publisher(run.nc_pub, cfg.requests, cfg.rate, run.rng, f"{cfg.seed % 100000:05d}",
                        run.log, long_share=cfg.long_share, long_tokens=cfg.long_tokens,
                        partitions=cfg.leader_partitions)
        run.pub = pub
        pub.completions = lambda: len(run.rec.live_terminal)
        ptask = asyncio.create_task(pub.run(limit_s=60 + 10 * cfg.requests / cfg.rate))
        try:
            await run.lanes.chaos(pub)
            await ptask
        finally:
            ptask.cancel()
            await pub.cancel()
        run.log(f"load done: accepted={len(pub.accepted)} refused={pub.refused_total} "
                f"long={len(pub.long)}")
        resub = asyncio.create_task(run.resubmitter.settle())
        hung = await run.drain(pub)
        await resub
        books = Books(run, run.lanes.long_hits, run.resubmitter.resubmits)
        return await books.books(pub, hung)
    finally:
        await run.close()
