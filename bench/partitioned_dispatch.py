"""The fleet's dispatch rate with partitioned leadership: 4 model pools, 1, 2 and 4
orchestrator replicas (docs/replicas.md).

Per replica count, on a private loopback nats-server: one zero-cost sim worker per
pool (models m1..m4, capacity `--worker-capacity`, 4096: more slots than requests,
so completions never hold dispatch back and the figure is the orchestrators'), the
replicas started through the CLI with
`--partitions m1,m2,m3,m4` as separate processes (one Python process each, as in
production), then, once every pool is led and the pools are spread over the
replicas, the replicas are paused (SIGSTOP; a lease of 10 s here, so none lapses),
`--per-pool` requests per pool are published on the pools' subjects, and the
replicas resumed (SIGCONT): the backlog measures dispatch, not the publisher. The
dispatch rate is the work items seen on `llm.work.>` divided by the time from the
resume to the last (the run ends when every request was dispatched; what the
workers finished by then is printed beside it).

Bounded: `--per-pool` requests per pool (default 2500), at most `--timeout-s` per
run. Loopback only.

    python bench/partitioned_dispatch.py [--per-pool 2500] [--replicas 1,2,4] [--json out.json]

On a 2-core machine every process shares the same two cores (nats-server, the 4
workers, the replicas and this publisher): the replicas' added dispatch capacity
shows only as far as cores are idle, and 4 replicas cannot run 4 dispatch loops at
once on 2 cores. The table prints the host's core count beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.aio.msg import Msg
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remote_overhead import cpu_s  # noqa: E402

from cplane.bus.server import EmbeddedNats  # noqa: E402
from cplane.orchestrator.partitions import lease_key  # noqa: E402
from cplane.schemas.subjects import Subjects, pool_of  # noqa: E402

POOLS = ("m1", "m2", "m3", "m4")
S = Subjects()


def _python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class Procs:
    """The run's CLI processes; each ends (SIGTERM, then SIGKILL) on `stop`."""

    def __init__(self, run_dir: Path, url: str) -> None:
        self.dir, self.url = run_dir, url
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CPLANE")}
        self.env.update({"PYTHONUNBUFFERED": "1", "CPLANE_LOG_LEVEL": "WARNING",
                         "CPLANE__ORCHESTRATOR__PARTITIONS": ",".join(POOLS),
                         "CPLANE__ORCHESTRATOR__ROUTER": "pool",
                         # paused while the backlog is published: no lease may lapse
                         "CPLANE__ORCHESTRATOR__LEASE_TTL_S": "10",
                         # no LLM_DONE look-up per new request: the dispatch loop alone
                         "CPLANE__ORCHESTRATOR__CHECK_STORED_TERMINALS": "false"})
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []

    def signal(self, names: list[str], sig: int) -> None:
        for name, p in zip(self.names, self.procs, strict=True):
            if name in names and p.poll() is None:
                p.send_signal(sig)

    def start(self, name: str, *args: str) -> None:
        self.names.append(name)
        with open(self.dir / f"{name}.log", "ab") as log:  # the child keeps its own copy
            self.procs.append(subprocess.Popen(
                [_python(), "-m", "cplane.cli", *args, "--nats-url", self.url],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                start_new_session=True))

    async def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.send_signal(signal.SIGCONT)  # a paused one acts on SIGTERM once resumed
        deadline = time.monotonic() + 10
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # bounded wait for the exits
        for p in self.procs:
            if p.poll() is None:
                p.kill()


def _cpu_by_role(procs: Procs, server_pid: int) -> dict[str, float]:
    out = {"nats-server": cpu_s([server_pid]), "replicas": 0.0, "workers": 0.0}
    for name, p in zip(procs.names, procs.procs, strict=True):
        out["replicas" if name.startswith("orch") else "workers"] += cpu_s([p.pid])
    return out


async def _until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)  # poll a state only the broker shows (bounded)


async def one_run(replicas: int, per_pool: int, timeout_s: float, capacity: int
                  ) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"cplane-pbench-r{replicas}-"))
    (run_dir / "js").mkdir()
    server = EmbeddedNats(store_dir=str(run_dir / "js"))
    server.start()
    procs = Procs(run_dir, server.url)
    nc = await nats.connect(server.url)
    try:
        beats: set[str] = set()

        async def on_hb(msg: Msg) -> None:
            beats.add(msg.subject)

        hb = await nc.subscribe("llm.hb.*", cb=on_hb)
        for i in range(replicas):
            procs.start(f"orch{i}", "orchestrator")
        for i, model in enumerate(POOLS):
            procs.start(f"w{i}", "worker", "--engine", "sim", "--zero-cost", "--model", model,
                        "--worker-id", f"w{i}", "--capacity", str(capacity))
        await _until(lambda: _true(len(beats) >= len(POOLS)), 60, "workers heartbeat")
        await hb.unsubscribe()
        js = nc.jetstream()
        kv: Any = None

        async def spread() -> bool:
            nonlocal kv
            try:
                kv = kv or await js.key_value("llm_leases")
                holders = [(await kv.get(lease_key(p))).value for p in POOLS]
            except Exception:  # not yet created / not yet led
                return False
            # balanced: every replica leads its share (ceil(pools / replicas) at most)
            counts = [holders.count(h) for h in set(holders)]
            return (len(counts) == min(replicas, len(POOLS))
                    and max(counts) <= -(-len(POOLS) // replicas))

        await _until(spread, 60, "pools spread over the replicas")
        items: dict[str, int] = {}  # orchestrator id -> work items
        first_last = [0.0, 0.0]
        fins = [0, 0.0]

        async def on_work(msg: Msg) -> None:
            now = time.monotonic()
            batch = orjson.loads(msg.data).get("items") or []
            if batch:
                first_last[0] = first_last[0] or now
                first_last[1] = now
                oid = batch[0].get("orchestrator_id", "?")
                items[oid] = items.get(oid, 0) + len(batch)

        async def on_fin(msg: Msg) -> None:
            fins[0] += len(msg.data.split()) if msg.data else 1
            fins[1] = time.monotonic()

        await nc.subscribe("llm.work.>", cb=on_work, pending_msgs_limit=-1)
        await nc.subscribe("llm.fin.*", cb=on_fin, pending_msgs_limit=-1)
        await nc.flush()
        total = per_pool * len(POOLS)
        pub = nc.jetstream(publish_async_max_pending=4000)
        orchs = [f"orch{i}" for i in range(replicas)]
        procs.signal(orchs, signal.SIGSTOP)
        started = time.monotonic()
        for n in range(per_pool):
            for model in POOLS:
                body = orjson.dumps({"request_id": f"r{n}-{model}", "prompt": "a b c d",
                                     "max_tokens": 1, "model": model})
                await pub.publish_async(S.request("normal", "standard", None,
                                                  pool_of(model, POOLS)), body)
        await pub.publish_async_completed()
        published_s = time.monotonic() - started
        assert server.proc is not None
        cpu0 = _cpu_by_role(procs, server.proc.pid)
        resumed = time.monotonic()
        procs.signal(orchs, signal.SIGCONT)

        async def dispatched_all() -> bool:
            return sum(items.values()) >= total

        with contextlib.suppress(TimeoutError):
            await _until(dispatched_all, timeout_s, "every request dispatched")
        cpu1 = _cpu_by_role(procs, server.proc.pid)
        dispatched = sum(items.values())
        window = max(1e-6, first_last[1] - resumed)
        # cores each kind of process kept busy while the backlog was dispatched
        busy = {k: round((cpu1[k] - cpu0[k]) / max(window, time.monotonic() - resumed), 2)
                for k in cpu0}
        return {
            "replicas": replicas, "pools": len(POOLS), "requests": total,
            "dispatched": dispatched, "finished": int(fins[0]),
            "dispatch_rps": round(dispatched / window, 1),
            "window_s": round(window, 3),
            "cores_busy": busy,
            "publish_rps": round(total / published_s, 1),
            "dispatching_replicas": len(items),
            "per_replica": sorted(items.values(), reverse=True),
            "cores": os.cpu_count(),
        }
    finally:
        await nc.close()
        await procs.stop()
        server.stop()


async def _true(value: bool) -> bool:
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-pool", type=int, default=2500, help="requests per pool and run")
    ap.add_argument("--replicas", default="1,2,4", help="replica counts, comma-separated")
    ap.add_argument("--timeout-s", type=float, default=90.0, help="per run, after publishing")
    ap.add_argument("--worker-capacity", type=int, default=4096, help="slots per worker")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args()
    rows = [asyncio.run(one_run(int(r), args.per_pool, args.timeout_s, args.worker_capacity))
            for r in args.replicas.split(",")]
    table = Table(title=f"partitioned dispatch: {len(POOLS)} pools, zero-cost sim workers, "
                        f"{os.cpu_count()} cores shared by every process")
    for col in ("replicas", "requests", "dispatch req/s", "window s", "items per replica",
                "cores busy: server/replicas/workers"):
        table.add_column(col, justify="right")
    for r in rows:
        b = r["cores_busy"]
        table.add_row(str(r["replicas"]), str(r["requests"]), f"{r['dispatch_rps']:.0f}",
                      f"{r['window_s']:.2f}", "/".join(map(str, r["per_replica"])),
                      f"{b['nats-server']:.2f}/{b['replicas']:.2f}/{b['workers']:.2f}")
    Console().print(table)
    if (os.cpu_count() or 1) < 2 * max(r["replicas"] for r in rows):
        Console().print(f"[yellow]{os.cpu_count()} cores for nats-server, {len(POOLS)} workers, "
                        "the replicas and the publisher: the larger replica counts are "
                        "bounded by the cores, not by the leadership design.[/yellow]")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
