"""Tenant fairness on the live stack, with one and with two orchestrator replicas.

One private nats-server, two sim workers at their default cost (4 slots each),
and one or two orchestrator replicas (one leads, the other stands by: only the
leader dispatches, so the tenant counters live in one place). Tenant `a` sends
10x what `b` and `c` send, all at once in a seeded shuffle, more than the fleet
runs at a time. While all three have work waiting, a max-min fair scheduler
gives each a third of the service: among the first 3 x n_small completions,
n_small each. Jain's index of (completions / fair share) over the tenants is
1.0 when that holds and 1/3 when `a` takes everything.

    python bench/fairness_live.py [--small 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import nats
import uvloop
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cplane.bus.server import EmbeddedNats  # noqa: E402
from cplane.client.sdk import Client  # noqa: E402
from cplane.orchestrator.service import Orchestrator  # noqa: E402
from cplane.schemas.messages import Request  # noqa: E402
from cplane.schemas.settings import Settings, load_settings  # noqa: E402
from cplane.workers.engines.sim import SimEngine  # noqa: E402
from cplane.workers.runtime import Worker  # noqa: E402


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 0.0


async def one_run(url: str, replicas: int, fair: bool, small: int, seed: int) -> dict[str, Any]:
    tag = f"f{int(fair)}r{replicas}s{seed}"
    s: Settings = load_settings(None, nats={"url": url, "prefix": tag},
                                worker={"capacity": 4},
                                orchestrator={"policy": "priority",
                                              "policy_params": {"fair": fair}})
    stop = asyncio.Event()
    tasks = []
    engines = []
    conns = []
    orchs = []
    for i in range(2):
        eng = SimEngine(s.sim)
        await eng.start()
        engines.append(eng)
        ws = load_settings(None, nats={"url": url, "prefix": tag},
                           worker={"capacity": 4, "worker_id": f"{tag}-w{i}"})
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(Worker(ws, eng).run(stop, ready)))
        await asyncio.wait_for(ready.wait(), 30)
    for _ in range(replicas):
        nc = await nats.connect(url)
        conns.append(nc)
        o = Orchestrator(s, nc=nc)
        orchs.append(o)
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(o.run(stop, ready)))
        await asyncio.wait_for(ready.wait(), 30)
    deadline = time.monotonic() + 15
    while sum(o.leading for o in orchs) != 1:
        assert time.monotonic() < deadline, "no leader"
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.2)  # the leader hears both workers' heartbeats
    tenants = ["a"] * (10 * small) + ["b"] * small + ["c"] * small
    random.Random(seed).shuffle(tenants)
    client = Client(await nats.connect(url), s)
    done: list[str] = []

    async def one(i: int, tenant: str) -> None:
        h = await client.submit(Request(request_id=f"{tag}-{i}", prompt="x " * 50,
                                        max_tokens=24, ignore_eos=True, tenant=tenant))
        await h.result(timeout=120)
        done.append(tenant)

    await asyncio.gather(*(one(i, t) for i, t in enumerate(tenants)))
    await client.close()
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for eng in engines:
        await eng.shutdown()
    for nc in conns:
        await nc.close()
    first = done[:3 * small]
    counts = {t: first.count(t) for t in ("a", "b", "c")}
    return {"replicas": replicas, "fair": fair, "first": 3 * small, "counts": counts,
            "jain": jain([counts[t] / small for t in ("a", "b", "c")])}


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for r in (1, 2):
        for f in (False, True):
            server = EmbeddedNats().start()  # a fresh broker per run: nothing carried over
            try:
                rows.append(await one_run(server.url, r, f, args.small, args.seed))
            finally:
                server.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=12, help="requests of tenants b and c each")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = uvloop.run(main_async(args))
    t = Table(title=f"tenant a sends 10x b and c ({args.small} each), 2 sim workers x 4 slots")
    for col in ("replicas", "fair", "a / b / c among the first completions", "Jain"):
        t.add_column(col)
    for r in rows:
        c = r["counts"]
        t.add_row(str(r["replicas"]), str(r["fair"]),
                  f"{c['a']} / {c['b']} / {c['c']} of {r['first']}", f"{r['jain']:.3f}")
    Console().print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
