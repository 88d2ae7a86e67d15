"""Overhead benchmark: what the orchestration layer costs, measured in one run.

With zero-cost sim workers (every engine step is free), on one private
nats-server, it measures:

  (a) raw nats-py pipelined JetStream publish rate (publish_async) - the
      client-side ceiling of any JetStream hop on this machine;
  (b) end-to-end requests/s through the whole pipeline at saturation
      (client -> LLM_REQ -> orchestrator -> LLM_WORK -> worker -> chunks + Final);
  (c) added latency publish -> first token and publish -> Final, p50/p99,
      under Poisson load at ~50% of (b).

It prints (b)/(a), and, when ../shared/bench/run_ceiling.sh exists (or
--ceiling-script is given), runs the raw-nats-py pipeline ceiling in the same
session: durable (the same hops with cplane's guarantees, DURABLE=1) before
and after cplane, their mean the yardstick (`ceiling` in the JSON), and the
plain one (chunks captured by a memory stream) for the record.

With --auth the server runs the multi-tenant accounts (`cplane up --auth`,
docs/security.md): every service on its own credentials and the load
generator a tenant, so its requests and outputs cross the server's subject
mapping and every permission check.

    python bench/overhead.py [--requests 20000] [--workers 2] [--auth] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import nats
import uvloop
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cplane.bus.provision import ensure_all  # noqa: E402
from cplane.bus.server import EmbeddedNats  # noqa: E402
from cplane.schemas.codec import encode  # noqa: E402
from cplane.schemas.messages import Request  # noqa: E402
from cplane.schemas.settings import NatsSettings, load_settings  # noqa: E402

console = Console()
PROMPT = "hello world " * 4
# --auth: how the load generator ("client", a tenant) and the setup ("admin", the
# operator) connect, and each service's --creds file.
CONNECT: dict[str, dict[str, str]] = {"client": {}, "admin": {}}
CREDS: dict[str, str] = {}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def raw_publish_rate(url: str, n: int) -> float:
    """(a): publish_async of 200-byte messages to a scratch WorkQueue stream."""
    nc = await nats.connect(url, **CONNECT["admin"])
    js = nc.jetstream(publish_async_max_pending=4000)
    await js.add_stream(name="BENCH_RAW", subjects=["bench.raw"], retention="workqueue")
    body = b"x" * 200
    t0 = time.perf_counter()
    futs = []
    for _ in range(n):
        futs.append(await js.publish_async("bench.raw", body))
        if len(futs) >= 2000:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)
    dt = time.perf_counter() - t0
    await js.delete_stream("BENCH_RAW")
    await nc.close()
    return n / dt


def body(rid: str, max_tokens: int) -> bytes:
    return encode(Request(request_id=rid, prompt=PROMPT, max_tokens=max_tokens))


async def saturation(url: str, n: int, max_tokens: int, tag: str) -> float:
    """(b): publish n requests as fast as JetStream takes them; count Finals."""
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024,
                            **CONNECT["client"])
    js = nc.jetstream(publish_async_max_pending=4000)
    got = 0
    done = asyncio.Event()

    async def on_done(msg: Msg) -> None:
        nonlocal got
        got += 1
        if got >= n:
            done.set()

    await nc.subscribe("llm.done.i.>", cb=on_done)
    await nc.flush()
    t0 = time.perf_counter()
    futs = []
    for i in range(n):
        rid = f"{tag}{i}"
        fut = await js.publish_async(
            "llm.req.normal.standard", body(rid, max_tokens), headers={"Nats-Msg-Id": rid}
        )
        futs.append(fut)
        if len(futs) >= 2000:
            await asyncio.wait_for(asyncio.gather(*futs), 30)
            futs = []
    await asyncio.wait_for(asyncio.gather(*futs), 30)
    await asyncio.wait_for(done.wait(), 600)
    dt = time.perf_counter() - t0
    await nc.close()
    return n / dt


async def send_open_loop(js: JetStreamContext, rate: float, n: int,
                         make_body: Callable[[str], bytes], sent: dict[str, float], *,
                         tag: str, rng: random.Random) -> float:
    """Publish n requests `<tag><i>` at Poisson arrivals of `rate` (sent[id] = when,
    one Nats-Msg-Id each); returns the seconds spent sending, once every ack is in.

    Acks are checked beside the sending loop, never by stopping it: an open-loop
    generator that waits for 1,000 acks falls behind, then sends a burst. Checked
    groups are let go at once: a generator holding every ack future until the end
    (tens of thousands of tracked objects) spends tens of milliseconds in each of
    its own full garbage collections, which the receiving side of the same
    process then counts as latency (measured: p99 33 ms against 5.6 ms at
    1,000 req/s)."""
    start = next_t = time.perf_counter()
    checks: deque[asyncio.Future[list[object]]] = deque()
    futs = []
    for i in range(n):
        next_t += rng.expovariate(rate)
        delay = next_t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        rid = f"{tag}{i}"
        data = make_body(rid)
        sent[rid] = time.perf_counter()
        futs.append(await js.publish_async(
            "llm.req.normal.standard", data, headers={"Nats-Msg-Id": rid}
        ))
        if len(futs) >= 1000:
            checks.append(asyncio.gather(*futs))
            futs = []
            while checks and checks[0].done():
                checks.popleft().result()  # raises a publish that failed
    sent_s = time.perf_counter() - start
    await asyncio.wait_for(asyncio.gather(*checks, *futs), 30)
    return sent_s


async def latency(url: str, rate: float, duration_s: float, max_tokens: int, tag: str,
                  seed: int = 0) -> dict[str, float]:
    """(c): Poisson arrivals at `rate`; publish -> first chunk and -> Final, ms."""
    # The load generator's own full collections (tens of ms over its imports) would
    # show as latency: frozen, as the services freeze theirs once started.
    gc.collect()
    gc.freeze()
    rng = random.Random(seed)
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024,
                            **CONNECT["client"])
    js = nc.jetstream(publish_async_max_pending=4000)
    sent: dict[str, float] = {}
    first: dict[str, float] = {}
    final: dict[str, float] = {}
    all_done = asyncio.Event()
    n = int(rate * duration_s)

    async def on_out(msg: Msg) -> None:
        rid = msg.subject.rpartition(".")[2]
        if rid not in first:
            first[rid] = time.perf_counter()

    async def on_done(msg: Msg) -> None:
        final[msg.subject.rpartition(".")[2]] = time.perf_counter()
        if len(final) >= n:
            all_done.set()

    await nc.subscribe("llm.out.i.>", cb=on_out)
    await nc.subscribe("llm.done.i.>", cb=on_done)
    await nc.flush()
    sent_s = await send_open_loop(js, rate, n, lambda rid: body(rid, max_tokens), sent,
                                  tag=tag, rng=rng)
    await asyncio.wait_for(all_done.wait(), 120)
    achieved = n / sent_s
    await nc.close()
    ttft = [(first[r] - t) * 1000 for r, t in sent.items() if r in first]
    e2e = [(final[r] - t) * 1000 for r, t in sent.items() if r in final]
    return {
        "rate": achieved, "n": n,
        "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
        "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99),
        "e2e_mean": statistics.fmean(e2e),
    }


def start_services(url: str, workers: int, capacity: int) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cli = [sys.executable, "-m", "cplane.cli"]
    def creds(name: str) -> list[str]:
        return ["--creds", CREDS[name]] if name in CREDS else []

    procs = [subprocess.Popen([*cli, "orchestrator", "--nats-url", url,
                               *creds("orchestrator")], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for i in range(workers):
        procs.append(subprocess.Popen(
            [*cli, "worker", "--nats-url", url, "--zero-cost", "--capacity", str(capacity),
             "--worker-id", f"bench-{i}", *creds(f"worker-bench-{i}")],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
    return procs


def run_ceiling(script: Path, n: int, durable: bool = True) -> dict[int, float]:
    """The raw nats-py pipeline's end-to-end rate for batch sizes 1 and 16: durable, the
    same hops with cplane's guarantees (stored before seen, terminals kept, a
    Nats-Msg-Id on every publish), or plain (chunks captured by a memory stream)."""
    env = dict(os.environ, DURABLE="1" if durable else "0")
    out = subprocess.run(["bash", str(script), sys.executable, str(n)], capture_output=True,
                         text=True, timeout=900, check=False, env=env).stdout
    found = re.findall(r"batch=(\d+) .*end-to-end (\d+) req/s", out)
    return {int(b): float(r) for b, r in found}


async def measure(args: argparse.Namespace, url: str) -> dict[str, object]:
    settings = load_settings(env={}, nats={"url": url})
    nc = await nats.connect(url, **CONNECT["admin"])
    await ensure_all(nc.jetstream(), settings)
    await nc.close()
    raw = await raw_publish_rate(url, args.requests)
    procs = start_services(url, args.workers, args.capacity)
    try:
        from cplane.stack import wait_for_workers

        await wait_for_workers(url, args.workers, 60, nats_settings=NatsSettings(
            creds=CREDS.get("operator")))
        await asyncio.sleep(1.5)  # orchestrator sees heartbeats
        await saturation(url, 2000, args.max_tokens, "warm")
        rates = [await saturation(url, args.requests, args.max_tokens, f"s{i}-")
                 for i in range(args.rounds)]
        sat = max(rates)
        lat = await latency(url, sat * 0.5, args.latency_s, args.max_tokens, "l")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    return {"raw_publish": raw, "saturation": sat, "saturation_runs": rates, "latency": lat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=3)
    ap.add_argument("--latency-s", type=float, default=10.0)
    ap.add_argument("--ceiling-script", default=str(ROOT.parent / "shared/bench/run_ceiling.sh"))
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--auth", action="store_true",
                    help="multi-tenant accounts; the load generator is a tenant")
    args = ap.parse_args()
    extra = ""
    if args.auth:
        from cplane.auth_setup import AuthSetup

        auth = AuthSetup.create([f"bench-{i}" for i in range(args.workers)], ["bench"],
                                gateway=False)
        extra = auth.config(load_settings(env={}))
        CREDS.update(auth.files)
        CONNECT.update(client=auth.login("tenant-bench"), admin=auth.login("operator"))
    script = Path(args.ceiling_script)
    runs: dict[str, dict[int, float]] = {}
    if script.exists():  # the durable ceiling before and after cplane, the plain one after
        runs["durable_before"] = run_ceiling(script, args.requests)
    with EmbeddedNats(extra_config=extra) as server:
        res = uvloop.run(measure(args, server.url))
    if script.exists():
        runs["durable_after"] = run_ceiling(script, args.requests)
        runs["plain"] = run_ceiling(script, args.requests, durable=False)
        before, after = runs["durable_before"], runs["durable_after"]
        res["ceiling"] = {b: (before[b] + after[b]) / 2 for b in before if b in after}
        res["ceiling_runs"] = runs
    res["settings"] = {"workers": args.workers, "capacity": args.capacity,
                       "max_tokens": args.max_tokens, "requests": args.requests,
                       "rounds": args.rounds, "latency_s": args.latency_s,
                       "cores": os.cpu_count(), "line": settings_line(args)}
    show(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


def settings_line(args: argparse.Namespace) -> str:
    """What the run was: printed with the figures and stored in the JSON."""
    return (f"{args.workers} zero-cost sim workers x capacity {args.capacity}, "
            f"{args.max_tokens} tokens/request, {args.requests} requests x {args.rounds} "
            f"rounds, latency at 50 % for {args.latency_s:g} s, {os.cpu_count()} cores"
            + (", multi-tenant (--auth)" if args.auth else ""))


def show(res: dict[str, object], args: argparse.Namespace) -> None:
    lat = res["latency"]
    assert isinstance(lat, dict)
    raw, sat = float(res["raw_publish"]), float(res["saturation"])  # type: ignore[arg-type]
    t = Table(title=f"cplane overhead: {settings_line(args)}")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("(a) raw JetStream publish_async", f"{raw:,.0f} msg/s")
    t.add_row("(b) end-to-end at saturation", f"{sat:,.0f} req/s")
    t.add_row("(b)/(a)", f"{sat / raw:.2f}")
    runs = res.get("ceiling_runs") or {}
    assert isinstance(runs, dict)
    for ceiling, name in ((res.get("ceiling") or {}, "durable"),
                          (runs.get("plain") or {}, "plain")):
        assert isinstance(ceiling, dict)
        for b, rate in sorted(ceiling.items()):
            t.add_row(f"{name} pipeline ceiling, batch {b}", f"{rate:,.0f} req/s")
            t.add_row(f"(b) / {name} ceiling batch {b}", f"{sat / rate:.2f}")
    t.add_row("(c) offered load", f"{lat['rate']:,.0f} req/s ({lat['n']} requests)")
    t.add_row("(c) publish -> first token p50 / p99",
              f"{lat['ttft_p50']:.2f} / {lat['ttft_p99']:.2f} ms")
    t.add_row("(c) publish -> Final p50 / p99", f"{lat['e2e_p50']:.2f} / {lat['e2e_p99']:.2f} ms")
    console.print(t)


if __name__ == "__main__":
    main()
