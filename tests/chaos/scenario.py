"""One chaos run from start to figures: processes, load, faults on a schedule, then the books.

Faults, triggered by progress (share of the requests accepted so far) so the
schedule holds at any N and machine speed, plus a worker kill every few seconds:

    15%  kill -9 one orchestrator replica, restart it 3 s later
    35%  nats-server stopped gracefully (SIGTERM), restarted on the same port and store
    50%  overload: publish at 3x the fleet's completion rate (stream full -> refusals)
    65%  kill -9 the other orchestrator replica, restart it 3 s later
    80%  nats-server killed -9, restarted on the same port and store
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from tests.chaos.ledger import (
    DONE_PREFIX,
    STORE_DONE_PREFIX,
    STORE_OUT_PREFIX,
    Figures,
    Recorder,
    Seen,
    describe,
    judge,
)
from tests.chaos.load import Publisher
from tests.chaos.procs import Fleet, NatsServer


def _env_num(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass
class ChaosConfig:
    requests: int = 300
    workers: int = 3
    capacity: int = 4
    rate: float = 10.0  # requests/s published outside the overload phase
    req_max_msgs: int = 24  # LLM_REQ size: small, so overload is refused at publish time
    kill_every_s: float = 3.0
    overload_s: float = 8.0
    drain_s: float = 120.0
    seed: int = 0

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
            overload_s=_env_num("CPLANE_CHAOS_OVERLOAD_S", 8.0 if n < 1000 else 20.0),
            drain_s=_env_num("CPLANE_CHAOS_DRAIN_S", 60.0 if n < 1000 else 120.0),
            seed=int(os.environ.get("CPLANE_CHAOS_SEED", str(int(time.time())))),
        )

    def service_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CPLANE") and k not in ("NATS_URL",)}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "CPLANE_LOG_LEVEL": "INFO",
            "CPLANE__STREAMS__REQ__MAX_MSGS": str(self.req_max_msgs),
            # the books replay every chunk at the end: keep them for the whole run
            "CPLANE__STREAMS__OUT__MAX_AGE_S": "7200",
        })
        return env


@dataclass
class Outcome:
    figures: Figures
    run_dir: Path
    report: list[str] = field(default_factory=list)


class Run:
    def __init__(self, cfg: ChaosConfig, run_dir: Path) -> None:
        self.cfg, self.dir = cfg, run_dir
        self.rng = random.Random(cfg.seed)
        self.t0 = time.monotonic()
        self._log = open(run_dir / "harness.log", "a", buffering=1)
        self.server = NatsServer(run_dir)
        self.fleet = Fleet(run_dir, self.server.url, cfg.service_env(), cfg.capacity)
        self.rec = Recorder()
        self.faults: list[tuple[float, str]] = []
        self.nc_pub: NATS | None = None
        self.nc_rec: NATS | None = None
        self.pub: Publisher | None = None

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
        self.nc_rec = await self._connect("chaos-rec")
        self.nc_pub = await self._connect("chaos-pub")
        beats: set[str] = set()

        async def on_hb(msg: nats.aio.msg.Msg) -> None:
            beats.add(msg.subject)

        hb = await self.nc_rec.subscribe("llm.hb.*", cb=on_hb)
        await self.rec.subscribe(self.nc_rec)
        for _ in range(2):
            self.fleet.start_orchestrator()
        for _ in range(self.cfg.workers):
            self.fleet.start_worker()
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
                    break
                except Exception:  # not provisioned yet
                    pass
            await asyncio.sleep(0.2)  # poll heartbeats and the streams (bounded: 60 s)
        else:
            raise TimeoutError(f"fleet not up within 60 s: heartbeats from {sorted(beats)}")
        await hb.unsubscribe()
        self.log(f"fleet up: heartbeats {sorted(beats)}")

    async def _restart_orch(self, i: int) -> None:
        p = self.fleet.orchestrators[i]
        self.log(f"FAULT kill -9 {p.name} pid={p.pid}")
        p.kill9()
        await asyncio.sleep(3.0)  # the fault under test: the orchestrator stays dead 3 s
        p.start()
        self.log(f"restarted {p.name} pid={p.pid}")

    async def _restart_nats(self, graceful: bool) -> None:
        how = "SIGTERM (graceful)" if graceful else "kill -9"
        self.log(f"FAULT nats-server {how} pid={self.server.proc.pid}")
        await self.server.restart(graceful, down_s=1.0)
        self.log(f"nats-server back pid={self.server.proc.pid}")

    def _kill_worker(self, n: int) -> None:
        live = self.fleet.live_workers()
        if not live:
            return
        # prefer a worker streaming right now: the kill lands mid-generation
        now = time.monotonic()
        busy = [w for w in live if now - self.rec.last_chunk_at.get(w, 0.0) < 0.5]
        wid = self.rng.choice(busy or live)
        p = self.fleet.workers[wid]
        self.log(f"FAULT kill -9 worker {wid} pid={p.pid}")
        p.kill9()
        new = self.fleet.start_worker(wid if n % 2 else None)
        self.log(f"replacement worker {new.name} pid={new.pid}")

    async def chaos(self, pub: Publisher) -> None:
        events: list[tuple[float, Callable[[], object]]] = [
            (0.15, lambda: self._restart_orch(0)),
            (0.35, lambda: self._restart_nats(True)),
            (0.50, lambda: pub.start_overload(self.cfg.overload_s)),
            (0.65, lambda: self._restart_orch(1)),
            (0.80, lambda: self._restart_nats(False)),
        ]
        cap = max(20, self.cfg.requests // 5)
        last_kill = time.monotonic()
        last_rss = 0.0
        kills = 0
        task: asyncio.Task[object] | None = None
        while not pub.done.is_set() or events or (task is not None and not task.done()):
            now = time.monotonic()
            if now - last_rss > 1.0:
                self.fleet.sample_rss()
                self.server.proc.sample_rss()
                last_rss = now
            if pub.overloaded() and pub.overload_accepted >= cap:
                pub.overload_until = 0.0
                self.log("overload phase ends (its accepted share reached)")
            due = pub.progress() >= events[0][0] or pub.done.is_set() if events else False
            if due and (task is None or task.done()):
                res = events.pop(0)[1]()
                if asyncio.iscoroutine(res):
                    task = asyncio.create_task(res)
            if now - last_kill >= self.cfg.kill_every_s:
                kills += 1
                self._kill_worker(kills)
                last_kill = now
            await asyncio.sleep(0.1)  # the fault scheduler's tick (pacing, not a wait)
        if task is not None:
            await task
        self.log(f"faults done: {kills} worker kills, events left {len(events)}")

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

    async def books(self, pub: Publisher, hung: set[str]) -> Outcome:
        assert self.nc_rec is not None
        fig = Figures(refused=pub.refused_total)
        fig.stranded = await self.stranded()
        self.fleet.sample_rss()
        fig.max_rss_mb = self.fleet.max_rss_mb()
        n_done = await self.rec.replay(self.nc_rec, "LLM_DONE", STORE_DONE_PREFIX + ">")
        n_out = await self.rec.replay(self.nc_rec, "LLM_OUT", STORE_OUT_PREFIX + ">")
        for rid in list(pub.ambiguous):
            if rid in self.rec.by_id:
                pub.accepted[rid] = 0.0
                pub.ambiguous.discard(rid)
        fig.accepted = len(pub.accepted)
        fig.hung = len(hung)
        for rid in pub.accepted:
            judge(fig, rid, self.rec.by_id.get(rid))
        for rid in sorted(hung)[:8]:
            fig.sample("hung", rid)
        unknown = set(self.rec.by_id) - set(pub.accepted)
        rep = [
            f"run dir: {self.dir}",
            f"seed={self.cfg.seed} config={self.cfg}",
            f"replayed LLM_DONE={n_done} LLM_OUT={n_out}; live terminals={len(self.rec.live_terminal)}",
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
            "faults (wall clock): " + "; ".join(f"{t:.3f} {w}" for t, w in self.faults),
        ]
        for kind, rids in fig.samples.items():
            rep.append(f"--- {kind}: {getattr(fig, kind)} (samples)")
            for rid in rids:
                rep.append(describe(rid, self.rec.by_id.get(rid)))
                rep.append(self._near_fault(self.rec.by_id.get(rid)))
                rep.extend(self._grep(rid))
        return Outcome(fig, self.dir, rep)

    async def close(self) -> None:
        for nc in (self.nc_pub, self.nc_rec):
            if nc is not None and not nc.is_closed:
                try:
                    await asyncio.wait_for(nc.close(), 5)
                except Exception:
                    pass
        await self.fleet.stop_all()
        await self.server.proc.terminate(10.0)
        self._log.close()


async def run_chaos(cfg: ChaosConfig, run_dir: Path) -> Outcome:
    run = Run(cfg, run_dir)
    try:
        await run.start()
        assert run.nc_pub is not None
        pub = Publisher(run.nc_pub, cfg.requests, cfg.rate, run.rng, f"{cfg.seed % 100000:05d}",
                        run.log)
        pub.completions = lambda: len(run.rec.live_terminal)
        ptask = asyncio.create_task(pub.run(limit_s=60 + 3 * cfg.requests / cfg.rate))
        try:
            await run.chaos(pub)
            await ptask
        finally:
            ptask.cancel()
            await pub.cancel()
        run.log(f"load done: accepted={len(pub.accepted)} refused={pub.refused_total}")
        hung = await run.drain(pub)
        return await run.books(pub, hung)
    finally:
        await run.close()
