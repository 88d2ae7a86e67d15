"""One chaos run from start to figures: processes, load, faults on a schedule, then the books.

Faults are triggered by progress (share of the requests accepted so far) so
the schedule holds at any N and machine speed. Three lanes run side by side,
each in its own order (a lane's next fault waits for its previous one to
end); faults on one target never overlap across lanes (one lock for
nats-server, one for the orchestrator replicas):

    crashes     15%  kill -9 orch0, restart it 3 s later
                35%  nats-server stopped gracefully (SIGTERM), restarted on the same port and store
                50%  overload: publish at 3x the fleet's completion rate (stream full -> refusals)
                60%  resubmissions (below), in the background
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

One worker (whichever holds its slot: a replacement inherits it) and orch1
reach nats-server only through their own proxy (tests/chaos/proxy.py); every
other process, and the harness, connect directly.

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

Long generations (`long_share` of the requests, seeded; `long_tokens` tokens,
21-40 s on the sim engine at ~7 ms a token) run against an LLM_OUT scaled
down to `out_max_age_s` (20 s: longer than a short request lives through the
usual fault chains, shorter than a long generation). The books read what
LLM_OUT stored from an archive (a mirror of LLM_OUT with a long max_age that
the harness creates; nothing in the services reads it), so every figure
keeps its meaning: a restart from scratch shows as a seq with two contents
or a Final whose text is not the streamed text (`inconsistent`); the report
says, for each stream started over, whether its first copy had aged out.

Resubmissions: with the duplicate windows of LLM_REQ / LLM_WORK / LLM_OUT /
LLM_DONE scaled down to `dup_window_s` (10 s), a few finished request ids are
published again, body and Nats-Msg-Id unchanged, once their window has
passed (at 60% and when the load is done). Expected: the stored terminal
comes back once on `llm.done.i.<id>` (what a README client, subscribed
there, waits for), nothing else. No terminal within `resubmit_wait_s` counts
as `hung`; a terminal other than the stored one counts in `dup_terminals`.

Unavailability (report): for each fault, the seconds from its start until the
first Final the harness received live for a request whose first work item
went out (seen live on `llm.work.>`) at or after the fault's start: how long
until the system served new work end to end again. "n/a": no request was
dispatched after it.

Routers: `CPLANE_CHAOS_ROUTER` (env) names the orchestrators' router
(`CPLANE__ORCHESTRATOR__ROUTER`); unset, one of least_loaded, prefix_aware,
affinity, pool is picked from the seed; `rotate` gives each replica start the
next one of those four.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig, StreamSource

from tests.chaos.ledger import (
    DONE_PREFIX,
    STORE_DONE_PREFIX,
    Figures,
    Recorder,
    Seen,
    describe,
    judge,
    stream_runs,
)
from tests.chaos.load import Publisher
from tests.chaos.procs import Fleet, NatsServer, Proc
from tests.chaos.proxy import Proxy

ROUTER_CHOICES = ("least_loaded", "prefix_aware", "affinity", "pool")
ARCHIVE = "CHAOS_OUT_ARCHIVE"  # the harness's mirror of LLM_OUT (the books read it)
STORE_ANY_PREFIX = "llm.s.*.i."  # chunks and terminals as LLM_OUT stores them


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching (`*` one token, `>` the rest)."""
    pt, st = pattern.split("."), subject.split(".")
    for i, tok in enumerate(pt):
        if tok == ">":
            return len(st) > i
        if i >= len(st) or (tok != "*" and tok != st[i]):
            return False
    return len(pt) == len(st)


def _env_num(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _env_range(name: str, default: tuple[int, int]) -> tuple[int, int]:
    raw = os.environ.get(name)
    if not raw:
        return default
    lo, _, hi = raw.partition("-")
    return int(lo), int(hi or lo)


@dataclass
class ChaosConfig:
    requests: int = 300
    workers: int = 3
    capacity: int = 4
    rate: float = 10.0  # requests/s published outside the overload phase
    req_max_msgs: int = 24  # LLM_REQ size: small, so overload is refused at publish time
    kill_every_s: float = 3.0
    pause_every_s: float = 6.0  # a streaming worker SIGSTOPped 4-12 s this often
    overload_s: float = 8.0
    drain_s: float = 120.0
    seed: int = 0
    router: str = ""  # "" = one of ROUTER_CHOICES from the seed; "rotate"; or a router name
    out_max_age_s: float = 20.0  # LLM_OUT's max_age in this run (default 300 s)
    dup_window_s: float = 10.0  # duplicate window of LLM_REQ / WORK / OUT / DONE (default 120 s)
    long_share: float = 0.04
    long_tokens: tuple[int, int] = (3000, 5500)  # ~7 ms a token on the sim engine: 21-40 s
    resubmit: int = 6  # finished ids published again, half at 60%, half after the load
    resubmit_wait_s: float = 25.0
    partitions: bool = True  # one worker and orch1 behind proxies

    @classmethod
    def from_env(cls) -> ChaosConfig:
        n = int(os.environ.get("CPLANE_CHAOS_REQUESTS", "300"))
        return cls(
            requests=n,
            workers=int(_env_num("CPLANE_CHAOS_WORKERS", 3)),
            capacity=int(_env_num("CPLANE_CHAOS_CAPACITY", 4)),
            rate=_env_num("CPLANE_CHAOS_RATE", 10.0),
            req_max_msgs=int(_env_num("CPLANE_CHAOS_REQ_MAX_MSGS", 24)),
            kill_every_s=_env_num("CPLANE_CHAOS_KILL_EVERY_S", 3.0),
            pause_every_s=_env_num("CPLANE_CHAOS_PAUSE_EVERY_S", 6.0),
            overload_s=_env_num("CPLANE_CHAOS_OVERLOAD_S", 8.0 if n < 1000 else 20.0),
            drain_s=_env_num("CPLANE_CHAOS_DRAIN_S", 90.0 if n < 1000 else 120.0),
            seed=int(os.environ.get("CPLANE_CHAOS_SEED", str(int(time.time())))),
            router=os.environ.get("CPLANE_CHAOS_ROUTER", ""),
            out_max_age_s=_env_num("CPLANE_CHAOS_OUT_MAX_AGE_S", 20.0),
            dup_window_s=_env_num("CPLANE_CHAOS_DUP_WINDOW_S", 10.0),
            # 4 %; 1 % in the long runs (80 long generations would hold most of the slots)
            long_share=_env_num("CPLANE_CHAOS_LONG_SHARE", 0.04 if n < 1000 else 0.01),
            long_tokens=_env_range("CPLANE_CHAOS_LONG_TOKENS", (3000, 5500)),
            resubmit=int(_env_num("CPLANE_CHAOS_RESUBMIT", 6)),
            resubmit_wait_s=_env_num("CPLANE_CHAOS_RESUBMIT_WAIT_S", 25.0),
            partitions=os.environ.get("CPLANE_CHAOS_PARTITIONS", "1") not in ("0", ""),
        )

    def router_for(self, replica: int, start: int) -> str:
        """The router of orchestrator `replica` at its `start`-th start (0 = first)."""
        if self.router == "rotate":
            return ROUTER_CHOICES[(replica + start) % len(ROUTER_CHOICES)]
        return self.router or ROUTER_CHOICES[self.seed % len(ROUTER_CHOICES)]

    def service_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CPLANE") and k not in ("NATS_URL",)}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "CPLANE_LOG_LEVEL": "INFO",
            "CPLANE__STREAMS__REQ__MAX_MSGS": str(self.req_max_msgs),
            # LLM_OUT keeps chunks seconds, not minutes: a long generation's head ages
            # out while it streams (the books read the harness's archive instead)
            "CPLANE__STREAMS__OUT__MAX_AGE_S": str(self.out_max_age_s),
            # prefix routers hash prompts in blocks this small (the load's common prefixes)
            "CPLANE__ORCHESTRATOR__PREFIX_BLOCK_TOKENS": "32",
        })
        for stream in ("REQ", "WORK", "OUT", "DONE"):
            env[f"CPLANE__STREAMS__{stream}__DUPLICATE_WINDOW_S"] = str(self.dup_window_s)
        return env


@dataclass
class Outcome:
    figures: Figures
    run_dir: Path
    report: list[str] = field(default_factory=list)


@dataclass
class Resubmission:
    rid: str
    at: float = 0.0  # wall time of the publish
    ack: str = ""  # Publisher.publish_again's answer
    # returned | returned_twice | different | silent | not_accepted; "late ..." when the
    # first answer came after resubmit_wait_s (seen by the books)
    outcome: str = "pending"
    wait_s: float = 0.0  # publish to the first live terminal copy
    copies_before: int = 0  # live terminal copies seen before the publish
    keys_before: set[str] = field(default_factory=set)  # distinct terminals before

    def settle(self, seen: Seen) -> None:
        """The final word, at the books: later copies, and terminals seen only stored."""
        new = set(seen.terminals) - self.keys_before
        if self.outcome == "silent" and (seen.live_copies > self.copies_before or new):
            self.outcome = "late different" if new else "late returned"
        elif self.outcome.startswith("returned") and new:
            self.outcome = "different"


Event = Callable[[], Awaitable[None] | None]


class Run:
    def __init__(self, cfg: ChaosConfig, run_dir: Path) -> None:
        self.cfg, self.dir = cfg, run_dir
        self.rng = random.Random(cfg.seed)
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self._log = open(run_dir / "harness.log", "a", buffering=1)
        self.server = NatsServer(run_dir)
        self.fleet = Fleet(run_dir, self.server.url, cfg.service_env(), cfg.capacity)
        self.rec = Recorder()
        self.faults: list[tuple[float, str]] = []
        self.counts: Counter[str] = Counter()
        self.nc_pub: NATS | None = None
        self.nc_rec: NATS | None = None
        self.pub: Publisher | None = None
        self.wproxy: Proxy | None = None  # the proxied worker's link
        self.oproxy: Proxy | None = None  # orch1's link
        self.locks = {"nats": asyncio.Lock(), "orch": asyncio.Lock()}
        self.nats_busy = False  # nats-server stopped, restarting or SIGSTOPped
        self.orch_starts: Counter[int] = Counter()
        self.pending_starts: list[tuple[str | None, str]] = []  # replacements waiting for a link
        self.worker_pause: asyncio.Task[None] | None = None
        self.bg: set[asyncio.Task[Any]] = set()  # resubmissions
        self.resubmits: dict[str, Resubmission] = {}
        self.long_hits: dict[str, list[str]] = {}  # long request id -> faults aimed at it

    def log(self, what: str) -> None:
        self._log.write(f"{time.monotonic() - self.t0:8.2f}s {time.time():.3f} {what}\n")
        if what.startswith("FAULT"):
            self.faults.append((time.time(), what.removeprefix("FAULT ")))

    async def _connect(self, name: str) -> NATS:
        async def err(exc: Exception) -> None:
            self.log(f"{name}: nats error {exc!r}")

        async def disc() -> None:
            self.log(f"{name}: disconnected")

        async def rec() -> None:
            self.log(f"{name}: reconnected")

        return await nats.connect(self.server.url, name=name, max_reconnect_attempts=-1,
                                  reconnect_time_wait=0.25, error_cb=err,
                                  disconnected_cb=disc, reconnected_cb=rec,
                                  pending_size=256 << 20)

    # -- phases -----------------------------------------------------------
    async def start(self) -> None:
        await self.server.start()
        self.log(f"nats-server on {self.server.url}, seed {self.cfg.seed}")
        if self.cfg.partitions:
            self.wproxy = await Proxy("proxy-w", self.server.port, self.log).start()
            self.oproxy = await Proxy("proxy-o", self.server.port, self.log).start()
            self.log(f"proxies: worker via {self.wproxy.url}, orch1 via {self.oproxy.url}")
        self.nc_rec = await self._connect("chaos-rec")
        self.nc_pub = await self._connect("chaos-pub")
        beats: set[str] = set()

        async def on_hb(msg: Msg) -> None:
            beats.add(msg.subject)

        hb = await self.nc_rec.subscribe("llm.hb.*", cb=on_hb)
        await self.rec.subscribe(self.nc_rec)
        for i in range(2):
            url = self.oproxy.url if i == 1 and self.oproxy is not None else None
            self.fleet.start_orchestrator(url, self._router_env(i))
        for k in range(self.cfg.workers):
            last = k == self.cfg.workers - 1
            self.fleet.start_worker(url=self.wproxy.url if last and self.wproxy else None)
        self.log("routers: " + ", ".join(
            f"{p.name}={p.env.get('CPLANE__ORCHESTRATOR__ROUTER')}"
            for p in self.fleet.orchestrators))
        js = self.nc_pub.jetstream()
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
        await js.add_stream(StreamConfig(
            name=ARCHIVE, mirror=StreamSource(name="LLM_OUT"), storage=StorageType.FILE,
            max_age=7200.0, allow_direct=False, mirror_direct=False))
        self.log(f"fleet up: heartbeats {sorted(beats)}; archive {ARCHIVE} mirrors LLM_OUT")

    def _router_env(self, replica: int) -> dict[str, str]:
        k = self.orch_starts[replica]
        self.orch_starts[replica] += 1
        return {"CPLANE__ORCHESTRATOR__ROUTER": self.cfg.router_for(replica, k)}

    def _clear(self, url: str) -> bool:
        """Whether a process started now on `url` can connect (its first connect must succeed)."""
        if self.nats_busy or not self.server.proc.alive():
            return False
        return all(px.passing() for px in (self.wproxy, self.oproxy)
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
            p.env = {**p.env, **self._router_env(i)}
            p.start()
            self.log(f"restarted {p.name} pid={p.pid} router="
                     f"{p.env['CPLANE__ORCHESTRATOR__ROUTER']}")

    async def _restart_nats(self, graceful: bool) -> None:
        async with self.locks["nats"]:
            how = "SIGTERM (graceful)" if graceful else "kill -9"
            self.log(f"FAULT nats-server {how} pid={self.server.proc.pid}")
            self.nats_busy = True
            try:
                await self.server.restart(graceful, down_s=1.0)
            finally:
                self.nats_busy = False
            self.log(f"nats-server back pid={self.server.proc.pid}")

    # -- pause lane -----------------------------------------------------------
    async def _leader(self) -> Proc | None:
        assert self.nc_rec is not None
        try:
            kv = await self.nc_rec.jetstream().key_value("llm_leases")
            entry = await asyncio.wait_for(kv.get("orchestrator"), 3.0)
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
                await self._pause(self.server.proc, self.rng.uniform(2.0, 6.0), "nats-server")
            finally:
                self.nats_busy = False

    # -- partition lane -------------------------------------------------------
    def _behind(self, px: Proxy) -> str:
        return ",".join(n for n, u in self.fleet.urls.items() if u == px.url
                        and any(p.name == n and p.alive() for p in self.fleet.all_procs()))

    async def _blackhole(self, px: Proxy | None, lo: float, hi: float) -> None:
        if px is None:
            return
        lock = self.locks["orch"] if px is self.oproxy else contextlib.nullcontext()
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
        proxies = [px for px in (self.wproxy, self.oproxy) if px is not None]
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
        for px in (self.wproxy, self.oproxy):
            if px is not None:
                self.counts["partitions"] += 1
                self.log(f"FAULT partition reset {px.name} ({self._behind(px)})")
                px.reset()

    # -- workers: kills and pauses -------------------------------------------
    def _aged_long(self) -> tuple[str, str, float] | None:
        """A long generation streaming now whose first chunk is older than LLM_OUT's
        max_age (and not hit yet): (request id, worker id, seconds streamed)."""
        assert self.pub is not None
        now = time.monotonic()
        for rid in self.pub.long:
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
        assert self.pub is not None
        now, out = time.monotonic(), set()
        for i, rid in enumerate(self.pub.long):
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

    # -- resubmissions --------------------------------------------------------
    def _resubmit_batch(self, k: int) -> None:
        pub = self.pub
        assert pub is not None
        # every duplicate window passed: since its publish (LLM_REQ), its dispatch
        # (LLM_WORK) and its terminal (LLM_OUT / LLM_DONE)
        now, wall, window = time.monotonic(), time.time(), self.cfg.dup_window_s + 2.0
        done = [rid for rid, at in pub.accepted.items()
                if at and now - at > window and rid in pub.bodies and rid not in self.resubmits
                and wall - self.rec.final_live_at.get(rid, wall) > window]
        for rid in self.rng.sample(sorted(done), min(k, len(done))):
            self.resubmits[rid] = Resubmission(rid)
            task = asyncio.create_task(self._resubmit(rid))
            self.bg.add(task)
            task.add_done_callback(self.bg.discard)
        self.log(f"resubmitting {min(k, len(done))} finished ids (of {len(done)} eligible)")

    async def _resubmit(self, rid: str) -> None:
        assert self.pub is not None
        r = self.resubmits[rid]
        seen = self.rec.by_id[rid]
        before_copies, before = seen.live_copies, set(seen.terminals)
        r.copies_before, r.keys_before = before_copies, before
        r.at = time.time()
        r.ack = await self.pub.publish_again(rid)
        self.log(f"resubmitted {rid}: {r.ack}")
        if r.ack != "accepted":
            r.outcome = "not_accepted"
            return
        self.counts["resubmitted"] += 1
        deadline = time.monotonic() + self.cfg.resubmit_wait_s
        while seen.live_copies == before_copies and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # poll the recorder for a terminal (bounded by the wait)
        if seen.live_copies == before_copies:
            r.outcome = "silent"
        else:
            r.wait_s = time.time() - r.at
            # a second copy, if one comes, comes right behind the first
            settle = time.monotonic() + 3.0
            while time.monotonic() < settle and seen.live_copies - before_copies < 2:
                await asyncio.sleep(0.1)  # poll for a repeated copy (bounded: 3 s)
            if set(seen.terminals) != before:
                r.outcome = "different"
            elif seen.live_copies - before_copies > 1:
                r.outcome = "returned_twice"
            else:
                r.outcome = "returned"
        self.log(f"resubmission of {rid}: {r.outcome} ({r.wait_s:.2f}s)")

    # -- the schedule ---------------------------------------------------------
    def _lanes(self, pub: Publisher) -> dict[str, list[tuple[float, Event]]]:
        half = max(1, self.cfg.resubmit // 2)
        return {
            "crashes": [
                (0.15, lambda: self._restart_orch(0)),
                (0.35, lambda: self._restart_nats(True)),
                (0.50, lambda: pub.start_overload(self.cfg.overload_s)),
                (0.60, lambda: self._resubmit_batch(half) if self.cfg.resubmit else None),
                (0.65, lambda: self._restart_orch(1)),
                (0.80, lambda: self._restart_nats(False)),
            ],
            "pauses": [
                (0.25, lambda: self._pause_orch(leader=True)),
                (0.45, self._pause_nats),
                (0.72, lambda: self._pause_orch(leader=False)),
                (0.90, self._pause_nats),
            ],
            "partitions": [
                (0.10, lambda: self._blackhole(self.wproxy, 4.0, 10.0)),
                (0.30, lambda: self._delay(6.0)),
                (0.55, lambda: self._blackhole(self.oproxy, 4.0, 10.0)),
                (0.62, lambda: self._blackhole(self.wproxy, 4.0, 10.0)),
                (0.85, self._reset),
            ] if self.cfg.partitions else [],
        }

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
                    self.fleet.sample_rss()
                    self.server.proc.sample_rss()
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
        assert self.pub is not None
        now = time.monotonic()
        for rid in self.pub.long:
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
                        m = await js.get_last_msg("LLM_DONE", STORE_DONE_PREFIX + rid)
                        self.rec.take(DONE_PREFIX + rid, m.data or b"", "stored")
                    except Exception:
                        pass
                continue
            await asyncio.sleep(1.0)  # poll the drain (bounded by its deadline)
        self.log(f"drain ended: {len(missing)} accepted requests without a terminal")
        return missing

    async def settle_resubmissions(self) -> None:
        """The second batch (the load is done: their windows passed), then every answer."""
        if self.cfg.resubmit:
            self._resubmit_batch(self.cfg.resubmit - len(self.resubmits))
        if self.bg:
            # each ends within its publish retry (20 s) + resubmit_wait_s + 3 s
            await asyncio.wait(list(self.bg), timeout=30 + self.cfg.resubmit_wait_s)

    async def stranded(self) -> int:
        assert self.nc_rec is not None
        js = self.nc_rec.jetstream()
        left = -1
        for _ in range(30):  # acks settle shortly after the last terminal
            left = 0
            for stream in ("LLM_REQ", "LLM_WORK"):
                try:
                    left += (await js.stream_info(stream)).state.messages
                except Exception as exc:
                    self.log(f"stream_info {stream}: {exc!r}")
            if left == 0:
                break
            await asyncio.sleep(0.5)  # poll for the acks to settle (bounded: 30 tries)
        return left

    async def _stream_lines(self) -> list[str]:
        """Messages and consumers of LLM_REQ / LLM_WORK at the end (evidence for `stranded`)."""
        assert self.nc_rec is not None
        js = self.nc_rec.jetstream()
        out: list[str] = []
        for stream in ("LLM_REQ", "LLM_WORK"):
            try:
                info = await js.stream_info(stream, subjects_filter=">")
                subjects = dict(sorted((info.state.subjects or {}).items())[:12])
                out.append(f"{stream}: {info.state.messages} messages, by subject {subjects}")
                consumers = await js.consumers_info(stream)
                filters = [c.config.filter_subject or ">" for c in consumers]
                orphans = [subj for subj in subjects
                           if not any(_matches(f, subj) for f in filters)]
                if orphans:
                    out.append(f"    subjects no consumer of {stream} reads: {orphans}")
                for c in consumers:
                    if c.num_pending or c.num_ack_pending or c.num_redelivered:
                        out.append(
                            f"    consumer {c.name} filter={c.config.filter_subject} "
                            f"pending={c.num_pending} ack_pending={c.num_ack_pending} "
                            f"redelivered={c.num_redelivered} waiting={c.num_waiting} "
                            f"delivered_seq={c.delivered.stream_seq if c.delivered else None}")
            except Exception as exc:
                out.append(f"{stream}: unreadable {exc!r}")
        return out

    def _beat_lines(self) -> list[str]:
        """Each worker id's heartbeats (wall clock), for a worker that went silent or stuck."""
        return ["heartbeats per worker id (first, last, count, last brief): " + "; ".join(
            f"{w}: {b[0] - self.t0_wall:.1f}s..{b[1] - self.t0_wall:.1f}s n={b[2]} {b[3]}"
            for w, b in sorted(self.rec.beats.items()))]

    def _restart_lines(self, seen: Seen | None) -> list[str]:
        """Each live run that streamed a seq again (a stream started over), and whether that
        seq's first copy was still in LLM_OUT then (worker clocks)."""
        if seen is None:
            return []
        first_at: dict[int, float] = {}  # seq -> worker clock (ms) of its first live copy
        out: list[str] = []
        for w, a, b, t0, t1 in stream_runs(seen.arrivals):
            if a in first_at:
                age = (t0 - first_at[a]) / 1000
                where = ("had aged out of" if age > self.cfg.out_max_age_s else "was still in")
                out.append(f"    {w} streamed seq {a}.. again {age:.1f}s after its first copy, "
                           f"which {where} LLM_OUT (max_age {self.cfg.out_max_age_s:.0f}s)")
            elif a > 0 and a - 1 not in first_at:
                out.append(f"    {w} streamed from seq {a} while seq {a - 1} was never seen live "
                           f"(a gap it continued after)")
            for seq in range(a, b + 1):
                first_at.setdefault(seq, t0 + (t1 - t0) * (seq - a) / max(1, b - a))
        return out[:4]

    def _kinds(self, rids: list[str]) -> str:
        assert self.pub is not None
        long = [r for r in rids if r in self.pub.long]
        again = [r for r in rids if r in self.resubmits and r not in long]
        other = [r for r in rids if r not in long and r not in again]
        return f"long: {' '.join(long) or '-'}; resubmitted: {' '.join(again) or '-'}; " \
               f"other: {' '.join(other) or '-'}"

    def _near_fault(self, seen: Seen | None) -> str:
        """The fault closest in time to a request's first terminal (ts_ms, worker clock)."""
        stamps = [o.get("ts_ms", 0) / 1000 for o, _ in (seen.terminals.values() if seen else [])]
        stamps = [t for t in stamps if t]
        if not stamps or not self.faults:
            return "    (no terminal time to place among the faults)"
        first = min(stamps)
        t, what = min(self.faults, key=lambda f: abs(f[0] - first))
        return f"    first terminal at {first:.3f}: nearest fault {what} at {t:.3f} ({first - t:+.2f}s)"

    def _grep(self, rid: str, limit: int = 12) -> list[str]:
        hits: list[str] = []
        for path in sorted(self.dir.glob("*.log")):
            if path.name == "harness.log":
                continue
            with open(path, errors="replace") as fh:
                for line in fh:
                    if rid in line:
                        hits.append(f"    {path.name}: {line.rstrip()[:300]}")
                        if len(hits) >= limit:
                            return hits
        return hits

    def _unavailable(self, t_fault: float) -> float | None:
        """Seconds from t_fault to the first live Final of a request first dispatched after it."""
        best: float | None = None
        for rid, t_work in self.rec.first_work_at.items():
            t_fin = self.rec.final_live_at.get(rid)
            if t_work < t_fault or t_fin is None:
                continue
            if best is None or t_fin - t_fault < best:
                best = t_fin - t_fault
        return best

    def _fault_lines(self) -> list[str]:
        out = ["faults (wall clock; unavailable = fault start -> first live Final of a "
               "request dispatched after it):"]
        for t, what in self.faults:
            u = self._unavailable(t)
            out.append(f"    {t:.3f} (+{t - self.t0_wall:6.1f}s) unavailable "
                       f"{'n/a' if u is None else f'{u:5.2f}s'}  {what}")
        return out

    def _long_lines(self, pub: Publisher) -> list[str]:
        out = [f"long generations: {len(pub.long)} publishes tried, "
               f"{sum(1 for r in pub.long if r in pub.accepted)} accepted; "
               f"{len(self.long_hits)} hit by a fault after their head aged out of LLM_OUT "
               f"(max_age {self.cfg.out_max_age_s:.0f}s)"]
        for rid in sorted(pub.long):
            if rid not in pub.accepted:
                continue
            seen = self.rec.by_id.get(rid)
            terms = [o for o, _ in seen.terminals.values()] if seen else []
            res = "; ".join(
                f"{t.get('type')} {t.get('finish_reason') or t.get('code')} "
                f"tokens={(t.get('usage') or {}).get('completion_tokens')} "
                f"chunks={t.get('chunks')} workers={t.get('workers')}" for t in terms) or "none"
            seqs = len(seen.chunks) if seen else 0
            bad = sum(1 for c in seen.chunks.values() if len(c) > 1) if seen else 0
            out.append(f"    {rid} max_tokens={pub.long[rid]} seqs seen={seqs} "
                       f"seqs with two contents={bad} hits={self.long_hits.get(rid, [])} "
                       f"terminal: {res}")
        return out

    async def books(self, pub: Publisher, hung: set[str]) -> Outcome:
        assert self.nc_rec is not None
        fig = Figures(refused=pub.refused_total)
        fig.stranded = await self.stranded()
        self.fleet.sample_rss()
        fig.max_rss_mb = self.fleet.max_rss_mb()
        n_done = await self.rec.replay(self.nc_rec, "LLM_DONE", STORE_DONE_PREFIX + ">")
        n_out = await self.rec.replay(self.nc_rec, ARCHIVE, STORE_ANY_PREFIX + ">")
        for rid in list(pub.ambiguous):
            if rid in self.rec.by_id:
                pub.accepted[rid] = 0.0
                pub.ambiguous.discard(rid)
        fig.accepted = len(pub.accepted)
        for r in self.resubmits.values():
            r.settle(self.rec.by_id[r.rid])
        silent = sorted(r.rid for r in self.resubmits.values() if r.outcome == "silent")
        fig.hung = len(hung) + len(silent)
        fig.pauses = self.counts["pauses"]
        fig.partitions = self.counts["partitions"]
        fig.long_generations = sum(1 for r in pub.long if r in pub.accepted)
        fig.resubmitted = self.counts["resubmitted"]
        for rid in pub.accepted:
            judge(fig, rid, self.rec.by_id.get(rid))
        for rid in [*sorted(hung), *silent][:8]:
            fig.sample("hung", rid)
        unknown = set(self.rec.by_id) - set(pub.accepted)
        rep = [
            f"run dir: {self.dir}",
            f"seed={self.cfg.seed} config={self.cfg}",
            "routers per orchestrator start: " + ", ".join(
                f"orch{i}: " + "/".join(self.cfg.router_for(i, k)
                                        for k in range(self.orch_starts[i]))
                for i in range(len(self.fleet.orchestrators))),
            f"replayed LLM_DONE={n_done} {ARCHIVE} (LLM_OUT's mirror)={n_out}; "
            f"live terminals={len(self.rec.live_terminal)}",
            f"refusals: {dict(pub.refused)}",
            f"ambiguous publishes (no answer within {pub.retry_s}s): {len(pub.ambiguous)} "
            f"{sorted(pub.ambiguous)[:10]}",
            f"publish retries: {pub.retries}; overload phase accepted={pub.overload_accepted} "
            f"refused={pub.overload_refused}",
            f"error codes: {dict(fig.codes)}",
            f"outputs for ids never accepted: {len(unknown)} {sorted(unknown)[:5]}; "
            f"undecodable: {len(self.rec.undecodable)}; request_id != subject: {self.rec.foreign}",
            f"notes: {self.rec.notes}",
            f"processes that died on their own: {self.fleet.dead_unexpectedly()}",
            "peak RSS (VmHWM) MB: orchestrators %d, workers %d, nats-server %d" % (
                max((p.peak_kb for p in self.fleet.orchestrators), default=0) // 1024,
                max((p.peak_kb for p in self.fleet.all_procs()
                     if p not in self.fleet.orchestrators), default=0) // 1024,
                self.server.proc.peak_kb // 1024),
            "proxies: " + "; ".join(px.stats() for px in (self.wproxy, self.oproxy)
                                    if px is not None),
            f"hung: {len(hung)} accepted without a terminal after the drain, {len(silent)} "
            f"resubmissions answered by nothing within {self.cfg.resubmit_wait_s:.0f}s",
            "resubmissions (window %.0fs): %s" % (self.cfg.dup_window_s, "; ".join(
                f"{r.rid} ack={r.ack} {r.outcome}"
                + (f" after {r.wait_s:.2f}s" if r.wait_s else "")
                for r in self.resubmits.values()) or "none"),
            *self._long_lines(pub),
            *self._fault_lines(),
            *(await self._stream_lines()),
            *self._beat_lines(),
        ]
        for kind, rids in fig.samples.items():
            rep.append(f"--- {kind}: {getattr(fig, kind)} (samples; all by kind: "
                       f"{self._kinds(fig.ids[kind])})")
            for rid in rids:
                if rid in self.resubmits:
                    r = self.resubmits[rid]
                    rep.append(f"{rid}: RESUBMITTED at {r.at:.3f} after its windows "
                               f"(ack {r.ack}): {r.outcome}" + (
                                   f" (no terminal within {self.cfg.resubmit_wait_s:.0f}s)"
                                   if r.outcome.startswith(("silent", "late"))
                                   else f" after {r.wait_s:.2f}s"))
                rep.append(describe(rid, self.rec.by_id.get(rid)))
                rep.extend(self._restart_lines(self.rec.by_id.get(rid)))
                rep.append(self._near_fault(self.rec.by_id.get(rid)))
                rep.extend(self._grep(rid))
        return Outcome(fig, self.dir, rep)

    async def close(self) -> None:
        for t in list(self.bg):
            t.cancel()
        await asyncio.gather(*self.bg, return_exceptions=True)
        for px in (self.wproxy, self.oproxy):
            if px is not None:
                px.set_pass()
        for nc in (self.nc_pub, self.nc_rec):
            if nc is not None and not nc.is_closed:
                try:
                    await asyncio.wait_for(nc.close(), 5)
                except Exception:
                    pass
        await self.fleet.stop_all()
        for px in (self.wproxy, self.oproxy):
            if px is not None:
                await px.close()
        await self.server.proc.terminate(10.0)
        self._log.close()


async def run_chaos(cfg: ChaosConfig, run_dir: Path) -> Outcome:
    run = Run(cfg, run_dir)
    try:
        await run.start()
        assert run.nc_pub is not None
        pub = Publisher(run.nc_pub, cfg.requests, cfg.rate, run.rng, f"{cfg.seed % 100000:05d}",
                        run.log, long_share=cfg.long_share, long_tokens=cfg.long_tokens)
        run.pub = pub
        pub.completions = lambda: len(run.rec.live_terminal)
        ptask = asyncio.create_task(pub.run(limit_s=60 + 3 * cfg.requests / cfg.rate))
        try:
            await run.chaos(pub)
            await ptask
        finally:
            ptask.cancel()
            await pub.cancel()
        run.log(f"load done: accepted={len(pub.accepted)} refused={pub.refused_total} "
                f"long={len(pub.long)}")
        resub = asyncio.create_task(run.settle_resubmissions())
        hung = await run.drain(pub)
        await resub
        return await run.books(pub, hung)
    finally:
        await run.close()
