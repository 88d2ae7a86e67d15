"""`make demo`: the embedded stack, a burst of mixed-priority requests, a table.

Starts nats-server, the orchestrator and 2 sim workers (Llama-3-8B/H100
latency model, 8 sequences each so the burst has to queue), sends 48
requests across the five priorities at once, and prints per-request TTFT and
latency plus a per-priority summary: under contention, higher priorities
get their first token sooner.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time

from rich.console import Console
from rich.table import Table

from cplane.client.sdk import Client, new_request_id
from cplane.schemas.messages import Final, Priority, Request
from cplane.schemas.settings import load_settings
from cplane.stack import Stack, StackSpec

console = Console()


async def burst(url: str, n: int) -> list[tuple[Priority, Final, float]]:
    rng = random.Random(7)
    client = await Client.connect(url, load_settings(nats={"url": url}))
    prios = [list(Priority)[i % 5] for i in range(n)]
    rng.shuffle(prios)
    t0 = time.perf_counter()
    handles = []
    for p in prios:
        r = Request(request_id=new_request_id()[:12],
                    prompt="Tell me about NATS " * rng.randint(5, 60),
                    max_tokens=rng.randint(32, 128), ignore_eos=True)
        handles.append((p, await client.submit(r, priority=p)))
    out = []
    for p, h in handles:
        final = await h.result(timeout=120)
        out.append((p, final, (time.perf_counter() - t0) * 1000))
    await client.close()
    return out


def show(results: list[tuple[Priority, Final, float]]) -> None:
    t = Table(title="requests (sorted by completion)")
    for col in ("request", "priority", "tokens", "TTFT ms", "latency ms", "worker"):
        t.add_column(col, justify="right" if col not in ("request", "priority") else "left")
    for p, f, _ in sorted(results, key=lambda r: r[1].ts_ms):
        t.add_row(f.request_id, p.value, str(f.usage.completion_tokens),
                  f"{f.timings.ttft_ms:.1f}", f"{f.timings.e2e_ms:.1f}", ",".join(f.workers))
    console.print(t)
    s = Table(title="summary by priority")
    for col in ("priority", "requests", "mean TTFT ms", "p50 latency ms", "max latency ms"):
        s.add_column(col, justify="right" if col != "priority" else "left")
    for p in Priority:
        fs = [f for q, f, _ in results if q is p]
        if fs:
            lat = [f.timings.e2e_ms for f in fs]
            ttft = statistics.fmean(f.timings.ttft_ms for f in fs)
            s.add_row(p.value, str(len(fs)), f"{ttft:.1f}", f"{statistics.median(lat):.1f}",
                      f"{max(lat):.1f}")
    console.print(s)
    toks = sum(f.usage.completion_tokens for _, f, _ in results)
    wall = max(w for _, _, w in results) / 1000
    console.print(f"{len(results)} requests, {toks} tokens in {wall:.2f} s "
                  f"({toks / wall:,.0f} tokens/s) - every request completed")


def main() -> None:
    os.environ.setdefault("CPLANE_LOG_LEVEL", "WARNING")  # the services' logs stay quiet
    stack = Stack(StackSpec(workers=2, capacity=8))
    console.print("starting nats-server, orchestrator and 2 sim workers...")
    stack.start(timeout_s=60)
    try:
        console.print(f"stack up at {stack.url}; sending 48 requests of mixed priority")
        show(asyncio.run(burst(stack.url, 48)))
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
