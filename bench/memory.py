"""Memory of the pipeline: RSS with many requests in flight, per SDK stream, and a soak.

Three measurements, each on its own private nats-server with the services as
the CLI starts them (separate processes, RSS read from /proc/<pid>/status):

  held   one orchestrator and two sim workers whose decode step takes
         minutes (CPLANE__SIM__DECODE_A_MS), so nothing finishes. First K
         requests are opened through client/sdk.py (Client.submit, each handle
         iterated by its own task): the bench's own RSS growth / K is the cost
         of one open stream in the SDK. Then N raw requests are published; once
         the workers' heartbeats report N + K items held, the RSS of each
         process above idle gives KB per request in flight.
  soak   one orchestrator and two zero-cost workers (capacity 512) under an
         open-loop load at half of a quickly measured saturation (or --rate)
         for --soak-s seconds; the RSS of every process every 10 s, and its
         slope in MB per minute over the whole run and over its second half
         (caches that fill up to a bound, such as the orchestrator's dedup ids
         and the server's duplicate window, grow in the first minutes only).

    python bench/memory.py held --requests 10000 --streams 1000
    python bench/memory.py soak --soak-s 600
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nats
import orjson
from nats.aio.msg import Msg

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import overhead  # noqa: E402

from cplane.bus.provision import ensure_streams  # noqa: E402
from cplane.bus.server import EmbeddedNats  # noqa: E402
from cplane.client.sdk import Client  # noqa: E402
from cplane.schemas.messages import Request  # noqa: E402
from cplane.schemas.settings import load_settings  # noqa: E402

SAMPLE_S = 10.0


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in KB (0 when it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (a drain), then SIGKILL for what outlives 20 s."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def start_slow(url: str, capacity: int) -> list[subprocess.Popen[bytes]]:
    """Orchestrator and two sim workers whose decode never ends within the run."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               CPLANE__SIM__DECODE_A_MS="600000",  # a decode step takes 10 minutes
               CPLANE__WORKER__DRAIN_TIMEOUT_S="2")
    cli = [sys.executable, "-m", "cplane.cli"]
    cmds = [[*cli, "orchestrator", "--nats-url", url]] + [
        [*cli, "worker", "--nats-url", url, "--capacity", str(capacity), "--worker-id", f"m{i}"]
        for i in range(2)]
    return [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for c in cmds]


def pids_of(server: EmbeddedNats, procs: list[subprocess.Popen[bytes]]) -> dict[str, int]:
    assert server.proc is not None
    names = ["orchestrator"] + [f"worker-{i}" for i in range(len(procs) - 1)]
    out = {"nats-server": server.proc.pid, "bench": os.getpid()}
    out.update({n: p.pid for n, p in zip(names, procs, strict=True)})
    return out


async def until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def provisioned(url: str) -> nats.NATS:
    """A connection to the private server, its streams created as the services expect."""
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    await ensure_streams(nc.jetstream(), load_settings(env={}, nats={"url": url}))
    return nc


async def held(args: argparse.Namespace) -> None:
    with EmbeddedNats() as server:
        url = server.url
        nc = await provisioned(url)
        # Each worker takes half of everything, plus room so none waits in LLM_WORK.
        procs = start_slow(url, (args.requests + args.streams) // 2 + 500)
        try:
            await hold_and_measure(args, nc, url, pids_of(server, procs))
        finally:
            await nc.close()
            stop(procs)


async def hold_and_measure(args: argparse.Namespace, nc: nats.NATS, url: str,
                           pids: dict[str, int]) -> None:
    held_by: dict[str, int] = {}

    async def on_hb(msg: Msg) -> None:
        held_by[msg.subject] = int(orjson.loads(msg.data).get("held_items", 0))

    await nc.subscribe("llm.hb.*", cb=on_hb)
    await until(lambda: len(held_by) >= 2, 120, "two workers' heartbeats")
    await asyncio.sleep(2)  # the orchestrator takes the lease and pulls
    idle = {k: rss_kb(p) for k, p in pids.items()}
    print(f"idle RSS (MB): {fmt_mb(idle)}; load {load_avg()}")

    # (b) K open streams through the SDK, in this process.
    client = await Client.connect(url, settings=load_settings(env={}, nats={"url": url}),
                                  default_timeout_s=None)
    base = rss_kb(os.getpid())
    first = 0

    async def consume(h: object) -> None:
        nonlocal first
        async for _ in h:  # type: ignore[attr-defined]
            first += 1
            break
        await asyncio.Event().wait()  # hold the stream open until cancelled

    tasks = []
    for i in range(args.streams):
        h = await client.submit(Request(request_id=f"sdk{i}", prompt=overhead.PROMPT,
                                        max_tokens=4000))
        tasks.append(asyncio.create_task(consume(h)))
    await until(lambda: sum(held_by.values()) >= args.streams, 120, "SDK requests held")
    await asyncio.sleep(1)
    with_streams = rss_kb(os.getpid())
    per_stream = (with_streams - base) / max(args.streams, 1)
    print(f"SDK: {args.streams} open streams ({first} with a first token): bench RSS "
          f"{base / 1024:.1f} -> {with_streams / 1024:.1f} MB, {per_stream:.2f} KB per stream; "
          f"load {load_avg()}")

    # (a) N raw requests on top, all held by the workers.
    js = nc.jetstream(publish_async_max_pending=4000)
    futs = []
    for i in range(args.requests):
        rid = f"h{i}"
        futs.append(await js.publish_async("llm.req.normal.standard",
                                           overhead.body(rid, 4000),
                                           headers={"Nats-Msg-Id": rid}))
        if len(futs) >= 2000:
            await asyncio.wait_for(asyncio.gather(*futs), 60)
            futs = []
    await asyncio.wait_for(asyncio.gather(*futs), 60)
    total = args.requests + args.streams
    await until(lambda: sum(held_by.values()) >= total, 300, f"{total} requests held")
    await asyncio.sleep(4)  # past one in_progress round of the orchestrator's ledger
    full = {k: rss_kb(p) for k, p in pids.items()}
    print(f"{total} requests in flight ({sum(held_by.values())} held by workers): "
          f"RSS (MB): {fmt_mb(full)}; load {load_avg()}")
    for k in pids:
        if k == "bench":
            continue
        # A worker holds its own share; the others see every request.
        mine = held_by.get(f"llm.hb.m{k[7:]}", total) if k.startswith("worker-") else total
        per = (full[k] - idle[k]) / mine
        print(f"  {k:13s} idle {idle[k] / 1024:7.1f} MB  in flight {full[k] / 1024:7.1f} MB"
              f"  +{per:.2f} KB per request it holds ({mine})")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()


def fmt_mb(d: dict[str, int]) -> str:
    return ", ".join(f"{k}={v / 1024:.1f}" for k, v in d.items())


def slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KB) samples, in MB per minute."""
    if len(samples) < 2:
        return float("nan")
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    den = sum((t - mt) ** 2 for t, _ in samples)
    num = sum((t - mt) * (r - mr) for t, r in samples)
    return num / den * 60 / 1024 if den else float("nan")


async def soak(args: argparse.Namespace) -> None:
    with EmbeddedNats() as server:
        url = server.url
        nc = await provisioned(url)
        procs = overhead.start_services(url, 2, 512)
        try:
            from cplane.stack import wait_for_workers

            await wait_for_workers(url, 2, 60)
            await asyncio.sleep(1.5)  # the orchestrator sees the heartbeats
            rate = args.rate
            if not rate:
                sat = await overhead.saturation(url, 5000, 3, "sat")
                rate = sat / 2
                print(f"saturation {sat:,.0f} req/s; soak at {rate:,.0f} req/s; "
                      f"load {load_avg()}")
            await soak_load(args, nc, pids_of(server, procs), rate)
        finally:
            await nc.close()
            stop(procs)


async def soak_load(args: argparse.Namespace, nc: nats.NATS, pids: dict[str, int],
                    rate: float) -> None:
    js = nc.jetstream(publish_async_max_pending=4000)
    done = 0

    async def on_done(msg: Msg) -> None:
        nonlocal done
        done += 1

    await nc.subscribe("llm.done.i.>", cb=on_done)
    await nc.flush()
    samples: dict[str, list[tuple[float, int]]] = {k: [] for k in pids}
    t0 = time.monotonic()
    sent = 0
    next_sample = t0
    tick = 0.05
    while (now := time.monotonic()) - t0 < args.soak_s:
        if now >= next_sample:
            el = now - t0
            row = {k: rss_kb(p) for k, p in pids.items()}
            for k, v in row.items():
                samples[k].append((el, v))
            print(f"t={el:5.0f}s sent={sent} done={done} RSS MB: {fmt_mb(row)}; "
                  f"load {load_avg()}", flush=True)
            next_sample += SAMPLE_S
        # Open loop: publish what the schedule owes, in ticks of 50 ms.
        owed = int((now - t0) * rate) - sent
        futs = []
        for _ in range(owed):
            rid = f"k{sent}"
            futs.append(await js.publish_async("llm.req.normal.standard",
                                               overhead.body(rid, 3),
                                               headers={"Nats-Msg-Id": rid}))
            sent += 1
        if futs:
            await asyncio.wait_for(asyncio.gather(*futs), 60)
        await asyncio.sleep(max(0.0, tick - (time.monotonic() - now)))
    el = time.monotonic() - t0
    print(f"soak: {sent} requests in {el:.0f} s ({sent / el:,.0f} req/s), {done} done by its "
          f"end (a backlog, when it fell behind, grows the server's RSS); load {load_avg()}")
    print("RSS slope, MB per minute: whole run / second half; first -> last sample, MB")
    for k, s in samples.items():
        half = [x for x in s if x[0] >= el / 2]
        print(f"  {k:13s} {slope_mb_per_min(s):+7.3f} / {slope_mb_per_min(half):+7.3f}   "
              f"{s[0][1] / 1024:7.1f} -> {s[-1][1] / 1024:7.1f}")
    with contextlib.suppress(TimeoutError):  # a backlog drains before the services stop
        await until(lambda: done >= sent, 120, "the soak's last Finals")
    print(f"after the soak: {done} of {sent} done; load {load_avg()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sp = ap.add_subparsers(dest="what", required=True)
    h = sp.add_parser("held", help="RSS with requests in flight, and per SDK stream")
    h.add_argument("--requests", type=int, default=10_000)
    h.add_argument("--streams", type=int, default=1000, help="SDK streams opened first")
    s = sp.add_parser("soak", help="RSS every 10 s under half of saturation load")
    s.add_argument("--soak-s", type=float, default=600.0)
    s.add_argument("--rate", type=float, default=0.0,
                   help="requests/s (default: half of a measured saturation)")
    args = ap.parse_args()
    asyncio.run(held(args) if args.what == "held" else soak(args))


if __name__ == "__main__":
    main()
